import EventStore
import EventStoreSQL
import Foundation
import KafkaClient
import KafkaMock
@testable import OutboxRelay
import OutboxRelayStore
import LibPQ
import TestSupport
import Testing

/// An exactly-once relay's test set-up: its own mock cluster (3 brokers, sequence numbers checked for its
/// transactional producer), topic, progress topic and store.
struct ExactlyOnceSetup {
    /// How long a test waits for an exactly-once relay to get somewhere: it starts on a mock cluster of its own
    /// (coordinator lookup, InitProducerId, a claim committed, the progress read back) while the whole suite runs
    /// on the same two cores; 30 s was seen to be too short on a fresh clone's run.
    static let relayDeadline: Duration = .seconds(120)

    let cluster: MockCluster
    let topic: String
    let progressTopic: String
    let transactionalID: String
    let test: TestEventStore
    let source: RelaySource

    static func make(_ kind: SourceKind = .table, partitions: Int32 = 6) async throws -> ExactlyOnceSetup {
        let cluster = try MockCluster(brokers: 3)
        let topic = uniqueName("eo")
        try cluster.createTopic(topic, partitions: partitions, replicationFactor: 3)
        // The mock has no CreateTopics API: the progress topic is made here, as an operator would.
        try cluster.createTopic("\(topic).progress", partitions: 4, replicationFactor: 3)
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await kind.databaseURL())
        return ExactlyOnceSetup(
            cluster: cluster, topic: topic, progressTopic: "\(topic).progress", transactionalID: uniqueName("eo-relay"),
            test: test, source: try await RelaySource.prepare(kind, test))
    }

    /// Waits until everything appended so far is published: no waiting row (table), or the slot confirmed
    /// past the current WAL position (wal).
    func waitUntilPublished(timeout: Duration = .seconds(120)) async throws {
        guard let wal = source.wal else {
            try await waitUntil("everything published", timeout: timeout) { try await waiting() == 0 }
            return
        }
        let target = try await test.pool.withConnection { connection in
            try await connection.query("SELECT pg_current_wal_lsn()::text").first!.decode(String.self, at: 0)
        }
        try await waitUntil("the slot confirmed past \(target)", timeout: timeout) {
            try await test.pool.withConnection { connection in
                try await connection.query(
                    "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                    [.text(target), .text(wal.slot)]
                ).first!.decode(Bool.self, at: 0)
            }
        }
    }

    func drop() async throws { try await source.drop(test) }

    var brokers: String { cluster.bootstrapServers }

    func configure(_ configuration: inout OutboxRelayConfiguration) {
        source.configure(&configuration)
        configuration.delivery = .exactlyOnce
        configuration.transactionalID = transactionalID
        configuration.progressTopic = progressTopic
        configuration.transactionTimeout = .seconds(20)
    }

    func waiting() async throws -> Int { try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") }

    /// Asserts what a read_committed consumer sees: every id exactly once, nothing else, every stream 1, 2, 3, ...
    @discardableResult
    func expectExactlyOnce(_ ids: [UUID], progressPartitions: Int32 = 1) async throws -> CommittedView {
        let view = try await CommittedView.read(
            ids, brokers: brokers, topic: topic, progressTopic: progressTopic, progressPartitions: progressPartitions)
        #expect(view.duplicated.isEmpty, "duplicates for read_committed consumers: \(view.duplicated.prefix(5))")
        #expect(Set(view.counts.keys) == Set(ids.map { $0.uuidString.lowercased() }))
        #expect(view.keysNotExactlyOnceInOrder.isEmpty, "streams not exactly 1, 2, 3, ...: \(view.keysNotExactlyOnceInOrder.prefix(5))")
        return view
    }
}

@Suite("exactly-once relay (real PostgreSQL + a mock cluster per test)")
struct ExactlyOnceRelayTests {
    @Test(
        "publishes every event once, in Kafka transactions that end with a progress record",
        arguments: SourceKind.allCases)
    func publishesOnce(_ kind: SourceKind) async throws {
        let setup = try await ExactlyOnceSetup.make(kind)
        let ids = try await setup.test.appendTicks(streams: 20, perStream: 50, batch: 10)
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 100, configure: setup.configure) { relay in
            try await setup.waitUntilPublished()
            #expect(relay.committedTransactionCount >= 10)
            #expect(relay.abortedTransactionCount == 0)
            #expect(relay.publishedCount == ids.count)
        }
        let view = try await setup.expectExactlyOnce(ids)
        #expect(view.aborted == 0)
        if kind == .table {
            #expect(try await setup.test.count("SELECT count(*) FROM outbox WHERE kafka_offset IS NULL") == 0, "rows marked with their offsets")
        }
        try await setup.drop()
    }

    @Test("a crash after Kafka committed but before the database heard of it: the next relay marks those rows and repeats none")
    func crashBetweenCommitAndMark() async throws {
        let setup = try await ExactlyOnceSetup.make()
        var ids = try await setup.test.appendTicks(streams: 10, perStream: 30)
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, configure: setup.configure) { _ in
            try await waitUntil("everything published", timeout: ExactlyOnceSetup.relayDeadline) { try await setup.waiting() == 0 }
        }
        // The state such a crash leaves: Kafka holds the last transaction, the database still has its rows waiting.
        let lastTransaction = try await setup.test.count("SELECT count(*) FROM (SELECT id FROM outbox ORDER BY id DESC LIMIT 50) t")
        _ = try await setup.test.pool.withConnection { connection in
            try await connection.execute(
                "UPDATE outbox SET published_at = NULL, kafka_partition = NULL, kafka_offset = NULL WHERE id IN (SELECT id FROM outbox ORDER BY id DESC LIMIT 50)")
        }
        #expect(try await setup.waiting() == lastTransaction)
        ids += try await setup.test.appendTicks(streams: 10, perStream: 5, prefix: "after")
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, configure: setup.configure) { _ in
            try await waitUntil("everything published", timeout: ExactlyOnceSetup.relayDeadline) { try await setup.waiting() == 0 }
        }
        #expect(try await setup.test.count("SELECT count(*) FROM outbox WHERE kafka_offset IS NULL") == lastTransaction,
                "the recovered rows are marked without an offset; the rest with theirs")
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }

    @Test(
        "Produce requests failing with an injected error: the mock checks sequences; every event once, in order",
        arguments: SourceKind.allCases, [KafkaError.Code.requestTimedOut, .notLeaderForPartition, .notEnoughReplicas, .outOfOrderSequenceNumber])
    func injectedProduceErrors(_ kind: SourceKind, _ code: KafkaError.Code) async throws {
        let setup = try await ExactlyOnceSetup.make(kind)
        var ids = try await setup.test.appendTicks(streams: 20, perStream: 20)
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 100, configure: setup.configure) { _ in
            try await setup.waitUntilPublished()
            for round in 0..<4 {
                setup.cluster.pushRequestErrors(.produce, Array(repeating: code, count: 5))
                ids += try await setup.test.appendTicks(streams: 20, perStream: 10, prefix: "faulty\(round)")
                try await setup.waitUntilPublished()
            }
        }
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }

    @Test("every broker down mid-transaction and back: nothing lost, nothing repeated", arguments: SourceKind.allCases)
    func allBrokersDown(_ kind: SourceKind) async throws {
        let setup = try await ExactlyOnceSetup.make(kind)
        var ids = try await setup.test.appendTicks(streams: 20, perStream: 50, batch: 10)
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 100, configure: setup.configure) { relay in
            try await waitUntil("the relay publishes", timeout: ExactlyOnceSetup.relayDeadline) { relay.committedTransactionCount > 0 }
            try setup.cluster.setAllBrokersDown()
            ids += try await setup.test.appendTicks(streams: 20, perStream: 30, prefix: "during")
            try await waitUntil("librdkafka reports the brokers unreachable", timeout: ExactlyOnceSetup.relayDeadline) { relay.kafkaErrorCount > 0 }
            try setup.cluster.setAllBrokersUp()
            try await setup.waitUntilPublished()
        }
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }

    @Test("one broker of three down and back: nothing lost, nothing repeated")
    func oneBrokerDown() async throws {
        let setup = try await ExactlyOnceSetup.make()
        var ids = try await setup.test.appendTicks(streams: 30, perStream: 10)
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 100, configure: setup.configure) { relay in
            try await waitUntil("first round published", timeout: ExactlyOnceSetup.relayDeadline) { try await setup.waiting() == 0 }
            try setup.cluster.setBrokerDown(1)
            ids += try await setup.test.appendTicks(streams: 30, perStream: 10, prefix: "during")
            try await Task.sleep(for: .seconds(2))
            try setup.cluster.setBrokerUp(1)
            try await waitUntil("everything published", timeout: .seconds(120)) { try await setup.waiting() == 0 }
        }
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }

    @Test("two relays split 4 partitions, each partition its own transactional.id and progress partition; one stops, the other takes over")
    func partitioned() async throws {
        let setup = try await ExactlyOnceSetup.make()
        let lockKey = Int64.random(in: 1...Int64.max / 2)
        var ids = try await setup.test.appendTicks(streams: 40, perStream: 10)
        let configure: (inout OutboxRelayConfiguration) -> Void = {
            setup.configure(&$0)
            $0.partitions = 4
            $0.leaderLockKey = lockKey
            $0.standbyRetryInterval = .milliseconds(200)
        }
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, applicationName: "relay-a", configure: configure) { first in
            try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, applicationName: "relay-b", configure: configure) { second in
                try await waitUntil("both publish", timeout: ExactlyOnceSetup.relayDeadline) { first.committedTransactionCount > 0 && second.committedTransactionCount > 0 }
                try await waitUntil("everything published", timeout: ExactlyOnceSetup.relayDeadline) { try await setup.waiting() == 0 }
            }
            ids += try await setup.test.appendTicks(streams: 40, perStream: 5, prefix: "alone")
            try await waitUntil("the survivor publishes every partition", timeout: ExactlyOnceSetup.relayDeadline) { try await setup.waiting() == 0 }
        }
        try await setup.expectExactlyOnce(ids, progressPartitions: 4)
        try await setup.drop()
    }

    @Test("a partition given back on rebalance stops at once though idle: a joining relay gets its share long before the poll interval")
    func givesBackAnIdlePartitionAtOnce() async throws {
        let setup = try await ExactlyOnceSetup.make()
        let lockKey = Int64.random(in: 1...Int64.max / 2)
        let ids = try await setup.test.appendTicks(streams: 20, perStream: 3)
        let joiner = uniqueName("relay-joiner")
        let configure: (inout OutboxRelayConfiguration) -> Void = {
            setup.configure(&$0)
            $0.partitions = 4
            $0.leaderLockKey = lockKey
            $0.standbyRetryInterval = .milliseconds(200)
            // An idle engine waits this long for rows unless woken: far beyond the deadline below, so only the
            // wake-up that comes with the request to stop lets it give its partition back in time.
            $0.pollInterval = .seconds(3600)
        }
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, configure: configure) { first in
            try await waitUntil("the first relay publishes everything", timeout: ExactlyOnceSetup.relayDeadline) { try await setup.waiting() == 0 }
            try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, applicationName: joiner, configure: configure) { _ in
                try await waitUntil("the joining relay holds 2 of the 4 partitions", timeout: ExactlyOnceSetup.relayDeadline) {
                    try await setup.test.count(
                        """
                        SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                        WHERE l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.granted AND a.application_name = $1
                        """, [.text(joiner)]) == 2
                }
            }
        }
        try await setup.expectExactlyOnce(ids, progressPartitions: 4)
        try await setup.drop()
    }

    @Test("a producer that cannot start (InitProducerId refused) makes the relay not ready, with the reason; ready again once it starts")
    func readinessFollowsTheProducer() async throws {
        let setup = try await ExactlyOnceSetup.make()
        let ids = try await setup.test.appendTicks(streams: 3, perStream: 5)
        // TRANSACTIONAL_ID_AUTHORIZATION_FAILED, until cleared: every producer generation fails at its init.
        setup.cluster.pushRequestErrors(.initProducerID, Array(repeating: KafkaError.Code(rawValue: 53), count: 10_000))
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 100, configure: setup.configure) { relay in
            try await waitUntil("a producer generation fails", timeout: ExactlyOnceSetup.relayDeadline) { relay.producerRestartCount > 0 }
            let problem = try #require(relay.readinessProblem)
            #expect(problem.contains("Kafka producer failed"), "\(problem)")
            #expect(try await setup.waiting() == ids.count, "nothing published while no producer can start")
            setup.cluster.clearRequestErrors(.initProducerID)
            try await waitUntil("the relay publishes", timeout: .seconds(60)) { try await setup.waiting() == 0 }
            #expect(relay.readinessProblem == nil)
        }
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }

    @Test("a row Kafka refuses for good is dead-lettered, its stream held; every other event once")
    func deadLetter() async throws {
        let setup = try await ExactlyOnceSetup.make()
        var ids = try await setup.test.appendTicks(streams: 5, perStream: 10)
        let big = try await setup.test.appendTicks(streams: 1, perStream: 1, prefix: "huge")
        try await setup.test.pool.withConnection { connection in
            _ = try await connection.execute(
                "UPDATE outbox SET envelope = repeat('x', 200000) WHERE event_id = $1", [.uuid(big[0])])
        }
        ids += try await setup.test.appendTicks(streams: 5, perStream: 10, prefix: "later")
        try await withRelay(
            setup.test, brokers: setup.brokers, properties: ["message.max.bytes": "100000"], batchSize: 100,
            configure: setup.configure
        ) { _ in
            try await waitUntil("everything but the refused row published", timeout: ExactlyOnceSetup.relayDeadline) { try await setup.waiting() == 0 }
        }
        #expect(try await setup.test.count("SELECT count(*) FROM outbox_dead_letters") == 1)
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }
}

@Suite("exactly-once relay: pure parts")
struct ExactlyOnceUnitTests {
    private func row(_ id: Int64) -> OutboxRow {
        OutboxRow(
            id: id, eventID: UUID(), streamID: "s", streamVersion: id, topic: "t", key: "s", envelope: "{}", headers: [:],
            createdAt: Date())
    }

    @Test("id ranges: consecutive ids collapse; the text form round-trips; malformed text is refused")
    func idRanges() throws {
        let ranges = IDRanges([5, 1, 2, 3, 9, 10, 7, 3])
        #expect(ranges.description == "1-3,5,7,9-10")
        #expect(ranges.count == 7)
        #expect(ranges.ids == [1, 2, 3, 5, 7, 9, 10])
        #expect(IDRanges(parsing: "1-3,5,7,9-10") == ranges)
        #expect(IDRanges(parsing: "")?.count == 0)
        for bad in ["-1", "3-1", "1,1", "a", "1-2-3", "1,,2", "0", "5,3", "1-3,2"] {
            #expect(IDRanges(parsing: bad) == nil, "\(bad) must be refused")
        }
    }

    @Test("a progress record round-trips; a foreign record is refused with where it was and what to do")
    func progressRecord() throws {
        var progress = RelayProgress(unit: "table", transaction: "t/1")
        progress.outboxIDs = IDRanges([1, 2, 3, 10])
        let decoded = try RelayProgress.decode(progress.encoded(), at: "x")
        #expect(decoded == progress)
        #expect(String(decoding: progress.encoded(), as: UTF8.self).contains(#""outbox_ids":"1-3,10""#))
        var wal = RelayProgress(unit: "wal.s", transaction: "t/2")
        wal.walPosition = "16/B374D848"
        #expect(try RelayProgress.decode(wal.encoded(), at: "x").walLSN?.description == "16/B374D848")
        #expect(throws: RelayProgressError.self) { try RelayProgress.decode(Array(#"{"hello":"world"}"#.utf8), at: "p [0] offset 7") }
        do {
            _ = try RelayProgress.decode(Array(#"{"unit":"u","transaction":"t","wal_position":"zz"}"#.utf8), at: "p [0] offset 7")
            Issue.record("a bad WAL position must be refused")
        } catch {
            #expect("\(error)".contains("p [0] offset 7"))
            #expect("\(error)".contains("written only by outbox-relay"))
        }
    }

    @Test("the newest progress record counts unless a newer producer had claimed the unit before it was stored")
    func claims() {
        func record(_ label: String, claim: Bool = false, ids: [Int64] = []) -> (key: String?, progress: RelayProgress) {
            var progress = RelayProgress(unit: "u", transaction: label)
            if claim { progress.claim = true } else { progress.outboxIDs = IDRanges(ids) }
            return (claim ? RelayProgress.claimKey("u") : "u", progress)
        }
        let a = "u/aaaa-1", b = "u/bbbb-1"
        #expect(RelayProgress.validLatest([], unit: "u") == nil)
        #expect(RelayProgress.validLatest([record("\(a).claim", claim: true)], unit: "u") == nil)
        // A committed, then B claimed: B resumes from A's last record.
        #expect(RelayProgress.validLatest(
            [record("\(a).claim", claim: true), record("\(a).1", ids: [1]), record("\(a).2", ids: [2]), record("\(b).claim", claim: true)],
            unit: "u")?.transaction == "\(a).2")
        // A's record stored after B's claim (a fenced producer on a broker that does not check epochs) never counts.
        #expect(RelayProgress.validLatest(
            [record("\(a).claim", claim: true), record("\(a).1", ids: [1]), record("\(b).claim", claim: true), record("\(a).2", ids: [2])],
            unit: "u")?.transaction == "\(a).1")
        #expect(RelayProgress.validLatest(
            [record("\(a).1", ids: [1]), record("\(b).claim", claim: true), record("\(a).2", ids: [2]), record("\(b).1", ids: [3])],
            unit: "u")?.transaction == "\(b).1")
        // Another unit's records are not this unit's.
        #expect(RelayProgress.validLatest([(key: "other", progress: record("x/y-1.1", ids: [9]).progress)], unit: "u") == nil)
        #expect(RelayProgress(unit: "u", transaction: "eventoutbox-relay.db.public/ab12-3.17").generation == "eventoutbox-relay.db.public/ab12-3")
    }

    private func outcome(_ reports: [KafkaError.Code?], sent: Int? = nil) -> String {
        var round = TransactionRound(label: "t")
        for index in 0..<(sent ?? reports.count) { round.sent(row(Int64(index + 1)), messageID: UInt64(index + 1)) }
        for (index, code) in reports.enumerated().reversed() {
            round.record(KafkaDeliveryReport(
                messageID: UInt64(index + 1), topic: "t", partition: 0, offset: code == nil ? Int64(index) : nil,
                error: code.map { KafkaError(code: $0, message: "") }))
        }
        round.record(KafkaDeliveryReport(messageID: 99, topic: "t", partition: 0, offset: nil, error: KafkaError(code: .purgedQueue, message: "")))
        switch round.next {
        case .wait: return "wait"
        case .sendProgress(let deliveries): return "progress " + deliveries.map { "\($0.id)" }.joined(separator: ",")
        case .abort(let deadLetters, let reason): return "abort \(reason.code) dead letters \(deadLetters.map(\.id))"
        }
    }

    @Test("a round waits for every report, sends progress with the deliveries in id order, aborts on a failure")
    func round() {
        #expect(outcome([nil, nil, nil]) == "progress 1,2,3")
        #expect(outcome([nil, nil], sent: 3) == "wait")
        #expect(outcome([nil, .requestTimedOut, .purgedQueue]) == "abort REQUEST_TIMED_OUT dead letters []")
        #expect(outcome([.purgedInFlight, .messageSizeTooLarge, nil]) == "abort MSG_SIZE_TOO_LARGE dead letters [2]")
    }

    @Test("the toolkit's consumers read read_committed: records of aborted transactions never reach a projection")
    func consumersReadCommitted() {
        #expect(KafkaConsumer.defaultProperties["isolation.level"] == "read_committed")
        #expect(KafkaPartitionReader.defaultProperties["isolation.level"] == "read_committed")
    }

    @Test("after a failed call: abort and resume, or a new producer (fenced, fatal, unknown outcome)")
    func failureResponse() {
        #expect(TransactionFailureResponse(KafkaError(code: .requestTimedOut, message: "", requiresAbort: true)) == .abortAndResume)
        #expect(TransactionFailureResponse(KafkaError(code: .producerFenced, message: "")) == .replaceProducer)
        #expect(TransactionFailureResponse(KafkaError(code: .outOfOrderSequenceNumber, message: "", isFatal: true)) == .replaceProducer)
        #expect(TransactionFailureResponse(KafkaError(code: .timedOut, message: "", isRetriable: true)) == .replaceProducer)
        #expect(TransactionFailureResponse(KafkaError(code: .purgedQueue, message: "")) == .abortAndResume)
    }
}

@Suite("exactly-once relay restarts")
struct ExactlyOnceRestartTests {
    @Test("a relay stopped and started again publishes what came meanwhile, once", arguments: SourceKind.allCases)
    func restart(_ kind: SourceKind) async throws {
        let setup = try await ExactlyOnceSetup.make(kind)
        var ids = try await setup.test.appendTicks(streams: 10, perStream: 10)
        for round in 0..<3 {
            try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, configure: setup.configure) { _ in
                try await setup.waitUntilPublished(timeout: .seconds(30))
            }
            ids += try await setup.test.appendTicks(streams: 10, perStream: 10, prefix: "round\(round)")
        }
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, configure: setup.configure) { _ in
            try await setup.waitUntilPublished(timeout: .seconds(30))
        }
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }

    @Test("a relay started on an empty outbox publishes what comes while it runs", arguments: SourceKind.allCases)
    func startEmpty(_ kind: SourceKind) async throws {
        let setup = try await ExactlyOnceSetup.make(kind)
        var ids: [UUID] = []
        try await withRelay(setup.test, brokers: setup.brokers, batchSize: 50, configure: setup.configure) { relay in
            try await waitUntil("the relay is active", timeout: ExactlyOnceSetup.relayDeadline) { relay.isActive }
            for round in 0..<3 {
                ids += try await setup.test.appendTicks(streams: 10, perStream: 5, prefix: "round\(round)")
                try await setup.waitUntilPublished(timeout: .seconds(30))
            }
        }
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }
}
