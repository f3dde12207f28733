import ArgumentParser
import BlockingIO
import CommandLineSupport
import BankAccount
import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import KafkaClient
import OutboxRelay
import OutboxRelayStore
import LibPQ
import Projections
import Synchronization

/// A small event for measurements.
struct Sample: DomainEvent {
    static let eventType = "Sample"
    var n: Int
}

@main
struct BenchCommand: AsyncParsableCommand {
    static func main() async { await mainReadingEnvironment() }

    static let configuration = CommandConfiguration(
        commandName: "eventoutbox-bench",
        abstract: "Measure EventOutbox against the servers in EVENTOUTBOX_DATABASE_URL and KAFKA_BROKERS.",
        discussion: """
            Each run works in a fresh schema (dropped afterwards) and a fresh topic. Use scripts/bench, which
            starts a throwaway PostgreSQL and the mock Kafka cluster and runs pgbench beside it as a baseline.
            """ + "\n\n" + EnvironmentOptions.help("eventoutbox-bench", example: "events", "1000"),
        version: EventOutboxVersion.current,
        subcommands: [Append.self, Drain.self, Latency.self, Project.self, Load.self, Visible.self]
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
        let admin = try await PQConnection.connect(to: databaseURL)
        try await admin.executeScript("CREATE SCHEMA \(schema)")
        let url = databaseURL + (databaseURL.contains("?") ? "&" : "?") + "options=-csearch_path%3D\(schema)"
        let pool = PQPool(url: url, maxConnections: connections)
        let topic = schema
        defer { _ = admin }
        do {
            try await SchemaMigrator(EventOutboxSchema.modules).migrate(pool)
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
    static let configuration = CommandConfiguration(
        abstract: "Appends per second (one event per transaction, with its outbox row).",
        discussion: """
            --source table appends with NOTIFY (what the table relay wakes on); --source wal appends without it, with
            a publication and replication slot in place (what the WAL relay reads). --baseline first runs pgbench
            with the same statement (version check, event and outbox row, and NOTIFY when the appends send it; prepared)
            in the same schema, and prints the ratio.
            """)
    @Option(help: "Parallel connections.") var connections = 1
    @Option(help: "Events to append.") var events = 5000
    @Option(help: "Streams written to.") var streams = 100
    @Flag(help: "Append without NOTIFY (the relay then finds rows by polling).") var noNotify = false
    @Option(help: "table (NOTIFY on every append) or wal (no NOTIFY; publication and slot set up).") var source = "table"
    @Flag(help: "Run pgbench with the same INSERTs first, as the baseline.") var baseline = false

    func validate() throws {
        guard source == "table" || source == "wal" else { throw ValidationError("--source is 'table' or 'wal'") }
    }

    func run() async throws {
        let env = try Environment.read()
        try await env.withSchema(connections: connections) { url, store in
            var store = store
            store.notifiesOnAppend = !noNotify && source == "table"
            let pgbench = baseline ? try samePGBench(url, notifies: store.notifiesOnAppend) : nil
            let start = ContinuousClock.now
            if source == "wal" {
                try await withWAL(url) { _ in try await fill(store, events: events, tasks: connections, streams: streams) }
            } else {
                try await fill(store, events: events, tasks: connections, streams: streams)
            }
            let elapsed = (ContinuousClock.now - start).inSeconds
            let rate = Double(events) / elapsed
            let mode = source == "wal" ? " --source wal (no NOTIFY)" : noNotify ? " (no NOTIFY)" : ""
            if let pgbench {
                print(String(format: "  pgbench running the same statement%@, %d clients: %.0f tps", store.notifiesOnAppend ? " (NOTIFY too)" : "", connections, pgbench))
            }
            print(String(format: "append%@: %d events, %d connections: %.2f s, %.0f appends/s%@", mode, events, connections, elapsed, rate,
                         pgbench.map { String(format: " = %.2f x pgbench", rate / $0) } ?? ""))
        }
    }

    /// pgbench running the append's statement (version check, event and outbox row in one statement, as the
    /// store writes it; with NOTIFY when the appends send it), prepared, `connections` clients, each transaction a
    /// new stream.
    private func samePGBench(_ url: String, notifies: Bool) throws -> Double {
        let script = FileManager.default.temporaryDirectory.appendingPathComponent("append-\(UUID().uuidString).sql")
        try #"""
            \set n random(1, 9000000000000000000)
            WITH current AS (SELECT COALESCE(max(stream_version), 0) AS version FROM events WHERE stream_id = 'pgbench-' || :client_id || '-' || :n), appended AS (INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata, occurred_at) SELECT v.event_id, 'pgbench-' || :client_id || '-' || :n, v.version, v.event_type, v.schema_version, v.payload, v.metadata, v.occurred_at FROM (VALUES (gen_random_uuid(), 1::bigint, 'Sample', 1, '{"n": 1}'::jsonb, '{}'::jsonb, now())) AS v(event_id, version, event_type, schema_version, payload, metadata, occurred_at) WHERE (SELECT version FROM current) = 0 RETURNING position, event_id, stream_id), outboxed AS (INSERT INTO outbox (event_id, stream_id, stream_version, topic, message_key, envelope, headers) SELECT event_id, stream_id, 1, 'pgbench', stream_id, '{"eventType":"Sample","payload":{"n":1}}', jsonb_build_object('event-id', event_id::text, 'event-type', 'Sample', 'stream-version', '1', 'content-type', 'application/json') FROM appended RETURNING 1), notified AS (SELECT pg_notify('\#(EventTables.outboxChannel)', '1') FROM current WHERE \#(notifies ? "" : "false AND ")EXISTS (SELECT 1 FROM appended)) SELECT (SELECT version FROM current) AS current, (SELECT count(*) FROM outboxed) AS outboxed, (SELECT count(*) FROM notified) AS notified, appended.position FROM current LEFT JOIN appended ON true;
            """#.write(to: script, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: script) }
        let output = try runProgram(
            try postgresProgram("pgbench"),
            ["-n", "-M", "prepared", "-f", script.path, "-c", String(connections), "-j", String(connections),
             "-t", String(max(1, events / connections)), url], capture: true)
        guard let line = output.split(separator: "\n").first(where: { $0.hasPrefix("tps = ") }),
            let tps = Double(line.dropFirst(6).prefix { $0 != " " })
        else { throw ValidationError("pgbench printed no tps") }
        return tps
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
    @Option(help: "table, or wal: the relay reads the backlog from a replication slot; the PostgreSQL baseline is then pg_recvlogical streaming the same inserts.")
    var source = "table"
    @Option(help: "The relay's --delivery: at-least-once or exactly-once (its progress topic, --progress-topic, must exist on the mock cluster: scripts/bench creates it).")
    var delivery = "at-least-once"
    @Option(help: "With --delivery exactly-once: the relay's progress topic (with at least --partitions partitions).")
    var progressTopic = "eventoutbox-bench.progress"
    @Option(name: .customLong("relay-arg"), parsing: .unconditionalSingleValue,
            help: "An extra argument for outbox-relay (repeatable), e.g. --relay-arg=--kafka-property --relay-arg=linger.ms=0.")
    var relayArguments: [String] = []

    func validate() throws {
        guard source == "table" || source == "wal" else { throw ValidationError("--source is 'table' or 'wal'") }
        guard delivery == "at-least-once" || delivery == "exactly-once" else {
            throw ValidationError("--delivery is 'at-least-once' or 'exactly-once'")
        }
        guard source == "table" || (relays == 1 && partitions == 1 && !deletePublished) else {
            throw ValidationError("--relays, --partitions and --delete-published apply to --source table")
        }
    }

    func run() async throws {
        let env = try Environment.read()
        let topic = "drain-" + UUID().uuidString.prefix(8).lowercased()
        let relayPath = relay ?? siblingExecutable("outbox-relay")
        print("drain: \(events) events over \(streams) streams, \(batchSize) rows per statement, --source \(source)")

        let postgres = source == "wal" ? try await recvlogicalRate(env, topic: topic) : try await env.withSchema(connections: 1) { _, store in
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
                return Double(total) / (ContinuousClock.now - start).inSeconds
            }
        }
        print(String(format: source == "wal" ? "  PostgreSQL alone (pg_recvlogical streaming the inserts from a slot): %.0f rows/s" : "  PostgreSQL alone (fetch + mark): %.0f rows/s", postgres))

        let (kafka, relayRate, rss) = try await env.withSchema(connections: 1) { url, store in
          try await withOptionalWAL(url) { wal in
            try await store.pool.withConnection { try await fillOutbox($0, events: events, streams: streams, topic: topic) }
            let endLSN = try await store.pool.withConnection { try await currentLSN($0) }
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
            let kafkaRate = Double(events) / (ContinuousClock.now - kcatStart).inSeconds

            let relayStart = ContinuousClock.now
            let lockKey = Int64.random(in: 1...Int64.max / 2)
            let processes = try (0..<relays).map { _ in
                let process = Process()
                process.executableURL = URL(fileURLWithPath: relayPath)
                var arguments = ["--database-url", url, "--brokers", env.brokers, "--batch-size", String(batchSize),
                                 "--lock-key", String(lockKey), "--log-level", "error", "--partitions", String(partitions),
                                 "--delivery", delivery]
                if deletePublished { arguments.append("--delete-published") }
                if delivery == "exactly-once" { arguments += ["--transactional-id", topic, "--progress-topic", progressTopic] }
                if let wal { arguments += ["--source", "wal", "--slot", wal.slot, "--publication", wal.publication] }
                process.arguments = arguments + relayArguments
                try process.run()
                return process
            }
            let pids = processes.map(\.processIdentifier)
            var peak = try await store.pool.withConnection { connection in
                var peak = 0
                // Done when every row is marked (table), or the slot is confirmed past the backlog (wal).
                func waiting() async throws -> Bool {
                    if let wal { return try await confirmedLSN(connection, wal) < endLSN }
                    return try await connection.queryOne(
                        "SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL) AS waiting").decode(Bool.self, "waiting")
                }
                while try await waiting() {
                    peak = max(peak, pids.map(peakRSSKilobytes).max() ?? 0)
                    try await Task.sleep(for: .milliseconds(20))
                }
                return peak
            }
            let rate = Double(events) / (ContinuousClock.now - relayStart).inSeconds
            peak = max(peak, pids.map(peakRSSKilobytes).max() ?? 0)
            for process in processes {
                process.terminate()
                process.waitUntilExit()
            }
            return (kafkaRate, rate, peak)
          }
        }
        print(String(format: "  librdkafka alone (kcat -P, idempotent, acks=all): %.0f msgs/s", kafka))
        let shape = " --delivery \(delivery)" + (source == "wal" ? " --source wal" : "") + (deletePublished ? " --delete-published" : "") + (relays > 1 || partitions > 1 ? " ×\(relays), --partitions \(partitions)" : "")
        print(String(format: "  outbox-relay%@: %.0f events/s = %.2f x the slower baseline; peak RSS %.1f MB (largest relay)",
                     shape, relayRate, relayRate / min(postgres, kafka), Double(rss) / 1024))
    }
}

extension Drain {
    /// `body` with a publication and slot set up first when `--source wal`, else with `nil`.
    func withOptionalWAL<T>(_ url: String, _ body: (OutboxWAL?) async throws -> T) async throws -> T {
        source == "wal" ? try await withWAL(url) { try await body($0) } : try await body(nil)
    }

    /// PostgreSQL alone for `--source wal`: pg_recvlogical streams the backlog's inserts from a slot of its
    /// own (pgoutput, output discarded) until it reaches the position after the fill.
    func recvlogicalRate(_ env: Environment, topic: String) async throws -> Double {
        try await env.withSchema(connections: 1) { url, store in
            try await withWAL(url) { wal in
                let end = try await store.pool.withConnection { connection in
                    try await fillOutbox(connection, events: events, streams: streams, topic: topic)
                    return try await currentLSN(connection)
                }
                let start = ContinuousClock.now
                try runProgram(
                    try postgresProgram("pg_recvlogical"),
                    ["-d", url, "--slot", wal.slot, "--start", "--endpos", end.description, "-o", "proto_version=1",
                     "-o", "publication_names=\(wal.publication)", "-f", "/dev/null", "--no-loop"])
                return Double(events) / (ContinuousClock.now - start).inSeconds
            }
        }
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
func fillOutbox(_ connection: PQConnection, events: Int, streams: Int, topic: String) async throws {
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
    @Option(help: "The relay's source: table (appends NOTIFY) or wal (appends without NOTIFY; publication and slot set up).")
    var source = "table"
    @Flag(help: "Skip the librdkafka-alone baseline (when running both sources one after the other).") var noBaseline = false
    @Flag(help: """
        Append with expectedVersion .any (the store reads each stream's version first: two statements per commit) \
        instead of the exact version each connection knows of its own streams (one statement).
        """)
    var anyVersion = false

    func validate() throws {
        guard source == "table" || source == "wal" else { throw ValidationError("--source is 'table' or 'wal'") }
    }

    func run() async throws {
        let env = try Environment.read()
        if !noBaseline {
            print("librdkafka alone, enqueue → delivery report at \(rate) msgs/s for \(duration) s (the relay's producer settings):")
            print("  " + percentiles(try await producerLatencies(brokers: env.brokers)))
        }
        try await env.withSchema(connections: connections + 1) { url, store in
          try await (source == "wal" ? withWAL(url) { try await measure(env, url, store, $0) } : measure(env, url, store, nil))
        }
    }

    private func measure(_ env: Environment, _ url: String, _ store: EventStore, _ wal: OutboxWAL?) async throws {
        var store = store
        store.notifiesOnAppend = !noNotify && wal == nil
        let process = Process()
        process.executableURL = URL(fileURLWithPath: relay ?? siblingExecutable("outbox-relay"))
        process.arguments = ["--database-url", url, "--brokers", env.brokers, "--lock-key",
                             String(Int64.random(in: 1...Int64.max)), "--log-level", "error"] + relayArguments
            + (wal.map { ["--source", "wal", "--slot", $0.slot, "--publication", $0.publication] } ?? [])
        try process.run()
        defer {
            process.terminate()
            process.waitUntilExit()
        }
        // A consumer notes when each event arrives (for both sources: WAL mode marks no rows).
        let consumer = try KafkaConsumer(
            configuration: KafkaConfiguration(
                bootstrapServers: env.brokers,
                properties: ["allow.auto.create.topics": "true", "fetch.wait.max.ms": "5", "log_level": "3"]),
            groupID: "latency-" + UUID().uuidString.prefix(8).lowercased())
        try consumer.subscribe(topics: [store.routing.defaultTopic])
        // A first message creates the topic; once the consumer has it, the consumer is assigned and fetching.
        let warmup = try KafkaProducer(
            configuration: KafkaConfiguration(bootstrapServers: env.brokers, properties: [:]), deliveryReports: { _ in })
        await warmup.prepare(topics: [store.routing.defaultTopic])
        try warmup.enqueue(KafkaOutgoingMessage(topic: store.routing.defaultTopic, key: "warmup", value: "{}"), messageID: 1)
        try await warmup.flush(timeout: .seconds(30))
        await warmup.close()
        let warmupDeadline = ContinuousClock.now + .seconds(30)
        while try await consumer.poll(timeout: .milliseconds(100))?.keyString != "warmup" {
            guard ContinuousClock.now < warmupDeadline else { throw ValidationError("the consumer got no warm-up message in 30 s") }
        }
        let received = Locked<[String: Date]>([:])
        let reading = Task {
            while !Task.isCancelled {
                guard let message = try await consumer.poll(timeout: .milliseconds(50)) else { continue }
                let now = Date()
                if let id = message.header("event-id")?.stringValue { received.withLock { $0[id] = $0[id] ?? now } }
            }
        }
        defer { reading.cancel() }
        try await Task.sleep(for: .seconds(1))  // relay connected and idle, as in production
        let total = rate * duration
        let perConnection = total / connections
        let interval = Duration.seconds(Double(connections) / Double(rate))
        let start = ContinuousClock.now
        let appendStore = store
        let anyVersion = anyVersion
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<connections {
                group.addTask {
                    var next = start + interval * Double(worker) / Double(connections)
                    for n in 0..<perConnection {
                        try await Task.sleep(until: next)
                        // Each connection owns its 50 streams: the n-th append finds its stream at version n / 50.
                        let known: ExpectedVersion = n < 50 ? .noStream : .exact(Int64(n / 50))
                        try await appendStore.append(
                            [NewEvent(Sample(n: n))], to: "latency-\(worker)-\(n % 50)", category: "bench",
                            expectedVersion: anyVersion ? .any : known)
                        next = next + interval
                    }
                }
            }
            try await group.waitForAll()
        }
        let achieved = Double(perConnection * connections) / (ContinuousClock.now - start).inSeconds
        let deadline = ContinuousClock.now + .seconds(60)
        while received.value.count < perConnection * connections {
            guard ContinuousClock.now < deadline else { throw ValidationError("events still not received after 60 s") }
            try await Task.sleep(for: .milliseconds(20))
        }
        reading.cancel()
        let afterCommit = try await millisecondsAfterCommit(received.value, store: store)
        print(String(format: "latency at %.0f commits/s for %d s, --source %@%@%@:", achieved, duration, wal == nil ? "table" : "wal",
                     store.notifiesOnAppend ? "" : " (no NOTIFY)", anyVersion ? " (--any-version)" : ""))
        print("  commit timestamp → a consumer received it: " + percentiles(afterCommit))
        guard wal == nil else { return }
        try await store.pool.withConnection { connection in
            while try await connection.queryOne(
                "SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL) AS waiting").decode(Bool.self, "waiting")
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
        print("  insert → acknowledged by Kafka (rows' created_at → published_at): " + percentiles(rows.map(\.0)))
        print("  first second: " + percentiles(rows.filter { $0.1 < 1 }.map(\.0)))
        print("  after the first second: " + percentiles(rows.filter { $0.1 >= 1 }.map(\.0)))
        let slowest = rows.sorted { $0.0 > $1.0 }.prefix(8)
        print("  slowest rows (ms at s): " + slowest.map { String(format: "%.0f@%.2f", $0.0, $0.1) }.joined(separator: " "))
        let published = rows.compactMap(\.2)
        if !published.isEmpty {
            // The relay's share alone: from the commit (track_commit_timestamp; the events row keeps the
            // inserting transaction's xmin, the outbox row is rewritten when marked).
            print("  commit timestamp → published: " + percentiles(published))
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
                latencies.withLock { $0.append((now - start).inSeconds * 1000) }
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
/// For each event in `arrivals` (event id → when a consumer received it): milliseconds from its transaction's
/// commit timestamp (PostgreSQL's clock, same machine; needs `track_commit_timestamp = on`).
func millisecondsAfterCommit(_ arrivals: [String: Date], store: EventStore) async throws -> [Double] {
    let commits = try await store.pool.withConnection { connection in
        try await connection.query(
            "SELECT event_id::text AS id, EXTRACT(EPOCH FROM pg_xact_commit_timestamp(xmin))::float8::text AS committed FROM events"
        ).map { (try $0.decode(String.self, "id"), Double(try $0.decode(String.self, "committed")) ?? 0) }
    }
    return commits.compactMap { id, committed in arrivals[id].map { ($0.timeIntervalSince1970 - committed) * 1000 } }
}

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
