import EventStoreSQL
import Foundation
import EventStore
import OutboxRelayStore
import LibPQ
import Synchronization

/// A server a test needs was not given to it. Tests fail with this; they never skip.
public struct MissingTestServer: Error, CustomStringConvertible {
    public var variable: String
    public var description: String {
        "\(variable) is not set: run the tests with scripts/test, which starts PostgreSQL and the mock Kafka cluster"
    }
}

/// Where the servers started by `scripts/test` are.
public enum TestEnvironment {
    /// `EVENTOUTBOX_DATABASE_URL`.
    public static func databaseURL() throws -> String { try variable("EVENTOUTBOX_DATABASE_URL") }
    /// `KAFKA_BROKERS` (bootstrap servers of `kafka-mock-cluster`).
    public static func kafkaBrokers() throws -> String { try variable("KAFKA_BROKERS") }

    /// A second database on the test server, `eventoutbox_wal`, for tests that read the WAL (created on first
    /// use): logical decoding reads every change of its database, so these tests keep away from the DDL of
    /// all the others.
    public static func walDatabaseURL() async throws -> String {
        let base = try databaseURL()
        let admin = try await PQConnection.connect(to: base)
        // One creator at a time: concurrent CREATE DATABASE from template1 fails.
        try await admin.query("SELECT pg_advisory_lock(7240511099)")
        let exists = try await admin.query("SELECT 1 FROM pg_database WHERE datname = 'eventoutbox_wal'").count == 1
        if !exists { try await admin.executeScript("CREATE DATABASE eventoutbox_wal") }
        await admin.close()
        guard let range = base.range(of: "/eventoutbox?") else { return base }
        return base.replacingCharacters(in: range, with: "/eventoutbox_wal?")
    }

    private static func variable(_ name: String) throws -> String {
        guard let value = ProcessInfo.processInfo.environment[name], !value.isEmpty else {
            throw MissingTestServer(variable: name)
        }
        return value
    }
}

/// A name no other test uses (for schemas, topics, groups): `prefix_` plus 12 random hex digits.
public func uniqueName(_ prefix: String) -> String {
    prefix + "_" + String(UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(12)).lowercased()
}

/// A condition did not hold before its deadline.
public struct DeadlineExceeded: Error, CustomStringConvertible {
    public var what: String
    public var timeout: Duration
    public init(what: String, timeout: Duration) {
        self.what = what
        self.timeout = timeout
    }
    public var description: String { "waited \(timeout) for: \(what)" }
}

/// Re-checks `condition` until it holds; throws ``DeadlineExceeded`` after `timeout`.
public func waitUntil(
    _ what: String, timeout: Duration = .seconds(30), _ condition: () async throws -> Bool
) async throws {
    let deadline = ContinuousClock.now + timeout
    while !(try await condition()) {
        guard ContinuousClock.now < deadline else { throw DeadlineExceeded(what: what, timeout: timeout) }
        try await Task.sleep(for: .milliseconds(20))
    }
}

/// A schema of its own for one test; connections made from ``url`` use it as `search_path`.
public struct TestSchema: Sendable {
    public let name: String
    /// The test database URL with `search_path` set to this schema.
    public let url: String
    /// The database URL without the schema.
    public let base: String

    /// Creates a fresh schema in the test database (or in the database at `base`).
    public static func create(_ prefix: String = "t", base: String? = nil) async throws -> TestSchema {
        let base = try base ?? TestEnvironment.databaseURL()
        let name = uniqueName(prefix)
        let admin = try await PQConnection.connect(to: base)
        try await admin.executeScript("CREATE SCHEMA \(name)")
        let separator = base.contains("?") ? "&" : "?"
        return TestSchema(name: name, url: base + separator + "options=-csearch_path%3D\(name)", base: base)
    }

    /// Runs `body` with a pool on a fresh schema, then closes the pool and drops the schema, also when `body` throws.
    public static func withPool<R: Sendable>(
        _ prefix: String = "t", maxConnections: Int = 2, _ body: (PQPool) async throws -> R
    ) async throws -> R {
        let schema = try await create(prefix)
        let pool = PQPool(url: schema.url, maxConnections: maxConnections)
        do {
            let result = try await body(pool)
            await pool.close()
            try await schema.drop()
            return result
        } catch {
            // The body's failure is the one to report; a failed drop only leaves a schema behind.
            await pool.close()
            try? await schema.drop()
            throw error
        }
    }

    /// Drops the schema and everything in it.
    public func drop() async throws {
        let admin = try await PQConnection.connect(to: base)
        try await admin.executeScript("DROP SCHEMA \(name) CASCADE")
    }
}

/// A value shared between concurrent test tasks.
public final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    public init(_ value: Value) { mutex = Mutex(value) }
    public func withLock<R: Sendable>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
    public var value: Value { mutex.withLock { $0 } }
}

/// A migrated event store in a schema of its own.
public struct TestEventStore: Sendable {
    public let schema: TestSchema
    public let pool: PQPool
    public let store: EventStore

    /// - Parameters:
    ///   - acquireTimeout: the pool's longest wait for a connection. A test that queues more callers than
    ///     connections on purpose raises it: how long the queue takes depends on the machine, not on what is tested.
    ///   - modules: schema modules to apply beside the toolkit's (a service's own tables).
    public static func create(
        maxConnections: Int = 4, acquireTimeout: Duration = .seconds(30), routing: OutboxRouting = OutboxRouting(),
        databaseURL: String? = nil, modules: [SchemaModule] = []
    ) async throws -> TestEventStore {
        let schema = try await TestSchema.create("es", base: databaseURL)
        let pool = PQPool(url: schema.url, maxConnections: maxConnections, acquireTimeout: acquireTimeout)
        try await SchemaMigrator(EventOutboxSchema.modules + modules).migrate(pool)
        return TestEventStore(schema: schema, pool: pool, store: EventStore(pool: pool, routing: routing))
    }

    /// Runs one query on the test schema and returns an integer column of its first row.
    public func count(_ sql: String, _ binds: [PQBind] = []) async throws -> Int {
        try await pool.withConnection { try await $0.query(sql, binds).first!.decode(Int.self, at: 0) }
    }

    /// How many events `projection` holds, from its `_progress` table: the sum of each stream's highest applied
    /// version (a stream's events are numbered 1, 2, 3, … so this counts them once the stream is complete).
    public func projected(_ projection: String) async throws -> Int {
        try await count(
            "SELECT coalesce(sum(version), 0)::bigint FROM (SELECT max(last_version) AS version FROM \(projection)_progress GROUP BY stream_id) s")
    }

    public func drop() async throws {
        await pool.close()
        try await schema.drop()
    }
}

/// Ports handed out by ``testPort()``: from a random start, one after another.
private let nextTestPort = Atomic<Int>(Int.random(in: 10_000...20_000))

/// A TCP port for a server a test starts (a service, a metrics endpoint, a throwaway PostgreSQL): below Linux's
/// ephemeral range (32768-60999), where outgoing connections (Kafka clients among them) take their local ports,
/// so nothing in this machine's traffic takes it first; and a different one at every call in this process.
public func testPort() -> Int {
    nextTestPort.add(1, ordering: .relaxed).newValue % 22_000 + 10_000
}

/// Something a test starts (a server, a process) did not come up or misbehaved; says what and shows its output.
public struct TestSetupError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
