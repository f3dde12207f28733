import BankAccount
import BankProjections
import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import KafkaClient
import OutboxRelay
import OutboxRelayStore
import LibPQ
import Projections
import TestSupport
import Testing

@Suite("advisory locks: one registry, no two purposes on one key (real PostgreSQL + Kafka mock cluster)")
struct AdvisoryLockTests {
    @Test("the lock classes are distinct, and none is a relay's bigint key (those live in another key space)")
    func classesDistinct() {
        let classes = AdvisoryLockClass.allCases.map(\.rawValue)
        #expect(Set(classes).count == classes.count)
    }

    /// The Kubernetes migration Job of every rollout runs `eventoutbox migrate` while the old relays and projectors
    /// still run. It used to take the bigint key 7240511001: the default relay key minus one, the membership lock
    /// that partitioned relays hold for as long as they run, so it waited forever.
    @Test("eventoutbox migrate completes beside a partitioned relay on the default key, a WAL relay and a projector")
    func migrateBesideRunningParts() async throws {
        let brokers = try TestEnvironment.kafkaBrokers()
        let topic = uniqueName("locks")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let walTest = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await SourceKind.wal.databaseURL())
        let wal = try await RelaySource.prepare(.wal, walTest)
        let bank = Bank(store: test.store, topic: topic)
        let account = try await bank.open(owner: "Lock", initialDeposit: 10)
        let consumer = ProjectionConsumer(
            configuration: ProjectionConsumerConfiguration(
                databaseURL: test.schema.url,
                kafka: KafkaConfiguration(bootstrapServers: brokers, properties: ["allow.auto.create.topics": "true", "log_level": "3"]),
                groupID: uniqueName("projector"), topics: [topic]),
            applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry))
        let projector = Task { try await consumer.run() }
        defer { consumer.stop() }
        // A lock wait ends in an error after 20 s instead of hanging the suite.
        let bounded = test.schema.url.replacingOccurrences(of: "options=-c", with: "options=-clock_timeout%3D20s%20-c")
        try await withRelay(test, brokers: brokers, configure: {
            $0.partitions = 3
            $0.leaderLockKey = OutboxRelayConfiguration(databaseURL: "", kafka: KafkaConfiguration(bootstrapServers: "")).leaderLockKey
        }) { relay in
            try await withRelay(walTest, brokers: brokers, configure: wal.configure) { _ in
                try await waitUntil("the partitioned relay holds its partitions and the projector applied the open") {
                    // The projector makes the table while it prepares: until then, not yet.
                    let balances = (try? await test.count("SELECT count(*) FROM account_balances WHERE account_id = $1", [.text(account)])) ?? 0
                    return relay.publishedCount >= 1 && balances == 1
                }
                let pool = PQPool(url: bounded, maxConnections: 1)
                let applied = try await SchemaMigrator(EventOutboxSchema.modules).migrate(pool)
                await pool.close()
                #expect(applied.isEmpty)
                let cli = try await Tools.run("eventoutbox", ["migrate"], environment: ["EVENTOUTBOX_DATABASE_URL": bounded])
                #expect(cli.status == 0, "\(cli.stderr)")
            }
        }
        consumer.stop()
        try await projector.value
        try await wal.drop(walTest)
        try await test.drop()
    }
}
