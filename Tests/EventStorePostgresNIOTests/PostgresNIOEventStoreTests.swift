import BankDomain
import EventSourcing
import EventStore
import EventStorePostgresNIO
import EventStoreSQL
import Foundation
import LibPQ
import Logging
import PostgresNIO
import PostgresNIOLedger
import Testing
import TestSupport

/// postgres-nio appends on a real PostgreSQL server, beside the libpq `EventStore` on the same tables.
@Suite(.serialized)
struct PostgresNIOEventStoreTests {
    let logger = Logger(label: "nio-test")

    /// Fixed ids and times, a stream id full of quotes, and a traceparent: everything the rows carry.
    static func sampleEvents() -> [NewEvent] {
        let base = Date(timeIntervalSince1970: 1_767_000_000.123456)
        return [
            NewEvent(
                AccountOpened(owner: "O'Brien \"the\" owner", initialDeposit: 10),
                metadata: EventMetadata(correlationID: "c-1", actor: "tester"),
                eventID: UUID(uuidString: "00000000-0000-4000-8000-000000000001")!, occurredAt: base),
            NewEvent(
                MoneyDeposited(amount: 5, description: "ünïcode ☃ and 'quotes'"),
                metadata: EventMetadata(traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                eventID: UUID(uuidString: "00000000-0000-4000-8000-000000000002")!, occurredAt: base.addingTimeInterval(1.5)),
        ]
    }

    static let routing = OutboxRouting(topicByCategory: [Account.category: BankEvents.topic])

    @Test("the events and outbox rows are the same bytes as the libpq EventStore writes")
    func sameRowsAsLibPQ() async throws {
        let viaLibPQ = try await TestEventStore.create(routing: Self.routing)
        let viaNIO = try await TestEventStore.create(routing: Self.routing)
        let streamID = #"acc-'; DROP TABLE events; --"quoted""#
        try await viaLibPQ.store.append(Self.sampleEvents(), to: streamID, category: Account.category, expectedVersion: .noStream)
        try await withNIOClient(viaNIO.schema) { client in
            try await client.withConnection { connection in
                let result = try await PostgresNIOEventStore(routing: Self.routing).append(
                    Self.sampleEvents(), to: streamID, category: Account.category, expectedVersion: .noStream,
                    on: connection, logger: logger)
                #expect(result == AppendResult(streamVersion: 2, positions: [1, 2]))
            }
        }
        let events = "SELECT row_to_json(e)::text FROM events e ORDER BY position"
        let outbox = "SELECT row_to_json(o)::text FROM (SELECT id, event_id, stream_id, stream_version, topic, message_key, "
            + "envelope, headers FROM outbox ORDER BY id) o"
        for sql in [events, outbox] {
            let expected = try await texts(sql, viaLibPQ.pool)
            #expect(expected.count == 2)
            #expect(try await texts(sql, viaNIO.pool) == expected)
        }
        // Either reader reads what either writer wrote.
        let readByNIO = try await withNIOClient(viaLibPQ.schema) { client in
            try await client.withConnection { try await PostgresNIOEventStore().readStream(streamID, on: $0, logger: logger) }
        }
        #expect(readByNIO == (try await viaNIO.store.readStream(streamID)))
        #expect(readByNIO.map(\.eventID) == Self.sampleEvents().map(\.eventID))
        try await viaLibPQ.drop()
        try await viaNIO.drop()
    }

    @Test("the caller's own write and the events commit together, or neither does")
    func ownTransaction() async throws {
        let test = try await TestEventStore.create()
        try await test.pool.withConnection { try await $0.executeScript("CREATE TABLE receipts (reference text PRIMARY KEY)") }
        struct Refused: Error {}
        try await withNIOClient(test.schema) { client in
            try await client.withConnection { connection in
                await #expect(throws: PostgresTransactionError.self) {
                    try await connection.withTransaction(logger: logger) { tx in
                        try await tx.query("INSERT INTO receipts VALUES ('r-1')", logger: logger)
                        try await PostgresNIOEventStore().append(
                            Self.sampleEvents(), to: "rolled-back", category: "account", expectedVersion: .noStream,
                            on: tx, logger: logger)
                        throw Refused()
                    }
                }
                try await connection.withTransaction(logger: logger) { tx in
                    try await tx.query("INSERT INTO receipts VALUES ('r-2')", logger: logger)
                    try await PostgresNIOEventStore().append(
                        Self.sampleEvents(), to: "committed", category: "account", expectedVersion: .noStream,
                        on: tx, logger: logger)
                }
            }
        }
        #expect(try await test.count("SELECT count(*) FROM receipts WHERE reference = 'r-1'") == 0)
        #expect(try await test.count("SELECT count(*) FROM events WHERE stream_id = 'rolled-back'") == 0)
        #expect(try await test.count("SELECT count(*) FROM receipts WHERE reference = 'r-2'") == 1)
        #expect(try await test.count("SELECT count(*) FROM events WHERE stream_id = 'committed'") == 2)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE stream_id = 'committed'") == 2)
        try await test.drop()
    }

    @Test("a wrong expected version writes nothing and leaves the caller's transaction usable")
    func versionCheck() async throws {
        let test = try await TestEventStore.create()
        let store = PostgresNIOEventStore()
        let events = Self.sampleEvents()
        try await withNIOClient(test.schema) { client in
            try await client.withConnection { connection in
                try await store.append([events[0]], to: "s", category: "account", expectedVersion: .noStream, on: connection, logger: logger)
                try await connection.withTransaction(logger: logger) { tx in
                    let conflict = await #expect(throws: ConcurrencyConflict.self) {
                        try await store.append([events[1]], to: "s", category: "account", expectedVersion: .exact(7), on: tx, logger: logger)
                    }
                    #expect(conflict?.actual == 1)
                    #expect(conflict?.expected == .exact(7))
                    // The transaction goes on: the right version appends in it.
                    let result = try await store.append(
                        [events[1]], to: "s", category: "account", expectedVersion: .exact(1), on: tx, logger: logger)
                    #expect(result.streamVersion == 2)
                }
                let more = NewEvent(MoneyDeposited(amount: 1, description: ""))
                #expect(try await store.append([more], to: "s", category: "account", expectedVersion: .any, on: connection, logger: logger).streamVersion == 3)
                #expect(try await store.currentVersion(of: "s", on: connection, logger: logger) == 3)
                #expect(try await store.currentVersion(of: "no such stream", on: connection, logger: logger) == 0)
            }
        }
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE stream_id = 's'") == 3)
        try await test.drop()
    }

    /// Opens a transaction on `connection` whose append to `streamID` (as a new stream) is left uncommitted,
    /// then starts a second append of the same stream on `other`, which blocks on the first one's row. Returns
    /// once the second waits on the lock, with its task and backend pid.
    private func raceForTheFirstVersion(
        _ test: TestEventStore, _ streamID: String, first: PostgresConnection, second: PostgresConnection
    ) async throws -> (waiting: Task<AppendResult, any Error>, pid: Int32) {
        let store = PostgresNIOEventStore()
        let events = Self.sampleEvents()
        try await first.query("BEGIN", logger: logger)
        try await store.append([events[0]], to: streamID, category: "account", expectedVersion: .noStream, on: first, logger: logger)
        var pid: Int32 = 0
        for try await value in try await second.query("SELECT pg_backend_pid()", logger: logger).decode(Int32.self) { pid = value }
        try await second.query("BEGIN", logger: logger)
        let logger = logger
        let waiting = Task {
            try await store.append([events[1]], to: streamID, category: "account", expectedVersion: .noStream, on: second, logger: logger)
        }
        try await waitUntil("the second append waits for the first one's row") {
            try await test.count("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'", [.int32(pid)]) == 1
        }
        return (waiting, pid)
    }

    @Test("two appends race for a new stream's first version: the loser gets a ConcurrencyConflict (not a raw unique violation), the winner's event stays")
    func lostRaceIsAConflict() async throws {
        let test = try await TestEventStore.create()
        let streamID = #"race-'"quoted""#
        try await withNIOClient(test.schema) { client in
            try await client.withConnection { first in
                try await client.withConnection { second in
                    let (waiting, _) = try await raceForTheFirstVersion(test, streamID, first: first, second: second)
                    try await first.query("COMMIT", logger: logger)
                    let conflict = await #expect(throws: ConcurrencyConflict.self) { try await waiting.value }
                    #expect(conflict?.streamID == streamID)
                    #expect(conflict?.expected == .noStream)
                    #expect(conflict?.actual == 1)
                    try await second.query("ROLLBACK", logger: logger)
                }
            }
        }
        #expect(try await test.count("SELECT count(*) FROM events WHERE stream_id = $1", [.text(streamID)]) == 1)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE stream_id = $1", [.text(streamID)]) == 1)
        try await test.drop()
    }

    @Test("a connection terminated while its append waits: the append throws, nothing of it is written, the other transaction commits")
    func connectionDroppedMidAppend() async throws {
        let test = try await TestEventStore.create()
        let streamID = "dropped"
        try await withNIOClient(test.schema) { client in
            try await client.withConnection { first in
                try await client.withConnection { second in
                    let (waiting, pid) = try await raceForTheFirstVersion(test, streamID, first: first, second: second)
                    #expect(try await test.count("SELECT count(*) FROM (SELECT pg_terminate_backend($1)) t", [.int32(pid)]) == 1)
                    await #expect(throws: (any Error).self) { try await waiting.value }
                    try await first.query("COMMIT", logger: logger)
                }
            }
        }
        let versions = try await test.pool.withConnection { connection in
            try await connection.query("SELECT stream_version FROM events WHERE stream_id = $1", [.text(streamID)]).map { try $0.decode(Int64.self, at: 0) }
        }
        #expect(versions == [1])
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE stream_id = $1", [.text(streamID)]) == 1)
        try await test.drop()
    }

    @Test("metadata that is not an EventMetadata object is an error naming the event, never empty metadata")
    func badMetadata() async throws {
        let test = try await TestEventStore.create()
        try await test.pool.withConnection { connection in
            try await connection.execute(
                "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata, occurred_at) "
                    + "VALUES ('00000000-0000-4000-8000-00000000000b', 'bad', 1, 'AccountOpened', 1, '{}', '[1]', now())")
        }
        try await withNIOClient(test.schema) { client in
            let error = await #expect(throws: EventDecodingError.self) {
                try await client.withConnection { try await PostgresNIOEventStore().readStream("bad", on: $0, logger: logger) }
            }
            #expect(error?.streamID == "bad")
        }
        try await test.drop()
    }

    @Test("the example ledger: a receipt per deposit, a reference used twice deposits once, concurrent deposits all land")
    func exampleLedger() async throws {
        let test = try await TestEventStore.create()
        try await withNIOClient(test.schema) { client in
            let ledger = Ledger(client: client)
            try await ledger.createTables()
            let id = try await ledger.open(owner: "Ada")
            #expect(try await ledger.deposit(100, to: id, reference: "r-1") == 100)
            await #expect(throws: LedgerError.duplicateReference("r-1")) { try await ledger.deposit(100, to: id, reference: "r-1") }
            await #expect(throws: LedgerError.noAccount("nobody")) { try await ledger.deposit(1, to: "nobody", reference: "r-x") }
            await #expect(throws: LedgerError.invalidAmount(0)) { try await ledger.deposit(0, to: id, reference: "r-0") }
            // Eight deposits at once on one account: each conflict reloads and decides again, none is lost.
            try await withThrowingTaskGroup(of: Void.self) { group in
                for n in 1...8 { group.addTask { _ = try await ledger.deposit(Int64(n), to: id, reference: "c-\(n)") } }
                try await group.waitForAll()
            }
            let (account, version) = try await ledger.account(id)
            #expect(account.balance == 100 + 36)
            #expect(version == 10)
        }
        #expect(try await test.count("SELECT count(*) FROM ledger_receipts") == 9)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE topic = '\(BankEvents.topic)'") == 10)
        // The libpq side reads the same account: one database, two drivers.
        #expect(try await test.count("SELECT count(DISTINCT stream_version) FROM events") == 10)
        try await test.drop()
    }

    @Test("end to end: the ledger's events, written through postgres-nio, reach Kafka through the unchanged outbox-relay, and account-projector's balances are the ledger's")
    func relayAndProjectorUnchanged() async throws {
        let test = try await TestEventStore.create()
        let topic = uniqueName("ledger")
        let brokers = try TestEnvironment.kafkaBrokers()
        let env = ["EVENTOUTBOX_DATABASE_URL": test.schema.url, "KAFKA_BROKERS": brokers]
        let log = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("ledger-e2e") + ".log")
        // The projector first, so that its back-fill finds nothing: every balance below comes through Kafka.
        let projector = try Tools.start(
            "account-projector",
            ["--group", uniqueName("ledger-projector"), "--topic", topic, "--kafka-property", "allow.auto.create.topics=true",
             "--commit-interval", "0.2"],
            environment: env, output: log, appending: true)
        defer { projector.terminate() }
        try await waitUntil("the projector made its tables", timeout: .seconds(120)) {
            try await test.count("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'account_balances'") == 1
        }
        let relay = try Tools.start(
            "outbox-relay", ["--poll-interval", "0.2", "--lock-key", String(Int64.random(in: 1...Int64.max / 2))],
            environment: env, output: log, appending: true)
        defer { relay.terminate() }
        var expected: [String: Int64] = [:]
        try await withNIOClient(test.schema) { client in
            let ledger = Ledger(client: client, topic: topic)
            try await ledger.createTables()
            for owner in ["Ada", "O'Brien \"quoted\""] {
                let id = try await ledger.open(owner: owner)
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for n in 1...5 { group.addTask { _ = try await ledger.deposit(Int64(n), to: id, reference: "\(id)-\(n)") } }
                    try await group.waitForAll()
                }
                expected[id] = try await ledger.account(id).0.balance
            }
        }
        #expect(expected.values.sorted() == [15, 15])
        try await waitUntil("the projector's balances are the ledger's", timeout: .seconds(120)) {
            try await test.pool.withConnection { connection in
                Dictionary(uniqueKeysWithValues: try await connection.query("SELECT account_id, balance FROM account_balances").map {
                    (try $0.decode(String.self, "account_id"), try $0.decode(Int64.self, "balance"))
                })
            } == expected
        }
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE topic = $1", [.text(topic)]) == 12)
        relay.terminate()
        projector.terminate()
        try await waitUntil("the relay and the projector exit") { !relay.isRunning && !projector.isRunning }
        #expect(relay.terminationStatus == 0 && projector.terminationStatus == 0, "exit statuses; their log: \(log.path)")
        try await test.drop()
    }

    private func texts(_ sql: String, _ pool: PQPool) async throws -> [String] {
        try await pool.withConnection { try await $0.query(sql).map { try $0.decode(String.self, at: 0) } }
    }
}

/// Runs `body` with a running postgres-nio client on the test schema, then shuts the client down.
func withNIOClient<R: Sendable>(_ schema: TestSchema, _ body: (PostgresClient) async throws -> R) async throws -> R {
    // Quiet: the client warns when the body leases a connection before run() has started, which is harmless.
    var background = Logger(label: "nio-test-client")
    background.logLevel = .error
    let client = PostgresClient(
        configuration: try NIOTestConfiguration.configuration(url: schema.base, searchPath: schema.name),
        backgroundLogger: background)
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { await client.run() }
        defer { group.cancelAll() }
        return try await body(client)
    }
}

/// The test server's URL (`postgresql://user@host:port/db` or `postgresql:///db?host=/socket/dir&user=…`) as a
/// postgres-nio configuration.
enum NIOTestConfiguration {
    static func configuration(url: String, searchPath: String) throws -> PostgresClient.Configuration {
        guard let components = URLComponents(string: url) else { throw UnreadableTestURL(url: url) }
        let query = Dictionary((components.queryItems ?? []).map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { $1 })
        let user = query["user"] ?? components.user ?? "postgres"
        let password = query["password"] ?? components.password
        let database = String(components.path.dropFirst())
        let port = Int(query["port"] ?? "") ?? components.port ?? 5432
        let host = query["host"] ?? components.host ?? ""
        var configuration: PostgresClient.Configuration
        if host.isEmpty || host.hasPrefix("/") {
            configuration = .init(
                unixSocketPath: (host.isEmpty ? "/var/run/postgresql" : host) + "/.s.PGSQL.\(port)",
                username: user, password: password, database: database.isEmpty ? user : database)
        } else {
            configuration = .init(host: host, port: port, username: user, password: password, database: database, tls: .disable)
        }
        configuration.options.additionalStartupParameters = [("options", "-csearch_path=\(searchPath)")]
        return configuration
    }
}

struct UnreadableTestURL: Error, CustomStringConvertible {
    var url: String
    var description: String { "EVENTOUTBOX_DATABASE_URL is not a URL that a postgres-nio configuration can be made from: \(url)" }
}
