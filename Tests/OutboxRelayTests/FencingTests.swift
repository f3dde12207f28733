import EventStore
import Foundation
import KafkaClient
import KafkaMock
import OutboxRelayStore
import LibPQ
import TestSupport
import Testing

/// The relay's progress records (and claims) in order, each with the producer instance that wrote it (from its
/// transaction label, `TRANSACTIONAL_ID/INSTANCE-GENERATION.N`).
private func progressRecords(_ setup: ExactlyOnceSetup, partition: Int32 = 0) async throws -> [(instance: String, claim: Bool)] {
    let reader = try KafkaPartitionReader(configuration: KafkaConfiguration(bootstrapServers: setup.brokers, properties: ["log_level": "3"]))
    return try await reader.readToEnd(topic: setup.progressTopic, partition: partition, timeout: .seconds(30)).compactMap { record in
        guard let label = record.header("eventoutbox-transaction")?.stringValue, let slash = label.lastIndex(of: "/") else { return nil }
        return (String(label[label.index(after: slash)...].prefix { $0 != "-" }), record.keyString?.hasSuffix("#claim") == true)
    }
}

/// The progress records' writers, claims left out.
private func progressWriters(_ setup: ExactlyOnceSetup) async throws -> [String] {
    try await progressRecords(setup).filter { !$0.claim }.map(\.instance)
}

@Suite("exactly-once relay processes: fencing and kills (real PostgreSQL + a mock cluster per test)", .serialized)
struct FencingTests {
    @Test(
        "a relay paused (SIGSTOP) while another takes over its lock or slot commits nothing once resumed",
        arguments: SourceKind.allCases)
    func pausedRelayIsFenced(_ kind: SourceKind) async throws {
        let setup = try await ExactlyOnceSetup.make(kind)
        let lockKey = Int64.random(in: 1...2_000_000_000)
        let arguments = setup.source.arguments + [
            "--delivery", "exactly-once", "--transactional-id", setup.transactionalID, "--progress-topic", setup.progressTopic,
            "--transaction-timeout", "20",
        ]
        var ids = try await setup.test.appendTicks(streams: 20, perStream: 20)
        let first = try RelayProcess.start(setup.test, name: "relay-paused", lockKey: lockKey, brokers: setup.brokers, extra: arguments)
        try await setup.waitUntilPublished()
        let writersBefore = try await progressWriters(setup)
        let pausedInstance = try #require(writersBefore.last)

        // The first relay is frozen (a long GC pause, a VM migration), then its sessions are cut, as a network
        // partition would: that frees its lock or slot. The table relay is frozen mid-work, under appends; the WAL
        // relay while idle, since a walsender with output pending for a frozen client cannot be terminated
        // (it blocks sending its goodbye) and keeps the slot until TCP gives up.
        if kind == .table {
            let load = Task { try await setup.test.appendTicks(streams: 20, perStream: 10, prefix: "during-pause") }
            try await waitUntil("the first relay commits under the new load", timeout: ExactlyOnceSetup.relayDeadline) { try await progressWriters(setup).count > writersBefore.count }
            first.signal(SIGSTOP)
            ids += try await load.value
        } else {
            first.signal(SIGSTOP)
        }
        // Its sessions, and the walsender streaming its slot.
        let terminated = try await setup.test.count(
            """
            SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'relay-paused'
                 OR pid = (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1)) t
            """, [.text(setup.source.wal?.slot ?? "")])
        #expect(terminated > 0)
        if kind == .wal { ids += try await setup.test.appendTicks(streams: 20, perStream: 10, prefix: "during-pause") }

        let second = try RelayProcess.start(setup.test, name: "relay-new", lockKey: lockKey, brokers: setup.brokers, extra: arguments)
        try await setup.waitUntilPublished()

        // Resumed, the first relay finds its producer fenced and its sessions gone: it commits nothing more.
        first.signal(SIGCONT)
        ids += try await setup.test.appendTicks(streams: 20, perStream: 10, prefix: "after-resume")
        try await waitUntil("the resumed relay sees that it was fenced or lost its database", timeout: .seconds(60)) {
            first.output.contains("fenced") || first.output.contains("lost its database connection")
                || first.output.contains("cannot stream the outbox") || first.output.contains("another relay is")
        }
        try await setup.waitUntilPublished()
        // librdkafka's mock does not fence: a new InitProducerId gets a new producer id and the old one stays
        // valid (rd_kafka_mock_pid_find looks a pid up by id), so the resumed relay may still store and even
        // commit a transaction there, which a real broker refuses (its epoch was bumped). Such a transaction
        // stands after the new relay's claim, so it never counts, neither for the next recovery nor for the
        // read_committed view below; and the resumed relay cannot touch the database, whose session it lost.
        let records = try await progressRecords(setup)
        let newClaim = try #require(records.lastIndex { $0.claim && $0.instance != pausedInstance })
        let lateFromPaused = records[newClaim...].filter { !$0.claim && $0.instance == pausedInstance }.count
        if lateFromPaused > 0 {
            #expect(
                first.output.contains("fenced") || first.output.contains("lost its database connection"),
                "the paused relay stored \(lateFromPaused) progress records after the takeover without noticing it lost the unit: \(first.output.suffix(2000))")
        }
        #expect(records[newClaim...].contains { !$0.claim && $0.instance != pausedInstance }, "the new relay goes on committing")
        first.signal(SIGTERM)
        second.signal(SIGTERM)
        #expect(try await first.waitForExit() == 0, "\(first.output.suffix(2000))")
        #expect(try await second.waitForExit() == 0, "\(second.output.suffix(2000))")
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }

    @Test("outbox-relay --source wal SIGKILLed 20 times at random moments under appends: every event once, in order", arguments: [SourceKind.wal])
    func walRelayKilledRepeatedly(_ kind: SourceKind) async throws {
        let setup = try await ExactlyOnceSetup.make(kind)
        let lockKey = Int64.random(in: 1...2_000_000_000)
        let arguments = setup.source.arguments + [
            "--delivery", "exactly-once", "--transactional-id", setup.transactionalID, "--progress-topic", setup.progressTopic,
            "--transaction-timeout", "20",
        ]
        var ids: [UUID] = []
        var relay = try RelayProcess.start(setup.test, name: "relay-k0", lockKey: lockKey, brokers: setup.brokers, extra: arguments)
        for kill in 1...20 {
            let before = try await progressWriters(setup).count
            // Appends race with the relay (the mock keeps about 5 MB a partition: the load is bounded).
            let appending = Task { try await setup.test.appendTicks(streams: 10, perStream: 5, prefix: "k\(kill)-") }
            // A random moment: after a random number of this run's commits (0: right after its start).
            let commits = Int.random(in: 0...1)
            try await waitUntil("run \(kill) commits \(commits) transactions", timeout: .seconds(60)) {
                try await progressWriters(setup).count >= before + commits
            }
            relay.signal(SIGKILL)
            _ = try await relay.waitForExit()
            ids += try await appending.value
            relay = try RelayProcess.start(setup.test, name: "relay-k\(kill)", lockKey: lockKey, brokers: setup.brokers, extra: arguments)
        }
        try await setup.waitUntilPublished()
        // SIGTERM is handled once the relay runs (before that it would end the process with the default action).
        try await waitUntil("the last relay streams the slot", timeout: ExactlyOnceSetup.relayDeadline) { relay.output.contains("streaming the outbox from the WAL") }
        relay.signal(SIGTERM)
        #expect(try await relay.waitForExit() == 0, "\(relay.output.suffix(2000))")
        try await setup.expectExactlyOnce(ids)
        try await setup.drop()
    }
}
