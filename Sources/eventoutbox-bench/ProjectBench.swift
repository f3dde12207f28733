import ArgumentParser
import BankAccount
import BankProjections
import BlockingIO
import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import KafkaClient
import OutboxRelay
import LibPQ
import Projections

/// Projector throughput from Kafka and rebuild throughput from the store, each beside PostgreSQL alone executing
/// the same writes for the same events, batched the same way (no Kafka, no decoding).
struct Project: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Projector apply rate from Kafka, and rebuild rate from the store (bank projections), beside a baseline.",
        discussion: """
            The baseline runs the projections' own SQL (ProjectionApplier with both bank projections) on events decoded
            beforehand, in batches of the consumer's size (from Kafka) or the rebuild's (from the store), on one
            connection: what PostgreSQL alone does with the same writes. Events are bank deposits spread over
            --accounts accounts; the topic has the mock cluster's default partitions (about 5 MB each: keep --events
            at 40,000 or fewer).
            """)
    @Option(help: "Bank events.") var events = 20_000
    @Option(help: "Accounts the events are spread over.") var accounts = 1000
    @Option(help: "Records per consumer transaction (ProjectionConsumerConfiguration.maxBatch).") var batch = 200

    func run() async throws {
        let env = try Environment.read()
        try await env.withSchema(connections: 4) { url, store in
            let topic = store.routing.defaultTopic
            let bank = Bank(store: store, topic: topic)
            let list = try await openAccounts(bank)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<4 {
                    group.addTask {
                        var n = worker
                        while n < events - list.count {
                            _ = try await bank.deposit(list[n % list.count], amount: 5)
                            n += 4
                        }
                    }
                }
                try await group.waitForAll()
            }
            let pool = store.pool
            let recorded = try await store.readAll().reduce(into: [RecordedEvent]()) { $0.append($1) }
            let decoded = try recorded.map { ProjectedEvent(event: try BankEvents.registry.decode($0), recorded: $0, topic: topic) }
            let applier = ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry)

            // Publish everything first, so that the projector's rate is not the relay's.
            var relayConfiguration = OutboxRelayConfiguration(databaseURL: url, kafka: KafkaConfiguration(bootstrapServers: env.brokers))
            relayConfiguration.leaderLockKey = Int64.random(in: 1...Int64.max)
            let relay = OutboxRelay(configuration: relayConfiguration)
            let relayTask = Task { try await relay.run() }
            while relay.publishedCount < recorded.count { try await Task.sleep(for: .milliseconds(20)) }
            relay.stop()
            try await relayTask.value

            let kafkaAlone = try await consumeRate(env, topic: topic, count: recorded.count)
            let baseline = try await writeRate(decoded, batch: batch, applier: applier, pool: pool)
            try await pool.withConnection { connection in
                for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
            }
            var configuration = ProjectionConsumerConfiguration(
                databaseURL: url, kafka: KafkaConfiguration(bootstrapServers: env.brokers), groupID: topic, topics: [topic])
            configuration.maxBatch = batch
            let consumer = ProjectionConsumer(configuration: configuration, applier: applier)
            // Timed from the first applied event: joining the group (seconds, on the mock) is not throughput.
            let launched = ContinuousClock.now
            let consumerTask = Task { try await consumer.run() }
            while consumer.appliedCount == 0 { try await Task.sleep(for: .milliseconds(1)) }
            let start = ContinuousClock.now
            let firstApplied = consumer.appliedCount
            while consumer.appliedCount < 2 * recorded.count { try await Task.sleep(for: .milliseconds(5)) }
            let fromKafka = Double(2 * recorded.count - firstApplied) / 2 / (ContinuousClock.now - start).inSeconds
            consumer.stop()
            try await consumerTask.value
            print(String(
                format: "projector: %d events x 2 projections from Kafka (batches of %d): %.0f events/s; PostgreSQL alone, same writes: %.0f events/s; ratio %.2f",
                recorded.count, batch, fromKafka, baseline, fromKafka / baseline))
            print(String(format: "  start-up to the first applied event (prepare, group join): %.2f s", (start - launched).inSeconds))
            print(String(format: "  librdkafka alone consuming the same records (batches of %d, no database): %.0f records/s", batch, kafkaAlone))

            let rebuildBatch = 1000
            let balancesOnly = ProjectionApplier(projections: [AccountProjections.balances], registry: BankEvents.registry)
            let rebuildBaseline = try await writeRate(
                decoded.map { ProjectedEvent(event: $0.event, recorded: $0.recorded, topic: nil) }, batch: rebuildBatch, applier: balancesOnly,
                pool: pool, readingFromStore: true)
            let rebuilder = ProjectionRebuilder(pool: pool, registry: BankEvents.registry, batchSize: rebuildBatch)
            let rebuildStart = ContinuousClock.now
            try await rebuilder.rebuild(AccountProjections.balances)
            let rebuilt = Double(recorded.count) / (ContinuousClock.now - rebuildStart).inSeconds
            print(String(
                format: "rebuild of account_balances: %d events from the store (batches of %d): %.0f events/s; PostgreSQL alone, same reads and writes: %.0f events/s; ratio %.2f",
                recorded.count, rebuildBatch, rebuilt, rebuildBaseline, rebuilt / rebuildBaseline))
        }
    }

    private func openAccounts(_ bank: Bank) async throws -> [String] {
        var ids: [String] = []
        for n in 0..<accounts { ids.append(try await bank.open(owner: "B\(n)", initialDeposit: 1_000_000)) }
        return ids
    }

    /// Records per second that a consumer of a fresh group reads from the topic, with nothing else to do.
    private func consumeRate(_ env: Environment, topic: String, count: Int) async throws -> Double {
        let consumer = try KafkaConsumer(configuration: KafkaConfiguration(bootstrapServers: env.brokers), groupID: topic + "-alone")
        try consumer.subscribe(topics: [topic])
        var received = 0
        var start: ContinuousClock.Instant?
        while received < count {
            let records = try await consumer.poll(upTo: batch, timeout: .milliseconds(100))
            if start == nil, !records.isEmpty { start = .now }
            received += records.count
        }
        let rate = Double(count) / (ContinuousClock.now - start!).inSeconds
        await consumer.close()
        return rate
    }

    /// Events per second of the projections' SQL alone: fresh tables, `batch` events per transaction; with
    /// `readingFromStore`, each batch is first read from `events` as a rebuild reads it (rows fetched, not decoded).
    private func writeRate(
        _ events: [ProjectedEvent], batch: Int, applier: ProjectionApplier, pool: PQPool, readingFromStore: Bool = false
    ) async throws -> Double {
        try await pool.withConnection { connection in
            for projection in applier.projections { try await projection.createEmptyTables(on: connection) }
            let start = ContinuousClock.now
            var index = 0
            while index < events.count {
                let slice = Array(events[index..<min(index + batch, events.count)])
                if readingFromStore {
                    _ = try await connection.query(
                        "SELECT position, event_id, stream_id, stream_version, event_type, schema_version, payload, metadata, "
                            + "occurred_at FROM events WHERE position > $1 ORDER BY position LIMIT $2",
                        [.int64(index == 0 ? 0 : events[index - 1].recorded.position), .int(batch)])
                }
                _ = try await connection.withTransaction { try await applier.apply(slice, on: $0) }
                index += batch
            }
            return Double(events.count) / (ContinuousClock.now - start).inSeconds
        }
    }
}
