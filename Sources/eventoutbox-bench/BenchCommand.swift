import ArgumentParser
import BankAccount
import EventSourcing
import EventStore
import Foundation
import KafkaClient
import OutboxRelay
import PostgresClient
import Projections
import Synchronization

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
    static let configuration = CommandConfiguration(
        abstract: "Relay drain rate of a pre-filled outbox, beside PostgreSQL alone and librdkafka alone.",
        discussion: """
            Fills an outbox (two identical schemas) with --events rows over --streams streams, then measures in one run:
              PostgreSQL alone: fetch + mark the rows, --batch-size per statement, one connection, no Kafka;
              librdkafka alone: kcat producing the same key/value pairs (idempotent, acks=all);
              outbox-relay: the release executable draining the outbox; its peak RSS from /proc.
            and prints the relay's rate as a ratio of the slower baseline.
            """)
    @Option(help: "Rows in the outbox.") var events = 100_000
    @Option(help: "Streams they belong to (10 = a few hot streams).") var streams = 1000
    @Option(help: "Rows per statement (baseline and relay).") var batchSize = 1000
    @Flag(help: "Run the relay with --delete-published.") var deletePublished = false
    @Option(help: "Relay processes draining together (with --partitions > 1 they share the streams).") var relays = 1
    @Option(help: "The relays' --partitions.") var partitions = 1
    @Option(help: "The outbox-relay executable (default: beside this one).") var relay: String?

    func run() async throws {
        let env = try Environment.read()
        let topic = "drain-" + UUID().uuidString.prefix(8).lowercased()
        let relayPath = relay ?? siblingExecutable("outbox-relay")
        print("drain: \(events) events over \(streams) streams, \(batchSize) rows per statement")

        let postgres = try await env.withSchema(connections: 1) { _, store in
            try await store.pool.withConnection { connection in
                try await fillOutbox(connection, events: events, streams: streams, topic: topic)
                let start = ContinuousClock.now
                var cursor: Int64 = 0
                var total = 0
                while true {
                    let rows = try await connection.query(
                        """
                        SELECT id, event_id, stream_id, stream_version, topic, message_key, envelope, headers::text AS headers, created_at
                        FROM outbox WHERE published_at IS NULL AND id > $1 ORDER BY id LIMIT $2
                        """, [.int64(cursor), .int(batchSize)])
                    if rows.isEmpty { break }
                    let ids = try rows.map { try $0.decode(Int64.self, "id") }
                    try await OutboxTable().markPublished(
                        ids.map { OutboxTable.Delivery(id: $0, partition: 0, offset: $0) }, on: connection)
                    cursor = ids.last!
                    total += ids.count
                }
                return Double(total) / seconds(ContinuousClock.now - start)
            }
        }
        print(String(format: "  PostgreSQL alone (fetch + mark): %.0f rows/s", postgres))

        let (kafka, relayRate, rss) = try await env.withSchema(connections: 1) { url, store in
            try await store.pool.withConnection { try await fillOutbox($0, events: events, streams: streams, topic: topic) }
            let pairs = try await store.pool.withConnection { connection in
                try await connection.query("SELECT message_key || chr(9) || envelope AS line FROM outbox ORDER BY id")
                    .map { try $0.decode(String.self, "line") }
            }
            let file = FileManager.default.temporaryDirectory.appendingPathComponent("\(topic).tsv")
            try (pairs.joined(separator: "\n") + "\n").write(to: file, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: file) }
            let kcatStart = ContinuousClock.now
            let kcat = Process()
            kcat.executableURL = URL(fileURLWithPath: "/usr/bin/kcat")
            kcat.arguments = ["-P", "-b", env.brokers, "-t", topic + "-kcat", "-K", "\t",
                              "-X", "enable.idempotence=true", "-X", "acks=all", "-X", "linger.ms=2"]
            kcat.standardInput = try FileHandle(forReadingFrom: file)
            try kcat.run()
            kcat.waitUntilExit()
            guard kcat.terminationStatus == 0 else { throw ValidationError("kcat failed with status \(kcat.terminationStatus)") }
            let kafkaRate = Double(events) / seconds(ContinuousClock.now - kcatStart)

            let relayStart = ContinuousClock.now
            let lockKey = Int64.random(in: 1...Int64.max / 2)
            let processes = try (0..<relays).map { _ in
                let process = Process()
                process.executableURL = URL(fileURLWithPath: relayPath)
                process.arguments = ["--database-url", url, "--brokers", env.brokers, "--batch-size", String(batchSize),
                                     "--lock-key", String(lockKey), "--log-level", "error", "--partitions", String(partitions)]
                    + (deletePublished ? ["--delete-published"] : [])
                try process.run()
                return process
            }
            let pids = processes.map(\.processIdentifier)
            var peak = try await store.pool.withConnection { connection in
                var peak = 0
                while try await connection.query(
                    "SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL) AS waiting").first!.decode(Bool.self, "waiting")
                {
                    peak = max(peak, pids.map(peakRSSKilobytes).max() ?? 0)
                    try await Task.sleep(for: .milliseconds(20))
                }
                return peak
            }
            let rate = Double(events) / seconds(ContinuousClock.now - relayStart)
            peak = max(peak, pids.map(peakRSSKilobytes).max() ?? 0)
            for process in processes {
                process.terminate()
                process.waitUntilExit()
            }
            return (kafkaRate, rate, peak)
        }
        print(String(format: "  librdkafka alone (kcat -P, idempotent, acks=all): %.0f msgs/s", kafka))
        let shape = (deletePublished ? " --delete-published" : "") + (relays > 1 || partitions > 1 ? " ×\(relays), --partitions \(partitions)" : "")
        print(String(format: "  outbox-relay%@: %.0f events/s = %.2f x the slower baseline; peak RSS %.1f MB (largest relay)",
                     shape, relayRate, relayRate / min(postgres, kafka), Double(rss) / 1024))
    }
}

/// The path of another executable of this package, built beside this one.
func siblingExecutable(_ name: String) -> String {
    URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(name).path
}

/// Peak resident set size of a process (VmHWM), in kB; 0 if unknown.
func peakRSSKilobytes(_ pid: Int32) -> Int {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
        let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") })
    else { return 0 }
    return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "0") ?? 0
}

/// Writes `events` events and outbox rows in a few statements (stream `s-(n mod streams)`, versions in id order),
/// shaped as the event store writes them.
func fillOutbox(_ connection: PostgresConnection, events: Int, streams: Int, topic: String) async throws {
    try await connection.execute(
        """
        INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, occurred_at)
        SELECT gen_random_uuid(), 's-' || (n % $2), n / $2 + 1, 'Sample', 1, jsonb_build_object('n', n), clock_timestamp()
        FROM generate_series(0, $1 - 1) AS n ORDER BY n
        """, [.int(events), .int(streams)])
    try await connection.execute(
        """
        INSERT INTO outbox (event_id, stream_id, stream_version, topic, message_key, envelope, headers)
        SELECT event_id, stream_id, stream_version, $1, stream_id,
               json_build_object('eventId', event_id, 'streamId', stream_id, 'streamVersion', stream_version,
                                 'eventType', event_type, 'schemaVersion', schema_version, 'occurredAt', occurred_at,
                                 'payload', payload, 'metadata', json_build_object('actor', 'bench'))::text,
               jsonb_build_object('event-id', event_id::text, 'event-type', event_type,
                                  'stream-version', stream_version::text, 'content-type', 'application/json')
        FROM events ORDER BY position
        """, [.text(topic)])
    try await connection.executeScript("VACUUM ANALYZE outbox")
}

struct Latency: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Commit → acknowledged by Kafka under sustained load, with the outbox-relay executable running.",
        discussion: """
            Appends --rate single-event transactions per second for --seconds (paced over --connections), while the
            release outbox-relay publishes them. Latency per row is published_at - created_at (both stamped by
            PostgreSQL); prints p50/p90/p99/max, and the same for the first second alone (the cold start).
            """)
    @Option(help: "Commits per second.") var rate = 1000
    @Option(name: .customLong("seconds"), help: "How long to keep committing.") var duration = 15
    @Option(help: "Connections committing in parallel.") var connections = 4
    @Flag(help: "Append without NOTIFY (the relay then finds rows by polling).") var noNotify = false
    @Option(help: "The outbox-relay executable (default: beside this one).") var relay: String?
    @Option(name: .customLong("relay-arg"), parsing: .unconditionalSingleValue,
            help: "An extra argument for outbox-relay (repeatable), e.g. --relay-arg=--kafka-property --relay-arg=linger.ms=0.")
    var relayArguments: [String] = []

    func run() async throws {
        let env = try Environment.read()
        print("librdkafka alone, enqueue → delivery report at \(rate) msgs/s for \(duration) s (the relay's producer settings):")
        print("  " + percentiles(try await producerLatencies(brokers: env.brokers)))
        try await env.withSchema(connections: connections + 1) { url, store in
            var store = store
            store.notifiesOnAppend = !noNotify
            let process = Process()
            process.executableURL = URL(fileURLWithPath: relay ?? siblingExecutable("outbox-relay"))
            process.arguments = ["--database-url", url, "--brokers", env.brokers, "--lock-key",
                                 String(Int64.random(in: 1...Int64.max)), "--log-level", "error"] + relayArguments
            try process.run()
            defer {
                process.terminate()
                process.waitUntilExit()
            }
            try await Task.sleep(for: .milliseconds(500))  // connected and idle, as a sidecar would be
            let total = rate * duration
            let perConnection = total / connections
            let interval = Duration.seconds(Double(connections) / Double(rate))
            let start = ContinuousClock.now
            let appendStore = store
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<connections {
                    group.addTask {
                        var next = start + interval * Double(worker) / Double(connections)
                        for n in 0..<perConnection {
                            try await Task.sleep(until: next)
                            try await appendStore.append(
                                [NewEvent(Sample(n: n))], to: "latency-\(worker)-\(n % 50)", category: "bench", expectedVersion: .any)
                            next = next + interval
                        }
                    }
                }
                try await group.waitForAll()
            }
            let achieved = Double(perConnection * connections) / seconds(ContinuousClock.now - start)
            let deadline = ContinuousClock.now + .seconds(60)
            try await store.pool.withConnection { connection in
                while try await connection.query(
                    "SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL) AS waiting").first!.decode(Bool.self, "waiting")
                {
                    guard ContinuousClock.now < deadline else { throw ValidationError("rows still unpublished after 60 s") }
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
            let rows = try await store.pool.withConnection { connection in
                try await connection.query(
                    """
                    SELECT (EXTRACT(EPOCH FROM o.published_at - o.created_at) * 1000)::float8::text AS ms,
                           (EXTRACT(EPOCH FROM o.created_at - min(o.created_at) OVER ()))::float8::text AS at,
                           CASE WHEN current_setting('track_commit_timestamp') = 'on'
                                THEN (EXTRACT(EPOCH FROM o.published_at - pg_xact_commit_timestamp(e.xmin)) * 1000)::float8::text
                           END AS after_commit
                    FROM outbox o JOIN events e USING (event_id)
                    """
                ).map {
                    (Double(try $0.decode(String.self, "ms")) ?? 0, Double(try $0.decode(String.self, "at")) ?? 0,
                     try $0.decodeIfPresent(String.self, "after_commit").flatMap(Double.init))
                }
            }
            print(String(format: "latency commit → acknowledged by Kafka at %.0f commits/s for %d s%@:", achieved, duration, noNotify ? " (no NOTIFY)" : ""))
            print("  all rows: " + percentiles(rows.map(\.0)))
            print("  first second: " + percentiles(rows.filter { $0.1 < 1 }.map(\.0)))
            print("  after the first second: " + percentiles(rows.filter { $0.1 >= 1 }.map(\.0)))
            let slowest = rows.sorted { $0.0 > $1.0 }.prefix(8)
            print("  slowest rows (ms at s): " + slowest.map { String(format: "%.0f@%.2f", $0.0, $0.1) }.joined(separator: " "))
            let afterCommit = rows.compactMap(\.2)
            if !afterCommit.isEmpty {
                // The relay's share alone: from the commit (track_commit_timestamp; the events row keeps the
                // inserting transaction's xmin, the outbox row is rewritten when marked).
                print("  commit timestamp → published: " + percentiles(afterCommit))
            }
        }
    }
}

extension Latency {
    /// Milliseconds from enqueue to delivery report of `rate` records per second for `duration` seconds, with
    /// the relay's producer settings: the Kafka side of the latency without PostgreSQL or the relay.
    func producerLatencies(brokers: String) async throws -> [Double] {
        let sent = Locked<[UInt64: ContinuousClock.Instant]>([:])
        let latencies = Locked<[Double]>([])
        let producer = try KafkaProducer(
            configuration: KafkaConfiguration(bootstrapServers: brokers, properties: OutboxRelayConfiguration.producerDefaults),
            deliveryReports: { report in
                let now = ContinuousClock.now
                guard let start = sent.withLock({ $0.removeValue(forKey: report.messageID) }) else { return }
                latencies.withLock { $0.append(seconds(now - start) * 1000) }
            })
        let topic = "latency-kafka-" + UUID().uuidString.prefix(8).lowercased()
        await producer.prepare(topics: [topic])
        let interval = Duration.seconds(1.0 / Double(rate))
        var next = ContinuousClock.now
        for n in 1...(rate * duration) {
            try await Task.sleep(until: next)
            sent.withLock { $0[UInt64(n)] = .now }
            try producer.enqueue(KafkaOutgoingMessage(topic: topic, key: "k\(n % 50)", value: "{\"n\":\(n)}"), messageID: UInt64(n))
            next = next + interval
        }
        try await producer.flush(timeout: .seconds(30))
        await producer.close()
        return latencies.value
    }
}

/// p50/p90/p99/max of millisecond samples.
func percentiles(_ values: [Double]) -> String {
    let sorted = values.sorted()
    guard !sorted.isEmpty else { return "no samples" }
    func pct(_ p: Double) -> Double { sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] }
    return String(format: "p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms (%d samples)",
                  pct(0.5), pct(0.9), pct(0.99), sorted.last!, sorted.count)
}

/// A value shared with callbacks on other threads.
final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<R: Sendable>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
    var value: Value { mutex.withLock { $0 } }
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
