import Foundation

/// A message of PostgreSQL's streaming replication protocol, as carried in one CopyData of a
/// `START_REPLICATION` stream (see the protocol's "Streaming Replication Protocol" chapter).
public enum ReplicationMessage: Sendable, Equatable {
    /// WAL data: for a logical slot, one output-plugin message (`payload`) written at `start`.
    case xLogData(start: PostgresLSN, walEnd: PostgresLSN, payload: [UInt8])
    /// The server's heartbeat: everything before `walEnd` has been sent. `replyRequested` asks for a status
    /// update at once (else the server ends the connection after `wal_sender_timeout`).
    case keepalive(walEnd: PostgresLSN, replyRequested: Bool)

    /// Reads one CopyData message from the server.
    public static func decode(_ bytes: [UInt8]) throws(PQError) -> ReplicationMessage {
        var reader = ByteReader(bytes, what: "replication message")
        switch try reader.byte() {
        case UInt8(ascii: "w"):
            let start = PostgresLSN(try reader.uint64())
            let walEnd = PostgresLSN(try reader.uint64())
            _ = try reader.uint64()  // the server's send time
            return .xLogData(start: start, walEnd: walEnd, payload: reader.rest())
        case UInt8(ascii: "k"):
            let walEnd = PostgresLSN(try reader.uint64())
            _ = try reader.uint64()
            return .keepalive(walEnd: walEnd, replyRequested: try reader.byte() == 1)
        case let kind:
            throw PQError(code: .decoding, message: "unknown replication message kind \(kind) (\(bytes.count) bytes)")
        }
    }

    /// The standby status update that tells the server how far the client has written, flushed and applied
    /// the stream. For a logical slot the flushed position becomes the slot's `confirmed_flush_lsn`: the
    /// server keeps WAL from there, and a new `START_REPLICATION` resumes there.
    /// With `replyRequested`, the server answers at once with a keepalive carrying how far it has sent.
    public static func statusUpdate(
        written: PostgresLSN, flushed: PostgresLSN, applied: PostgresLSN, now: Date = Date(), replyRequested: Bool = false
    ) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "r")]
        bytes.reserveCapacity(34)
        for value in [written.value, flushed.value, applied.value, UInt64(bitPattern: PostgresEpoch.microseconds(now))] {
            withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
        }
        bytes.append(replyRequested ? 1 : 0)
        return bytes
    }
}

/// A message of the built-in `pgoutput` logical decoding plugin, protocol version 1 (text values).
///
/// Without streaming (version 1), the server decodes a transaction after it commits and sends it whole:
/// `begin`, its changes, `commit`, transactions in commit order.
public enum PgOutputMessage: Sendable, Equatable {
    case begin(finalLSN: PostgresLSN, commitTime: Date, xid: UInt32)
    case commit(commitLSN: PostgresLSN, endLSN: PostgresLSN, commitTime: Date)
    /// Describes a table before its first change in this session (and again after its shape changes).
    case relation(PgOutputRelation)
    /// A new row: its columns' values in text form, `nil` for NULL, in the order of the relation's columns.
    case insert(relationID: UInt32, values: [String?])
    /// Any other message (type, origin, update, delete, truncate, logical message), by its kind byte.
    case other(kind: UInt8)

    public static func decode(_ bytes: [UInt8]) throws(PQError) -> PgOutputMessage {
        var reader = ByteReader(bytes, what: "pgoutput message")
        let kind = try reader.byte()
        switch kind {
        case UInt8(ascii: "B"):
            let finalLSN = PostgresLSN(try reader.uint64())
            let time = PostgresEpoch.date(microseconds: Int64(bitPattern: try reader.uint64()))
            return .begin(finalLSN: finalLSN, commitTime: time, xid: try reader.uint32())
        case UInt8(ascii: "C"):
            _ = try reader.byte()  // flags, unused
            let commitLSN = PostgresLSN(try reader.uint64())
            let endLSN = PostgresLSN(try reader.uint64())
            let time = PostgresEpoch.date(microseconds: Int64(bitPattern: try reader.uint64()))
            return .commit(commitLSN: commitLSN, endLSN: endLSN, commitTime: time)
        case UInt8(ascii: "R"):
            let id = try reader.uint32()
            let namespace = try reader.string()
            let name = try reader.string()
            _ = try reader.byte()  // replica identity
            let count = Int(try reader.uint16())
            var columns: [String] = []
            var types: [PQType] = []
            columns.reserveCapacity(count)
            types.reserveCapacity(count)
            for _ in 0..<count {
                _ = try reader.byte()  // flags (part of the key)
                columns.append(try reader.string())
                types.append(PQType(oid: try reader.uint32()))
                _ = try reader.uint32()  // type modifier
            }
            return .relation(PgOutputRelation(id: id, namespace: namespace, name: name, columns: columns, types: types))
        case UInt8(ascii: "I"):
            let relation = try reader.uint32()
            guard try reader.byte() == UInt8(ascii: "N") else {
                throw PQError(code: .decoding, message: "pgoutput insert without a new tuple")
            }
            return .insert(relationID: relation, values: try reader.tuple())
        default:
            return .other(kind: kind)
        }
    }
}

/// A table as `pgoutput` describes it.
public struct PgOutputRelation: Sendable, Hashable {
    /// The table's OID: later messages name the table by it.
    public var id: UInt32
    public var namespace: String
    public var name: String
    /// Column names, in the order of the values of inserts.
    public var columns: [String]
    public var types: [PQType]

    public init(id: UInt32, namespace: String, name: String, columns: [String], types: [PQType]) {
        precondition(columns.count == types.count, "one type per column")
        self.id = id
        self.namespace = namespace
        self.name = name
        self.columns = columns
        self.types = types
    }

    /// An inserted row's values as a ``PQRow``, decoded like a query's rows.
    /// - Throws: ``PQError/Code/decoding`` when the number of values is not the number of columns.
    public func row(_ values: [String?]) throws(PQError) -> PQRow {
        guard values.count == columns.count else {
            throw PQError(
                code: .decoding, message: "an insert into \(namespace).\(name) has \(values.count) values for \(columns.count) columns")
        }
        return PQRow(columns: PQColumns(names: columns, types: types), cells: values)
    }
}

/// PostgreSQL's timestamps count microseconds from 2000-01-01 00:00 UTC.
enum PostgresEpoch {
    private static let unixSeconds: Int64 = 946_684_800

    static func date(microseconds: Int64) -> Date {
        Date(timeIntervalSince1970: Double(unixSeconds) + Double(microseconds) / 1_000_000)
    }

    static func microseconds(_ date: Date) -> Int64 {
        Int64((date.timeIntervalSince1970 - Double(unixSeconds)) * 1_000_000)
    }
}

/// Big-endian reads with bounds checks: a short or malformed message is an error, never a crash.
private struct ByteReader {
    private let bytes: [UInt8]
    private let what: String
    private var index = 0

    init(_ bytes: [UInt8], what: String) {
        self.bytes = bytes
        self.what = what
    }

    private func need(_ count: Int) throws(PQError) {
        guard bytes.count - index >= count else {
            throw PQError(
                code: .decoding, message: "\(what) ends early: \(count) more bytes expected at byte \(index) of \(bytes.count)")
        }
    }

    mutating func byte() throws(PQError) -> UInt8 {
        try need(1)
        defer { index += 1 }
        return bytes[index]
    }

    private mutating func integer(_ size: Int) throws(PQError) -> UInt64 {
        try need(size)
        var value: UInt64 = 0
        for offset in 0..<size { value = value << 8 | UInt64(bytes[index + offset]) }
        index += size
        return value
    }

    mutating func uint16() throws(PQError) -> UInt16 { UInt16(try integer(2)) }
    mutating func uint32() throws(PQError) -> UInt32 { UInt32(try integer(4)) }
    mutating func uint64() throws(PQError) -> UInt64 { try integer(8) }

    /// A NUL-terminated string.
    mutating func string() throws(PQError) -> String {
        guard let end = bytes[index...].firstIndex(of: 0) else {
            throw PQError(code: .decoding, message: "\(what): a string has no terminating NUL")
        }
        defer { index = end + 1 }
        return String(decoding: bytes[index..<end], as: UTF8.self)
    }

    /// TupleData: a count, then per column 'n' (NULL), 'u' (unchanged TOAST value), 't' (text) or 'b' (binary).
    mutating func tuple() throws(PQError) -> [String?] {
        let count = Int(try uint16())
        var values: [String?] = []
        values.reserveCapacity(count)
        for column in 0..<count {
            switch try byte() {
            case UInt8(ascii: "n"):
                values.append(nil)
            case UInt8(ascii: "t"):
                let length = Int(try uint32())
                try need(length)
                values.append(String(decoding: bytes[index..<index + length], as: UTF8.self))
                index += length
            case let kind:
                throw PQError(
                    code: .decoding,
                    message: "\(what): column \(column + 1) has value kind \(Character(Unicode.Scalar(kind))); only text and NULL are expected in an insert")
            }
        }
        return values
    }

    func rest() -> [UInt8] { Array(bytes[index...]) }
}
