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

/// Commit → visible in a projection, under sustained load, with relay and projector running.
struct Visible: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Commit → visible in account_balances under sustained load (relay and projector running in this process).",
        discussion: """
            Opens --rate accounts per second for --seconds (paced over --connections), each a new stream, while an
            OutboxRelay publishes them and a ProjectionConsumer applies both bank projections. Each account's row in
            account_balances is written once, by the transaction that made it visible, so the latency is exact:
            pg_xact_commit_timestamp of that row minus that of the event (both PostgreSQL's clock; needs
            track_commit_timestamp = on, as scripts/bench sets). Prints p50/p90/p99/max.
            """)
    @Option(help: "Commits per second.") var rate = 1000
    @Option(name: .customLong("seconds"), help: "How long to keep committing.") var duration = 15
    @Option(help: "Connections committing in parallel.") var connections = 4

    func run() async throws {
        let env = try Environment.read()
        try await env.withSchema(connections: connections + 2) { url, store in
            let topic = store.routing.defaultTopic
            let bank = Bank(store: store, topic: topic)
            try await store.pool.withConnection { connection in
                for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
            }
            var relayConfiguration = OutboxRelayConfiguration(databaseURL: url, kafka: KafkaConfiguration(bootstrapServers: env.brokers))
            relayConfiguration.leaderLockKey = Int64.random(in: 1...Int64.max)
            let relay = OutboxRelay(configuration: relayConfiguration)
            let relayTask = Task { try await relay.run() }
            var consumerConfiguration = ProjectionConsumerConfiguration(
                databaseURL: url,
                kafka: KafkaConfiguration(bootstrapServers: env.brokers, properties: ["fetch.wait.max.ms": "5", "log_level": "3"]),
                groupID: topic, topics: [topic])
            consumerConfiguration.commitInterval = .milliseconds(500)
            let consumer = ProjectionConsumer(
                configuration: consumerConfiguration, applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry))
            let consumerTask = Task { try await consumer.run() }
            defer {
                relay.stop()
                consumer.stop()
            }
            // Beside it, a plain consumer notes when each event arrives: the Kafka part of the path.
            let plain = try KafkaConsumer(
                configuration: KafkaConfiguration(bootstrapServers: env.brokers, properties: ["fetch.wait.max.ms": "5", "log_level": "3"]),
                groupID: topic + "-plain")
            try plain.subscribe(topics: [topic])
            let received = Locked<[String: Date]>([:])
            let reading = Task {
                while !Task.isCancelled {
                    for message in try await plain.poll(upTo: 500, timeout: .milliseconds(50)) {
                        let now = Date()
                        if let id = message.header("event-id")?.stringValue { received.withLock { $0[id] = $0[id] ?? now } }
                    }
                }
            }
            defer { reading.cancel() }
            // Warm-up: one account through the whole path, so the groups are joined before timing starts.
            _ = try await bank.open(owner: "warm-up", initialDeposit: 1)
            let warmupDeadline = ContinuousClock.now + .seconds(60)
            while consumer.appliedCount < 2 || received.value.isEmpty {
                guard ContinuousClock.now < warmupDeadline else { throw ValidationError("the warm-up event was not applied in 60 s") }
                try await Task.sleep(for: .milliseconds(10))
            }

            let perConnection = rate * duration / connections
            let interval = Duration.seconds(Double(connections) / Double(rate))
            let start = ContinuousClock.now
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<connections {
                    group.addTask {
                        var next = start + interval * Double(worker) / Double(connections)
                        for n in 0..<perConnection {
                            try await Task.sleep(until: next)
                            _ = try await bank.open(owner: "V\(worker)-\(n)", initialDeposit: 1)
                            next = next + interval
                        }
                    }
                }
                try await group.waitForAll()
            }
            let achieved = Double(perConnection * connections) / (ContinuousClock.now - start).inSeconds
            let expected = 2 * (1 + perConnection * connections)
            let deadline = ContinuousClock.now + .seconds(60)
            while consumer.appliedCount < expected {
                guard ContinuousClock.now < deadline else { throw ValidationError("events still not applied after 60 s") }
                try await Task.sleep(for: .milliseconds(20))
            }
            while received.value.count < expected / 2 {
                guard ContinuousClock.now < deadline else { throw ValidationError("events still not received after 60 s") }
                try await Task.sleep(for: .milliseconds(20))
            }
            reading.cancel()
            await plain.close()
            relay.stop()
            consumer.stop()
            try await relayTask.value
            try await consumerTask.value
            let latencies = try await store.pool.withConnection { connection in
                try await connection.query(
                    """
                    SELECT (EXTRACT(EPOCH FROM pg_xact_commit_timestamp(b.xmin) - pg_xact_commit_timestamp(e.xmin)) * 1000)::float8::text AS ms
                    FROM account_balances b JOIN events e ON e.stream_id = b.account_id AND e.stream_version = 1
                    WHERE b.owner <> 'warm-up'
                    """
                ).map { Double(try $0.decode(String.self, "ms")) ?? .nan }
            }
            let delivered = try await millisecondsAfterCommit(received.value, store: store)
            print(String(format: "commit → visible in account_balances at %.0f commits/s for %d s (relay + projector running):", achieved, duration))
            print("  " + percentiles(latencies))
            print("  same run, commit → a plain consumer received it (the Kafka part): " + percentiles(delivered))
        }
    }
}
