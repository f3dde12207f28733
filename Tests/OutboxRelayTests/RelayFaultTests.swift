import EventStore
import EventStoreSQL
import Foundation
import KafkaClient
import KafkaMock
import OutboxRelay
import OutboxRelayStore
import LibPQ
import TestSupport
import Testing

/// The pipelined relay under broker faults, on a mock cluster of its own per test (real PostgreSQL, real
/// librdkafka clients over TCP). Each asserts that a consumer sees every event, and every stream in order.
@Suite("outbox relay under broker faults (real PostgreSQL + a mock cluster per test)")
struct RelayFaultTests {
    /// A test's own cluster, topic and store.
    struct Setup {
        let cluster: MockCluster
        let topic: String
        let test: TestEventStore

        static func make(partitions: Int32 = 6) async throws -> Setup {
            let cluster = try MockCluster(brokers: 3)
            let topic = uniqueName("fault")
            try cluster.createTopic(topic, partitions: partitions, replicationFactor: 3)
            return Setup(cluster: cluster, topic: topic, test: try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic)))
        }

        func waiting() async throws -> Int { try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") }

        /// Reads the topic until every id arrived; checks order per key. When some never arrive, says where the
        /// relay recorded them (partition and offset from their delivery reports), to tell a lost message from a
        /// consumer that did not fetch it.
        func expectAllInOrder(_ ids: [UUID]) async throws {
            let wanted = Set(ids.map { $0.uuidString.lowercased() })
            let reader = try KafkaTopicReader(brokers: cluster.bootstrapServers, topic: topic)
            do {
                try await reader.read(until: "every event id", timeout: .seconds(120)) { _ in reader.eventIDs.isSuperset(of: wanted) }
            } catch {
                let missing = Array(wanted.subtracting(reader.eventIDs))
                let recorded = try await test.pool.withConnection { connection in
                    try await connection.query(
                        "SELECT event_id::text || ' p' || COALESCE(kafka_partition::text, '-') || ' o' || COALESCE(kafka_offset::text, '-') FROM outbox WHERE event_id::text = ANY($1::text[])",
                        [.textArray(missing)]
                    ).map { try $0.decode(String.self, at: 0) }
                }
                let seen = reader.messages.map { "p\($0.partition) o\($0.offset)" }.sorted()
                Issue.record("never arrived: \(recorded); offsets seen per partition: \(Dictionary(grouping: reader.messages, by: \.partition).mapValues(\.count)); \(seen.count) messages")
                await reader.close()
                throw error
            }
            await reader.close()
            #expect(reader.eventIDs == wanted)
            #expect(reader.keysOutOfOrder.isEmpty)
        }
    }

    @Test("every broker down mid-pipeline: rows wait (no message timeout), nothing is lost or reordered")
    func allBrokersDown() async throws {
        let setup = try await Setup.make()
        var ids = try await setup.test.appendTicks(streams: 20, perStream: 50, batch: 10)
        try await withRelay(setup.test, brokers: setup.cluster.bootstrapServers) { relay in
            try await waitUntil("the relay publishes") { relay.publishedCount > 0 }
            try setup.cluster.setAllBrokersDown()
            ids += try await setup.test.appendTicks(streams: 20, perStream: 30, prefix: "during")
            try await waitUntil("librdkafka reports the brokers unreachable") { relay.kafkaErrorCount > 0 }
            #expect(try await setup.waiting() > 0)
            #expect(relay.producerRestartCount == 0, "no message timeout: the producer waits instead of failing")
            try setup.cluster.setAllBrokersUp()
            try await waitUntil("everything published", timeout: .seconds(90)) { try await setup.waiting() == 0 }
        }
        try await setup.expectAllInOrder(ids)
        try await setup.test.drop()
    }

    @Test("one broker of three down: partitions led by the others keep flowing; the rest follows when it returns")
    func oneBrokerDown() async throws {
        let setup = try await Setup.make()
        var ids = try await setup.test.appendTicks(streams: 30, perStream: 10)
        try await withRelay(setup.test, brokers: setup.cluster.bootstrapServers) { relay in
            try await waitUntil("first round published") { try await setup.waiting() == 0 }
            try setup.cluster.setBrokerDown(1)
            let before = relay.publishedCount
            ids += try await setup.test.appendTicks(streams: 30, perStream: 10, prefix: "during")
            try await waitUntil("rows of partitions led by brokers 2 and 3 published") { relay.publishedCount > before }
            try setup.cluster.setBrokerUp(1)
            try await waitUntil("everything published", timeout: .seconds(90)) { try await setup.waiting() == 0 }
        }
        try await setup.expectAllInOrder(ids)
        try await setup.test.drop()
    }

    /// The mock's limit: it checks sequence numbers only for transactional producers. With several requests in
    /// flight, a batch after a failed one is stored anyway (a real broker refuses it: OUT_OF_ORDER_SEQUENCE_NUMBER),
    /// and librdkafka then reports the failed batch delivered, offset unknown, though it was never stored: seen
    /// here with NOT_LEADER_FOR_PARTITION and REQUEST_TIMED_OUT (`shared/tools/mock-sequence-check.c`). So this
    /// test keeps one request in flight per broker, where no later batch can overtake a failed one and the mock
    /// is faithful; the exactly-once tests cover many in flight, where the mock does check.
    @Test(
        "Produce requests failing with an injected error (one request in flight): retried or the producer replaced; every event, in order",
        arguments: [KafkaError.Code.requestTimedOut, .notLeaderForPartition, .notEnoughReplicas, .outOfOrderSequenceNumber])
    func injectedProduceErrors(_ code: KafkaError.Code) async throws {
        let setup = try await Setup.make()
        var ids = try await setup.test.appendTicks(streams: 20, perStream: 20)
        try await withRelay(
            setup.test, brokers: setup.cluster.bootstrapServers, properties: ["max.in.flight.requests.per.connection": "1"]
        ) { relay in
            try await waitUntil("first round published") { try await setup.waiting() == 0 }
            setup.cluster.pushRequestErrors(.produce, Array(repeating: code, count: 5))
            ids += try await setup.test.appendTicks(streams: 20, perStream: 20, prefix: "faulty")
            try await waitUntil("everything published despite \(code)", timeout: .seconds(90)) { try await setup.waiting() == 0 }
            if code == .outOfOrderSequenceNumber {
                // librdkafka treats it as fatal for an idempotent producer: the relay must replace it, not spin.
                #expect(relay.producerRestartCount > 0)
            }
        }
        try await setup.expectAllInOrder(ids)
        try await setup.test.drop()
    }

    @Test("shutdown with every broker down returns within the shutdown timeout; unacknowledged rows wait for the next run")
    func boundedShutdown() async throws {
        let setup = try await Setup.make()
        try setup.cluster.setAllBrokersDown()
        let ids = try await setup.test.appendTicks(streams: 5, perStream: 20)
        var configuration = OutboxRelayConfiguration(
            databaseURL: setup.test.schema.url, kafka: KafkaConfiguration(bootstrapServers: setup.cluster.bootstrapServers))
        configuration.leaderLockKey = Int64.random(in: 1...Int64.max)
        configuration.shutdownTimeout = .seconds(1)
        let relay = OutboxRelay(configuration: configuration)
        let finished = Locked(false)
        let task = Task {
            try await relay.run()
            finished.withLock { $0 = true }
        }
        try await waitUntil("the relay is active and sees the brokers down") { relay.isActive && relay.kafkaErrorCount > 0 }
        relay.stop()
        // Generous against a loaded machine; without the bound it would wait for the brokers forever.
        try await waitUntil("run() returned after stop()", timeout: .seconds(15)) { finished.value }
        try await task.value
        #expect(relay.publishedCount == 0)
        #expect(try await setup.waiting() == ids.count)

        try setup.cluster.setAllBrokersUp()
        try await withRelay(setup.test, brokers: setup.cluster.bootstrapServers) { _ in
            try await waitUntil("the next run publishes everything") { try await setup.waiting() == 0 }
        }
        try await setup.expectAllInOrder(ids)
        try await setup.test.drop()
    }
}

@Suite("outbox relay housekeeping")
struct RelayHousekeepingTests {
    @Test("rows_waiting is refreshed while a 50,000-row backlog drains, not only at the end")
    func gaugesDuringDrain() async throws {
        let topic = uniqueName("backlog")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let total = try await test.bulkFill(streams: 500, perStream: 100, topic: topic)
        #expect(total == 50_000)
        let seen = Locked<[Int]>([])
        try await withRelay(test, brokers: try TestEnvironment.kafkaBrokers(), configure: { $0.housekeepingInterval = .milliseconds(50) }) {
            relay in
            try await waitUntil("the backlog drained", timeout: .seconds(240)) {
                if let waiting = relay.lastStatus?.waiting { seen.withLock { if $0.last != waiting { $0.append(waiting) } } }
                return relay.publishedCount >= total
            }
        }
        let midway = seen.value.filter { $0 > 0 && $0 < total }
        #expect(midway.count >= 2, "waiting counts seen: \(seen.value)")
        #expect(midway == midway.sorted(by: >), "the gauge falls as the backlog drains")
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0)
        try await test.drop()
    }
}
