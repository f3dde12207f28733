import Foundation
import LibPQ
import Synchronization
import TestSupport
import Testing

@Suite("PostgreSQL connection (real server)")
struct PQConnectionTests {
    @Test("every supported type survives a round trip through a table")
    func roundTripOfEveryType() async throws {
        let schema = try await TestSchema.create()
        let connection = try await PQConnection.connect(to: schema.url)
        try await connection.executeScript(
            """
            CREATE TABLE sample (
                t text, i4 int4, i8 int8, b bool, u uuid, ts timestamptz, j jsonb, bin bytea, nothing text
            )
            """)
        let tricky = #"it's "quoted" \back\slash\ 'again'; DROP TABLE sample; -- 🏦💸 ünïcödé"#
        let big = String(repeating: "abcdefghij", count: 100_000) + "🙂"  // ~1 MB
        let id = UUID()
        let moment = Date(timeIntervalSince1970: 1_764_071_548.123456)
        let bytes: [UInt8] = [0, 1, 2, 0x7f, 0x80, 0xfe, 0xff, 0]
        let json = #"{"amount": 12345, "note": "a \"quoted\" note", "tags": ["x", "🙂"]}"#
        for text in [tricky, big, ""] {
            try await connection.execute(
                "INSERT INTO sample VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                [.text(text), .int32(-2_147_483_648), .int64(9_223_372_036_854_775_807), .bool(true), .uuid(id),
                 .timestamp(moment), .jsonb(json), .bytea(bytes), .null],
                statement: "insert-sample")
        }
        let rows = try await connection.query("SELECT * FROM sample", statement: "select-sample")
        #expect(rows.count == 3)
        #expect(try rows.map { try $0.decode(String.self, "t") } == [tricky, big, ""])
        for row in rows {
            #expect(try row.decode(Int32.self, "i4") == Int32.min)
            #expect(try row.decode(Int64.self, "i8") == Int64.max)
            #expect(try row.decode(Bool.self, "b") == true)
            #expect(try row.decode(UUID.self, "u") == id)
            let decoded = try row.decode(Date.self, "ts")
            #expect(abs(decoded.timeIntervalSince1970 - moment.timeIntervalSince1970) < 0.000_001)
            #expect(try row.decode([UInt8].self, "bin") == bytes)
            #expect(try row.decodeIfPresent(String.self, "nothing") == nil)
            let jsonText = try row.decode(String.self, "j")
            let parsed = try JSONSerialization.jsonObject(with: Data(jsonText.utf8)) as? [String: Any]
            #expect(parsed?["amount"] as? Int == 12345)
            #expect(parsed?["note"] as? String == #"a "quoted" note"#)
        }
        try await schema.drop()
    }

    @Test("arrays bind as int8[], int4[] and text[]: one statement shape for any count; any text survives")
    func integerArrays() async throws {
        let schema = try await TestSchema.create()
        let connection = try await PQConnection.connect(to: schema.url)
        for ids in [[Int64](), [Int64.min, -1, 0, 42, Int64.max], Array(1...2000)] {
            let parts = ids.map { Int32(truncatingIfNeeded: $0 % 1000) }
            let rows = try await connection.query(
                "SELECT d.id, d.p FROM unnest($1::bigint[], $2::int[]) WITH ORDINALITY AS d(id, p, n) ORDER BY d.n",
                [.int64Array(ids), .int32Array(parts)], statement: "unnest arrays")
            #expect(try rows.map { try $0.decode(Int64.self, "id") } == ids)
            #expect(try rows.map { try $0.decode(Int32.self, "p") } == parts)
        }
        let texts = ["", "plain", #"it's "quoted" \back\slash\"#, "{braces},commas", "NULL", "🏦 ünïcödé", " spaced "]
        let echoed = try await connection.query(
            "SELECT t FROM unnest($1::text[]) WITH ORDINALITY AS d(t, n) ORDER BY n", [.textArray(texts)])
        #expect(try echoed.map { try $0.decode(String.self, "t") } == texts)
        try await schema.drop()
    }

    @Test("queryOne: the row when there is one; an error naming the statement when there is none (never a trap)")
    func queryOne() async throws {
        let connection = try await PQConnection.connect(to: try TestEnvironment.databaseURL())
        #expect(try await connection.queryOne("SELECT 41 + 1 AS n", statement: "answer").decode(Int.self, "n") == 42)
        do {
            _ = try await connection.queryOne("SELECT 1 WHERE false", statement: "nothing here")
            Issue.record("no row must be an error")
        } catch let error as PQError {
            #expect(error.code == .noRow && "\(error)".contains("nothing here"), "\(error)")
        }
        await connection.close()
    }

    @Test("a NUL byte in text is refused with a clear error, not truncated")
    func nulByteIsRefused() async throws {
        let connection = try await PQConnection.connect(to: try TestEnvironment.databaseURL())
        let error = await #expect(throws: PQError.self) {
            try await connection.query("SELECT $1::text", [.text("before\u{0}after")], statement: "nul-check")
        }
        #expect(error?.code == .invalidBind)
        #expect(error?.statement == "nul-check")
        #expect(error?.description.contains("NUL") == true)
        // The connection is still usable afterwards.
        let rows = try await connection.query("SELECT 1 AS one")
        #expect(try rows.first?.decode(Int.self, "one") == 1)
    }

    @Test("a unique violation carries SQLSTATE 23505, the constraint and the statement's name")
    func uniqueViolation() async throws {
        let schema = try await TestSchema.create()
        let connection = try await PQConnection.connect(to: schema.url)
        try await connection.executeScript("CREATE TABLE widget (id text CONSTRAINT widget_pk PRIMARY KEY)")
        try await connection.execute("INSERT INTO widget VALUES ($1)", [.text("kim@example.com")], statement: "insert-widget")
        let error = await #expect(throws: PQError.self) {
            try await connection.execute("INSERT INTO widget VALUES ($1)", [.text("kim@example.com")], statement: "insert-widget")
        }
        // The row's value is in the server's DETAIL: kept for debugging, out of what gets logged.
        #expect(error?.detail?.contains("kim@example.com") == true)
        #expect(error?.description.contains("kim@example.com") == false)
        #expect(error?.description.contains("widget_pk") == true)
        #expect(error?.debugDescription.contains("kim@example.com") == true)
        #expect(error?.sqlState == "23505")
        #expect(error?.isUniqueViolation == true)
        #expect(error?.constraint == "widget_pk")
        #expect(error?.statement == "insert-widget")
        #expect(error?.description.contains("insert-widget") == true)
        try await schema.drop()
    }

    @Test("a transaction whose body throws leaves nothing behind")
    func transactionRollsBack() async throws {
        struct Abort: Error {}
        let schema = try await TestSchema.create()
        let connection = try await PQConnection.connect(to: schema.url)
        try await connection.executeScript("CREATE TABLE entry (n int4)")
        await #expect(throws: Abort.self) {
            try await connection.withTransaction { tx in
                try await tx.execute("INSERT INTO entry VALUES ($1)", [.int32(1)])
                try await tx.execute("INSERT INTO entry VALUES ($1)", [.int32(2)])
                throw Abort()
            }
        }
        // A server error inside the body rolls back as well.
        await #expect(throws: PQError.self) {
            try await connection.withTransaction { tx in
                try await tx.execute("INSERT INTO entry VALUES ($1)", [.int32(3)])
                try await tx.execute("INSERT INTO entry VALUES ($1)", [.text("not a number")])
            }
        }
        let count = try await connection.query("SELECT count(*) AS n FROM entry").first?.decode(Int.self, "n")
        #expect(count == 0)
        try await connection.withTransaction { tx in try await tx.execute("INSERT INTO entry VALUES (4)") }
        let after = try await connection.query("SELECT count(*) AS n FROM entry").first?.decode(Int.self, "n")
        #expect(after == 1)
        try await schema.drop()
    }

    @Test("NOTIFY wakes a listener waiting on LISTEN")
    func listenNotify() async throws {
        let url = try TestEnvironment.databaseURL()
        let channel = uniqueName("wake \"up\"")  // quotes in a channel name are handled
        let listener = try await PQConnection.connect(to: url)
        try await listener.listen(channel)
        let sender = try await PQConnection.connect(to: url)
        let received = Task {
            let deadline = ContinuousClock.now + .seconds(20)
            while ContinuousClock.now < deadline {
                if let first = try await listener.notifications(timeout: .milliseconds(500)).first { return first }
            }
            throw DeadlineExceeded(what: "a notification on \(channel)", timeout: .seconds(20))
        }
        try await sender.withTransaction { tx in try await tx.notify(channel, payload: "payload ✓") }
        let notification = try await received.value
        #expect(notification.channel == channel)
        #expect(notification.payload == "payload ✓")
    }

    @Test("a bad URL fails with connectionFailed and a readable message without the password")
    func connectionFailure() async throws {
        let error = await #expect(throws: PQError.self) {
            try await PQConnection.connect(to: "postgresql://someone:secret@127.0.0.1:1/nowhere")
        }
        #expect(error?.code == .connectionFailed)
        #expect(error?.description.contains("secret") == false)
        #expect(error?.description.contains("127.0.0.1") == true)
    }

    @Test("decoding a value into the wrong type names the column and type")
    func decodingError() async throws {
        let connection = try await PQConnection.connect(to: try TestEnvironment.databaseURL())
        let row = try #require(try await connection.query("SELECT 'abc'::text AS word, NULL::int8 AS missing").first)
        let wrongType = #expect(throws: PQError.self) { try row.decode(Int.self, "word") }
        #expect(wrongType?.code == .decoding)
        #expect(wrongType?.description.contains("word") == true)
        let null = #expect(throws: PQError.self) { try row.decode(Int.self, "missing") }
        #expect(null?.description.contains("NULL") == true)
        #expect(throws: PQError.self) { try row.decode(Int.self, "nonexistent") }
    }
}

@Suite("PostgreSQL pool (real server)")
struct PQPoolTests {
    @Test("never opens more than maxConnections and serves every caller")
    func bounded() async throws {
        let pool = PQPool(url: try TestEnvironment.databaseURL(), maxConnections: 3)
        let backends = Locked<Set<Int32>>([])
        let results = try await withThrowingTaskGroup(of: Int.self) { group in
            for n in 0..<24 {
                group.addTask {
                    try await pool.withConnection { connection in
                        let row = try await connection.query(
                            "SELECT pg_backend_pid() AS pid, $1::int4 AS n, pg_sleep(0.01)", [.int(n)]
                        ).first!
                        let pid = try row.decode(Int32.self, "pid")
                        backends.withLock { _ = $0.insert(pid) }
                        return try row.decode(Int.self, "n")
                    }
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(Set(results) == Set(0..<24))
        #expect(backends.withLock { $0.count } <= 3)
        await pool.close()
    }

    @Test("a connection killed by the server is replaced; the next request succeeds")
    func recoversFromTerminatedBackend() async throws {
        let url = try TestEnvironment.databaseURL()
        let pool = PQPool(url: url, maxConnections: 1)
        let pid = try await pool.withConnection { try await $0.query("SELECT pg_backend_pid() AS pid").first!.decode(Int32.self, "pid") }
        let admin = try await PQConnection.connect(to: url)
        try await admin.query("SELECT pg_terminate_backend($1)", [.int32(pid)])
        let error = await #expect(throws: PQError.self) {
            try await pool.withConnection { try await $0.query("SELECT 1") }
        }
        #expect(error?.isConnectionProblem == true)
        let newPID = try await pool.withConnection {
            try await $0.query("SELECT pg_backend_pid() AS pid").first!.decode(Int32.self, "pid")
        }
        #expect(newPID != pid)
        await pool.close()
    }
}

@Suite("prepared statements (real server)")
struct PreparedStatementTests {
    @Test("a repeated statement is prepared once and keeps working when its table is recreated with other columns")
    func survivesSchemaChange() async throws {
        let schema = try await TestSchema.create()
        let connection = try await PQConnection.connect(to: schema.url)
        try await connection.executeScript("CREATE TABLE item (id int4, name text)")
        for n in 0..<50 {
            try await connection.execute("INSERT INTO item VALUES ($1, $2)", [.int32(Int32(n)), .text("n\(n)")])
        }
        #expect(try await connection.query("SELECT * FROM item WHERE id = $1", [.int32(7)]).first?.decode(String.self, "name") == "n7")
        let prepared = try await connection.query("SELECT count(*) AS n FROM pg_prepared_statements").first!.decode(Int.self, "n")
        #expect(prepared >= 2)

        try await connection.executeScript("DROP TABLE item; CREATE TABLE item (id int4, name text, extra bool DEFAULT true)")
        try await connection.execute("INSERT INTO item VALUES ($1, $2)", [.int32(7), .text("again")])
        let row = try #require(try await connection.query("SELECT * FROM item WHERE id = $1", [.int32(7)]).first)
        #expect(try row.decode(String.self, "name") == "again")
        #expect(try row.decode(Bool.self, "extra"))
        try await schema.drop()
    }

    @Test("a statement that does not parse reports its SQLSTATE and name, and the connection stays usable")
    func badStatement() async throws {
        let connection = try await PQConnection.connect(to: try TestEnvironment.databaseURL())
        let error = await #expect(throws: PQError.self) {
            try await connection.query("SELEKT $1::int4", [.int32(1)], statement: "typo")
        }
        #expect(error?.sqlState == "42601")
        #expect(error?.statement == "typo")
        #expect(try await connection.query("SELECT $1::int4 AS one", [.int32(1)]).first?.decode(Int.self, "one") == 1)
    }
}

@Suite("SQL identifiers")
struct SQLIdentifierTests {
    @Test("quoting makes any name one identifier; plain names are lower-case ASCII")
    func identifiers() async throws {
        #expect(SQLIdentifier.quoted("account_balances") == "\"account_balances\"")
        #expect(SQLIdentifier.quoted("a\"; DROP TABLE x; --") == "\"a\"\"; DROP TABLE x; --\"")
        for plain in ["a", "account_balances", "_x9"] { #expect(SQLIdentifier.isPlain(plain), "\(plain)") }
        for bad in ["", "9a", "Upper", "with space", "a;b", "a\"b", "ü", String(repeating: "a", count: 64)] {
            #expect(!SQLIdentifier.isPlain(bad), "\(bad)")
        }
        // A hostile name stays one identifier on the server.
        let schema = try await TestSchema.create()
        let connection = try await PQConnection.connect(to: schema.url)
        let name = "weird \"name\"; DROP TABLE x; --"
        try await connection.executeScript("CREATE TABLE \(SQLIdentifier.quoted(name)) (id int)")
        #expect(try await connection.query("SELECT to_regclass($1) IS NOT NULL AS present", [.text(SQLIdentifier.quoted(name))])
            .first!.decode(Bool.self, "present"))
        try await schema.drop()
    }
}

@Suite("bounded waits: cancellation, close, timeouts (real PostgreSQL)")
struct BoundedWaitTests {
    @Test("cancelling the task cancels the statement on the server (SQLSTATE 57014); the connection stays usable")
    func cancellation() async throws {
        let name = uniqueName("cancel")
        let url = try TestEnvironment.databaseURL() + "&application_name=\(name)"
        let connection = try await PQConnection.connect(to: url)
        let observer = try await PQConnection.connect(to: try TestEnvironment.databaseURL())
        let sleeping = Task { try await connection.query("SELECT pg_sleep(60)") }
        try await waitUntil("the statement runs on the server") {
            try await observer.query(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                [.text(name)]
            ).first!.decode(Int.self, "n") == 1
        }
        sleeping.cancel()
        let finished = Locked(false)
        let outcome = Task {
            defer { finished.withLock { $0 = true } }
            return await sleeping.result
        }
        try await waitUntil("the statement ends well before its 60 s") { finished.value }
        guard case .failure(let error) = await outcome.value else {
            Issue.record("the cancelled statement succeeded")
            return
        }
        #expect((error as? PQError)?.sqlState == "57014", "\(error)")
        #expect(try await connection.query("SELECT 1 AS one").first!.decode(Int.self, "one") == 1)
    }

    @Test("close() ends the session (its advisory lock is released without waiting for the object to go) and later calls fail clearly")
    func explicitClose() async throws {
        let url = try TestEnvironment.databaseURL()
        let holder = try await PQConnection.connect(to: url)
        let key = Int64.random(in: 1...Int64.max)
        try await holder.query("SELECT pg_advisory_lock($1)", [.int64(key)])
        let other = try await PQConnection.connect(to: url)
        #expect(try await !other.query("SELECT pg_try_advisory_lock($1) AS got", [.int64(key)]).first!.decode(Bool.self, "got"))
        await holder.close()
        await holder.close()
        #expect(holder.isBroken)
        // The server ends the session when it reads the termination message, a moment later.
        try await waitUntil("the lock is free once the session ended") {
            try await other.query("SELECT pg_try_advisory_lock($1) AS got", [.int64(key)]).first!.decode(Bool.self, "got")
        }
        await #expect { try await holder.query("SELECT 1") } throws: { ($0 as? PQError)?.code == .connectionLost }
    }

    @Test("a pool whose connections are all busy fails a waiter after acquireTimeout, then serves again")
    func poolAcquireTimeout() async throws {
        let pool = PQPool(url: try TestEnvironment.databaseURL(), maxConnections: 1, acquireTimeout: .milliseconds(300))
        let release = Locked(false)
        let holding = Locked(false)
        let holder = Task {
            try await pool.withConnection { _ in
                holding.withLock { $0 = true }
                while !release.value { try await Task.sleep(for: .milliseconds(10)) }
            }
        }
        try await waitUntil("the only connection is taken") { holding.value }
        await #expect { try await pool.withConnection { _ in } } throws: { error in
            (error as? PQError)?.code == .timeout && "\(error)".contains("all 1 are in use")
        }
        release.withLock { $0 = true }
        try await holder.value
        #expect(try await pool.withConnection { try await $0.query("SELECT 1 AS one").first!.decode(Int.self, "one") } == 1)
        await pool.close()
    }

    @Test("a server that accepts the connection but never answers: connect_timeout from the URL ends the wait")
    func connectTimeout() async throws {
        // A listening socket nobody accepts from: the kernel completes the handshake, nothing ever replies.
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { Glibc.close(listener) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        #expect(listen(listener, 8) == 0)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        let port = UInt16(bigEndian: address.sin_port)
        let attempt = Task { try await PQConnection.connect(to: "postgresql://nobody@127.0.0.1:\(port)/db?connect_timeout=1") }
        let finished = Locked(false)
        let outcome = Task {
            defer { finished.withLock { $0 = true } }
            return await attempt.result
        }
        // Without the URL's 1 s (or with the 10 s default winning over it) this deadline passes first.
        try await waitUntil("connect gives up", timeout: .seconds(8)) { finished.value }
        guard case .failure(let error) = await outcome.value else {
            Issue.record("connected to a server that never answers")
            return
        }
        #expect((error as? PQError)?.code == .connectionFailed, "\(error)")
    }

    @Test("statement_timeout from the URL's options ends a long statement with a clear error")
    func statementTimeout() async throws {
        let connection = try await PQConnection.connect(to: try TestEnvironment.databaseURL() + "&options=-cstatement_timeout%3D200")
        await #expect { try await connection.query("SELECT pg_sleep(30)", statement: "long sleep") } throws: { error in
            guard let error = error as? PQError else { return false }
            return error.sqlState == "57014" && "\(error)".contains("long sleep") && "\(error)".contains("statement timeout")
        }
    }
}
