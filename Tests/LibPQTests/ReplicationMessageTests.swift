import Foundation
import LibPQ
import Testing

/// Builds protocol messages byte by byte, as the server writes them.
private struct Bytes {
    var bytes: [UInt8] = []
    mutating func byte(_ value: UInt8) { bytes.append(value) }
    mutating func char(_ value: Character) { bytes.append(value.asciiValue!) }
    mutating func int16(_ value: UInt16) { withUnsafeBytes(of: value.bigEndian) { bytes += $0 } }
    mutating func int32(_ value: UInt32) { withUnsafeBytes(of: value.bigEndian) { bytes += $0 } }
    mutating func int64(_ value: UInt64) { withUnsafeBytes(of: value.bigEndian) { bytes += $0 } }
    mutating func string(_ value: String) { bytes += Array(value.utf8) + [0] }
}

@Suite("logical replication messages (pgoutput v1), decoded without a server")
struct ReplicationMessageTests {
    @Test("LSNs read and print as the server writes them")
    func lsn() {
        #expect(PostgresLSN("16/B374D848")?.value == 0x16_B374_D848)
        #expect(PostgresLSN(0x16_B374_D848).description == "16/B374D848")
        #expect(PostgresLSN("0/0") == .zero)
        for bad in ["", "16", "16/", "/1", "x/1", "1/2/3", "123456789/0"] { #expect(PostgresLSN(bad) == nil, "\(bad)") }
        #expect(PostgresLSN("1/0")! > PostgresLSN("0/FFFFFFFF")!)
    }

    @Test("XLogData and keepalive frames")
    func frames() throws {
        var data = Bytes()
        data.char("w"); data.int64(0x100); data.int64(0x200); data.int64(0); data.bytes += [1, 2, 3]
        #expect(try ReplicationMessage.decode(data.bytes) == .xLogData(start: PostgresLSN(0x100), walEnd: PostgresLSN(0x200), payload: [1, 2, 3]))
        var keepalive = Bytes()
        keepalive.char("k"); keepalive.int64(0x300); keepalive.int64(0); keepalive.byte(1)
        #expect(try ReplicationMessage.decode(keepalive.bytes) == .keepalive(walEnd: PostgresLSN(0x300), replyRequested: true))
        #expect(throws: PQError.self) { try ReplicationMessage.decode(Array(keepalive.bytes.dropLast())) }
        #expect(throws: PQError.self) { try ReplicationMessage.decode([UInt8(ascii: "z")]) }
        #expect(throws: PQError.self) { try ReplicationMessage.decode([]) }
    }

    @Test("a standby status update carries the confirmed position three times, big-endian")
    func statusUpdate() {
        let update = ReplicationMessage.statusUpdate(
            written: PostgresLSN(0x0102_0304_0506_0708), flushed: PostgresLSN(0x0102_0304_0506_0708),
            applied: PostgresLSN(0x0102_0304_0506_0708), now: Date(timeIntervalSince1970: 946_684_800))
        #expect(update.count == 34)
        #expect(update[0] == UInt8(ascii: "r"))
        #expect(Array(update[1...8]) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(Array(update[9...16]) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(Array(update[25...32]) == [0, 0, 0, 0, 0, 0, 0, 0])  // PostgreSQL's epoch
        #expect(update[33] == 0)
    }

    @Test("begin, relation, insert (text, NULL, quotes, multibyte), commit")
    func transaction() throws {
        var begin = Bytes()
        begin.char("B"); begin.int64(0xAB); begin.int64(1_000_000); begin.int32(77)
        #expect(
            try PgOutputMessage.decode(begin.bytes)
                == .begin(finalLSN: PostgresLSN(0xAB), commitTime: Date(timeIntervalSince1970: 946_684_801), xid: 77))

        var relation = Bytes()
        relation.char("R"); relation.int32(16400); relation.string("public"); relation.string("outbox"); relation.char("d")
        relation.int16(2)
        relation.byte(1); relation.string("id"); relation.int32(20); relation.int32(UInt32(bitPattern: -1))
        relation.byte(0); relation.string("stream_id"); relation.int32(25); relation.int32(UInt32(bitPattern: -1))
        guard case .relation(let described) = try PgOutputMessage.decode(relation.bytes) else {
            Issue.record("not a relation")
            return
        }
        #expect(described.columns == ["id", "stream_id"])
        #expect(described.namespace == "public" && described.name == "outbox" && described.id == 16400)

        let stream = #"it's a "stream" — ü"#
        var insert = Bytes()
        insert.char("I"); insert.int32(16400); insert.char("N"); insert.int16(2)
        insert.char("t"); insert.int32(2); insert.bytes += Array("42".utf8)
        insert.char("t"); insert.int32(UInt32(stream.utf8.count)); insert.bytes += Array(stream.utf8)
        #expect(try PgOutputMessage.decode(insert.bytes) == .insert(relationID: 16400, values: ["42", stream]))
        let row = try described.row(["42", stream])
        #expect(try row.decode(Int64.self, "id") == 42)
        #expect(try row.decode(String.self, "stream_id") == stream)
        #expect(throws: PQError.self) { try described.row(["42"]) }

        var withNull = Bytes()
        withNull.char("I"); withNull.int32(16400); withNull.char("N"); withNull.int16(1); withNull.char("n")
        #expect(try PgOutputMessage.decode(withNull.bytes) == .insert(relationID: 16400, values: [nil]))

        var commit = Bytes()
        commit.char("C"); commit.byte(0); commit.int64(0xAB); commit.int64(0xCD); commit.int64(0)
        #expect(
            try PgOutputMessage.decode(commit.bytes)
                == .commit(commitLSN: PostgresLSN(0xAB), endLSN: PostgresLSN(0xCD), commitTime: Date(timeIntervalSince1970: 946_684_800)))
    }

    @Test("malformed messages are errors that say what is wrong, never a crash")
    func malformed() throws {
        var truncated = Bytes()
        truncated.char("I"); truncated.int32(1); truncated.char("N"); truncated.int16(1); truncated.char("t"); truncated.int32(10)
        truncated.bytes += Array("short".utf8)
        #expect { try PgOutputMessage.decode(truncated.bytes) } throws: { "\($0)".contains("ends early") }
        var unterminated = Bytes()
        unterminated.char("R"); unterminated.int32(1); unterminated.bytes += Array("public".utf8)
        #expect { try PgOutputMessage.decode(unterminated.bytes) } throws: { "\($0)".contains("NUL") }
        var unchanged = Bytes()
        unchanged.char("I"); unchanged.int32(1); unchanged.char("N"); unchanged.int16(1); unchanged.char("u")
        #expect { try PgOutputMessage.decode(unchanged.bytes) } throws: { "\($0)".contains("column 1") }
        #expect(try PgOutputMessage.decode([UInt8(ascii: "D"), 0, 0]) == .other(kind: UInt8(ascii: "D")))
        #expect(throws: PQError.self) { try PgOutputMessage.decode([]) }
    }

    @Test("slot and publication names: only what can stand unquoted in a replication command")
    func names() throws {
        try ReplicationNames.validate("eventoutbox_outbox_2", what: "slot")
        for bad in ["", "Upper", "with space", "semi;colon", "quote'", String(repeating: "a", count: 64)] {
            #expect(throws: PQError.self, "\(bad)") { try ReplicationNames.validate(bad, what: "slot") }
        }
    }
}

@Suite("uuid text decoding")
struct UUIDDecodingTests {
    @Test("agrees with Foundation on valid text, refuses the rest")
    func agrees() throws {
        for _ in 0..<200 {
            let id = UUID()
            #expect(try UUID(postgresText: id.uuidString.lowercased(), type: .text) == id)
            #expect(try UUID(postgresText: id.uuidString, type: .text) == id)
        }
        for bad in ["", "6f9619ff-8b86-d011-b42d-00c04fc964f", "6f9619ff-8b86-d011-b42d-00c04fc964ffa", "6f9619ff+8b86-d011-b42d-00c04fc964ff",
                    "6f9619ff-8b86-d011-b42d-00c04fc964fg", "6f9619ff8b86-d011-b42d-00c04fc964ff0"] {
            #expect(throws: PQDecodingFailure.self, "\(bad)") { try UUID(postgresText: bad, type: .text) }
        }
    }
}
