import ArgumentParser
import BankAccount
import EventSourcing
import EventStore
import Foundation
import KafkaClient
import OutboxRelay
import PostgresClient
import Projections

/// A small event for measurements.
struct Sample: DomainEvent {
    static let eventType = "Sample"
    var n: Int
}

@main
struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eventoutbox-bench",
        abstract: "Measure EventOutbox against the servers in EVENTOUTBOX_DATABASE_URL and KAFKA_BROKERS.",
        discussion: """
            Each run works in a fresh schema (dropped afterwards) and a fresh topic. Use scripts/bench, which
            starts a throwaway PostgreSQL and the mock Kafka cluster and runs pgbench beside it as a baseline.
            """,
        subcommands: [Append.self, Drain.self, Latency.self, Project.self]
    )
}

struct Environment {
    let databaseURL: String
    let brokers: String

    static func read() throws -> Environment {
        let env = ProcessInfo.processInfo.environment
        guard let url = env["EVENTOUTBOX_DATABASE_URL"], let brokers = env["KAFKA_BROKERS"] else {
            throw ValidationError("set EVENTOUTBOX_DATABASE_URL and KAFKA_BROKERS (scripts/bench does)")
        }
        return Environment(databaseURL: url, brokers: brokers)
    }

    /// A migrated store in a new schema; `body` gets its URL; the schema is dropped afterwards.
    func withSchema<T>(connections: Int, _ body: (String, EventStore) async throws -> T) async throws -> T {
        let schema = "bench_" + UUID().uuidString.prefix(8).lowercased()
        let admin = try await PostgresConnection.connect(to: databaseURL)
        try await admin.executeScript("CREATE SCHEMA \(schema)")
        let url = databaseURL + (databaseURL.contains("?") ? "&" : "?") + "options=-csearch_path%3D\(schema)"
        let pool = PostgresPool(url: url, maxConnections: connections)
        let topic = schema
        defer { _ = admin }
        do {
            try await EventStoreSchema.migrate(pool)
            let value = try await body(url, EventStore(pool: pool, routing: OutboxRouting(defaultTopic: topic)))
            await pool.close()
            try await admin.executeScript("DROP SCHEMA \(schema) CASCADE")
            return value
        } catch {
            await pool.close()
            try? await admin.executeScript("DROP SCHEMA \(schema) CASCADE")
            throw error
        }
    }
}

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
}

/// Appends `events` single-event appends, `connections` tasks in parallel, each on its own streams.
func fill(_ store: EventStore, events: Int, tasks: Int, streams: Int) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        for task in 0..<tasks {
            group.addTask {
                var versions: [Int: Int64] = [:]
                var n = task
                while n < events {
                    let stream = (n / tasks) % max(1, streams / tasks) * tasks + task
                    let version = versions[stream, default: 0]
                    try await store.append(
                        [NewEvent(Sample(n: n))], to: "s-\(stream)", category: "bench",
                        expectedVersion: version == 0 ? .noStream : .exact(version))
                    versions[stream] = version + 1
                    n += tasks
                }
            }
        }
        try await group.waitForAll()
    }
}

struct Append: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Appends per second (one event per transaction, with its outbox row).")
    @Option(help: "Parallel connections.") var connections = 1
    @Option(help: "Events to append.") var events = 5000
    @Option(help: "Streams written to.") var streams = 100
    @Flag(help: "Append without NOTIFY (the relay then finds rows by polling).") var noNotify = false

    func run() async throws {
        let env = try Environment.read()
        try await env.withSchema(connections: connections) { _, store in
            var store = store
            store.notifiesOnAppend = !noNotify
            let start = ContinuousClock.now
            try await fill(store, events: events, tasks: connections, streams: streams)
            let elapsed = seconds(ContinuousClock.now - start)
            print(String(format: "append%@: %d events, %d connections: %.2f s, %.0f appends/s", noNotify ? " (no NOTIFY)" : "", events, connections, elapsed, Double(events) / elapsed))
        }
    }
}

struct Drain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Relay throughput: events/s draining a pre-filled outbox.")
    @Option(help: "Events in the outbox.") var events = 20000
    @Option(help: "Streams they belong to.") var streams = 200
    @Option(help: "Relay batch size.") var batchSize = 500

    func run() async throws {
        let env = try Environment.read()
        try await env.withSchema(connections: 4) { url, store in
            try await fill(store, events: events, tasks: 4, streams: streams)
            var configuration = OutboxRelayConfiguration(databaseURL: url, kafka: KafkaConfiguration(bootstrapServers: env.brokers))
            configuration.batchSize = batchSize
            configuration.leaderLockKey = Int64.random(in: 1...Int64.max)
            let relay = OutboxRelay(configuration: configuration)
            let start = ContinuousClock.now
            let task = Task { try await relay.run() }
            while relay.publishedCount < events { try await Task.sleep(for: .milliseconds(5)) }
            let elapsed = seconds(ContinuousClock.now - start)
            relay.stop()
            try await task.value
            print(String(format: "drain: %d events over %d streams, batch %d: %.2f s, %.0f events/s", events, streams, batchSize, elapsed, Double(events) / elapsed))
        }
    }
}

struct Latency: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Commit-to-delivered latency at low load (append, then wait for Kafka's ack).")
    @Option(help: "Samples, one at a time.") var samples = 200

    func run() async throws {
        let env = try Environment.read()
        try await env.withSchema(connections: 2) { url, store in
            var configuration = OutboxRelayConfiguration(databaseURL: url, kafka: KafkaConfiguration(bootstrapServers: env.brokers))
            configuration.leaderLockKey = Int64.random(in: 1...Int64.max)
            let relay = OutboxRelay(configuration: configuration)
            let task = Task { try await relay.run() }
            var latencies: [Double] = []
            for n in 0..<samples {
                let before = relay.publishedCount
                let start = ContinuousClock.now
                try await store.append([NewEvent(Sample(n: n))], to: "latency", category: "bench", expectedVersion: .any)
                while relay.publishedCount == before { try await Task.sleep(for: .microseconds(200)) }
                latencies.append(seconds(ContinuousClock.now - start) * 1000)
                try await Task.sleep(for: .milliseconds(10))
            }
            relay.stop()
            try await task.value
            latencies.sort()
            func pct(_ p: Double) -> Double { latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))] }
            print(String(format: "latency commit→acknowledged by Kafka, %d samples: p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms",
                         samples, pct(0.5), pct(0.9), pct(0.99), latencies.last ?? 0))
        }
    }
}

struct Project: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Projector apply rate from Kafka, and rebuild rate from the store (bank projections).")
    @Option(help: "Bank events.") var events = 5000

    func run() async throws {
        let env = try Environment.read()
        try await env.withSchema(connections: 4) { url, store in
            let topic = "bench-" + UUID().uuidString.prefix(8).lowercased()
            let bank = Bank(store: store, topic: topic)
            var accounts: [String] = []
            for n in 0..<50 { accounts.append(try await bank.open(owner: "B\(n)", initialDeposit: 1_000_000)) }
            let list = accounts
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<4 {
                    group.addTask {
                        var n = worker
                        while n < events - 50 {
                            _ = try await bank.deposit(list[n % list.count], amount: 5)
                            n += 4
                        }
                    }
                }
                try await group.waitForAll()
            }
            var relayConfiguration = OutboxRelayConfiguration(databaseURL: url, kafka: KafkaConfiguration(bootstrapServers: env.brokers))
            relayConfiguration.leaderLockKey = Int64.random(in: 1...Int64.max)
            let relay = OutboxRelay(configuration: relayConfiguration)
            let relayTask = Task { try await relay.run() }
            // Not the head position: positions have gaps where conflicting appends rolled back.
            let total = try await store.pool.withConnection {
                try await $0.query("SELECT count(*) FROM events").first!.decode(Int64.self, at: 0)
            }
            while relay.publishedCount < Int(total) { try await Task.sleep(for: .milliseconds(20)) }

            // Tables exist and are empty, so the projector applies everything from Kafka (no back-fill).
            let pool = store.pool
            try await pool.withConnection { connection in
                for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
            }
            let consumer = ProjectionConsumer(
                configuration: ProjectionConsumerConfiguration(
                    databaseURL: url, kafka: KafkaConfiguration(bootstrapServers: env.brokers), groupID: topic, topics: [topic]),
                applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry))
            let start = ContinuousClock.now
            let consumerTask = Task { try await consumer.run() }
            while consumer.appliedCount < 2 * Int(total) { try await Task.sleep(for: .milliseconds(20)) }
            let applied = seconds(ContinuousClock.now - start)
            consumer.stop()
            relay.stop()
            try await consumerTask.value
            try await relayTask.value
            print(String(format: "projector: %d events x 2 projections from Kafka: %.2f s, %.0f events/s", Int(total), applied, Double(total) / applied))

            let rebuildStart = ContinuousClock.now
            try await ProjectionRebuilder(pool: pool, registry: BankEvents.registry).rebuild(AccountProjections.balances)
            let rebuilt = seconds(ContinuousClock.now - rebuildStart)
            print(String(format: "rebuild account_balances: %d events: %.2f s, %.0f events/s", Int(total), rebuilt, Double(total) / rebuilt))
        }
    }
}
