import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import InMemoryTracing
import KafkaClient
import KafkaMock
import OutboxRelay
import OutboxRelayStore
import LibPQ
import TestSupport
import Testing
import Tracing

/// The slot's confirmed position and the server's current WAL position.
private func positions(_ test: TestEventStore, _ wal: OutboxWAL) async throws -> (confirmed: PostgresLSN, current: PostgresLSN) {
    try await test.pool.withConnection { connection in
        let row = try await connection.query(
            "SELECT confirmed_flush_lsn::text AS c, pg_current_wal_lsn()::text AS w FROM pg_replication_slots WHERE slot_name = $1",
            [.text(wal.slot)]
        ).first!
        return (PostgresLSN(try row.decode(String.self, "c"))!, PostgresLSN(try row.decode(String.self, "w"))!)
    }
}

@Suite("outbox-relay --source wal: setup, confirmation, dead letters, retention (real PostgreSQL + Kafka mock cluster)")
struct WALRelayTests {
    @Test("missing publication or slot: the relay refuses to start with what to run; migrate --wal, wal status, drop-slot")
    func setup() async throws {
        let test = try await TestEventStore.create(databaseURL: try await TestEnvironment.walDatabaseURL())
        let wal = try OutboxWAL(publication: "p_" + test.schema.name, slot: "s_" + test.schema.name)
        let brokers = try TestEnvironment.kafkaBrokers()
        await #expect { try await withRelay(test, brokers: brokers, configure: { $0.source = .wal(wal) }) { _ in } } throws: { error in
            let text = "\(error)"
            return error is WALSetupError && text.contains("publication '\(wal.publication)' does not exist")
                && text.contains("eventoutbox migrate --wal") && text.contains("replication slot '\(wal.slot)' does not exist")
        }
        let names = ["--publication", wal.publication, "--slot", wal.slot]
        let env = ["EVENTOUTBOX_DATABASE_URL": test.schema.url]
        let refused = try await Tools.run("outbox-relay", ["--source", "wal", "--brokers", brokers] + names, environment: env)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("eventoutbox migrate --wal") || refused.stdout.contains("eventoutbox migrate --wal"))
        let badName = try await Tools.run("outbox-relay", ["--source", "wal", "--brokers", brokers, "--slot", "Bad-Name"], environment: env)
        #expect(badName.status != 0)
        #expect(badName.stderr.contains("lower-case letters"))

        let before = try await Tools.run("eventoutbox", ["wal", "status"] + names, environment: env)
        #expect(before.stdout.contains("wal_level:    logical"))
        #expect(before.stdout.contains("(missing)"))
        #expect(before.status == 3, "problems found: exit 3")
        let migrated = try await Tools.run("eventoutbox", ["migrate", "--wal"] + names, environment: env)
        #expect(migrated.status == 0, "\(migrated.stderr)")
        #expect(migrated.stdout.contains("created publication \(wal.publication) and replication slot \(wal.slot)"))
        #expect(try await Tools.run("eventoutbox", ["migrate", "--wal"] + names, environment: env).stdout.contains("exist"))
        let after = try await Tools.run("eventoutbox", ["wal", "status", "--json"] + names, environment: env)
        #expect(after.status == 0, "all in order: exit 0")
        let json = try JSONSerialization.jsonObject(with: Data(after.stdout.utf8)) as? [String: Any]
        #expect(json?["publicationCoversOutbox"] as? Bool == true)
        #expect((json?["slot"] as? [String: Any])?["plugin"] as? String == "pgoutput")
        let dropped = try await Tools.run("eventoutbox", ["wal", "drop-slot"] + names, environment: env)
        #expect(dropped.status == 0)
        let again = try await Tools.run("eventoutbox", ["wal", "drop-slot"] + names, environment: env)
        #expect(again.status != 0)
        #expect(again.stderr.contains("no replication slot"))
        try await test.pool.withConnection { try await wal.dropPublication(on: $0) }
        try await test.drop()
    }

    @Test("the slot is confirmed only past what Kafka acknowledged: a slow broker holds it back, then it catches up")
    func confirmsOnlyAcknowledged() async throws {
        let cluster = try MockCluster(brokers: 1)
        let topic = uniqueName("walack")
        try cluster.createTopic(topic, partitions: 2)
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await TestEnvironment.walDatabaseURL())
        let source = try await RelaySource.prepare(.wal, test)
        let wal = try #require(source.wal)
        var ids = try await test.appendTicks(streams: 2, perStream: 5)
        try await withRelay(test, brokers: cluster.bootstrapServers, configure: source.configure) { relay in
            let first = try await positions(test, wal).current
            try await waitUntil("the first events confirmed") { try await positions(test, wal).confirmed >= first }
            // The broker answers 3 s late (no message timeout in the relay: it waits for the acknowledgements).
            try cluster.setRoundTrip(broker: 1, milliseconds: 3000)
            ids += try await test.appendTicks(streams: 2, perStream: 5, prefix: "while-slow")
            let second = try await positions(test, wal).current
            // The relay reports how far it has read (write_lsn) apart from what it confirms (the slot's flush).
            try await waitUntil("the relay has read the events written while the broker is slow") {
                try await test.pool.withConnection { connection in
                    try await connection.query(
                        "SELECT r.write_lsn::text FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
                        [.text(wal.slot)]
                    ).first.flatMap { PostgresLSN(try $0.decode(String.self, at: 0)) }.map { $0 >= second } ?? false
                }
            }
            #expect(try await positions(test, wal).confirmed < second, "confirmed past events Kafka has not acknowledged yet")
            try cluster.setRoundTrip(broker: 1, milliseconds: 0)
            try await waitUntil("everything confirmed once the acknowledgements arrive", timeout: .seconds(60)) {
                try await positions(test, wal).confirmed >= second
            }
        }
        let reader = try await KafkaTopicReader.readAll(ids, brokers: cluster.bootstrapServers, topic: topic)
        expectComplete(reader, ids)
        // WAL mode never updates outbox rows.
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == 0)
        try await source.drop(test)
    }

    @Test("a row Kafka refuses is a dead letter, its stream's later rows are held behind it, retry publishes them in order")
    func deadLetters() async throws {
        let topic = uniqueName("waldead")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await TestEnvironment.walDatabaseURL())
        let source = try await RelaySource.prepare(.wal, test)
        let brokers = try TestEnvironment.kafkaBrokers()
        var held: [UUID] = []
        for (n, filler) in ["", String(repeating: "x", count: 40_000), "", ""].enumerated() {
            let event = NewEvent(Tick(n: n, filler: filler))
            held.append(event.eventID)
            try await test.store.append([event], to: "held", category: "tick", expectedVersion: .exact(Int64(n)))
        }
        let free = try await test.appendTicks(streams: 1, perStream: 3, prefix: "free")
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        try await withRelay(test, brokers: brokers, properties: ["message.max.bytes": "20000"], configure: source.configure) { _ in
            try await reader.read(until: "the free stream and the first held event") { _ in
                reader.eventIDs.isSuperset(of: free.map { $0.uuidString.lowercased() } + [held[0].uuidString.lowercased()])
            }
            try await waitUntil("the big row and the two after it recorded") {
                try await test.count("SELECT count(*) FROM outbox_dead_letters") == 3
            }
        }
        #expect(!reader.eventIDs.contains(held[1].uuidString.lowercased()))
        #expect(!reader.eventIDs.contains(held[3].uuidString.lowercased()))
        let letters = try await test.pool.withConnection { try await OutboxTable().deadLetters(on: $0) }
        #expect(letters.map(\.streamVersion) == [2, 3, 4])
        #expect(letters[0].error.contains("MSG_SIZE_TOO_LARGE"))
        #expect(letters[1].error.contains("held back behind dead letter \(letters[0].outboxID)"))
        #expect(try await test.count("SELECT count(*) FROM outbox_dead_letters WHERE held_behind = $1", [.int64(letters[0].outboxID)]) == 2)

        let env = ["EVENTOUTBOX_DATABASE_URL": test.schema.url]
        let retried = try await Tools.run("eventoutbox", ["dead-letters", "retry", String(letters[0].outboxID)], environment: env)
        #expect(retried.status == 0, "\(retried.stderr)")
        #expect(try await test.count("SELECT count(*) FROM outbox_dead_letters") == 0)
        try await withRelay(test, brokers: brokers, configure: source.configure) { _ in
            try await reader.read(until: "the held stream") { _ in reader.eventIDs.isSuperset(of: held.map { $0.uuidString.lowercased() }) }
        }
        #expect(reader.versionsByKey["held"] == [1, 2, 3, 4])
        await reader.close()
        try await source.drop(test)
    }

    @Test("retention deletes rows by age (they are never marked); the log already holds them")
    func retention() async throws {
        let topic = uniqueName("walret")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await TestEnvironment.walDatabaseURL())
        let source = try await RelaySource.prepare(.wal, test)
        let brokers = try TestEnvironment.kafkaBrokers()
        let ids = try await test.appendTicks(streams: 3, perStream: 10)
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        try await withRelay(test, brokers: brokers, retention: .zero, configure: {
            source.configure(&$0)
            $0.housekeepingInterval = .milliseconds(200)
        }) { _ in
            try await reader.read(until: "every event") { _ in reader.eventIDs.count >= ids.count }
            try await waitUntil("retention empties the outbox") { try await test.count("SELECT count(*) FROM outbox") == 0 }
        }
        expectComplete(reader, ids)
        await reader.close()
        try await source.drop(test)
    }

    @Test("the WAL relay continues each row's trace: a publish span, child of the span its traceparent names")
    func publishSpan() async throws {
        let tracer = WatchingTracer.shared
        let (traceID, parent) = (WatchingTracer.hex(16), WatchingTracer.hex(8))
        tracer.watch(traceID)
        let test = try await TestEventStore.create(databaseURL: try await TestEnvironment.walDatabaseURL())
        let wal = try OutboxWAL(publication: "p_" + test.schema.name, slot: "s_" + test.schema.name)
        _ = try await test.pool.withConnection { try await wal.setUp(on: $0) }
        let event = NewEvent(Tick(n: 1), metadata: EventMetadata(traceparent: "00-\(traceID)-\(parent)-01"))
        try await test.store.append([event], to: "traced", category: "tick", expectedVersion: .noStream)
        try await withRelay(test, brokers: try TestEnvironment.kafkaBrokers(), configure: { $0.source = .wal(wal) }) { _ in
            try await waitUntil("the row's publish span ended") {
                tracer.spans(of: traceID).contains { $0.operationName == "eventoutbox.publish" }
            }
        }
        let span = try #require(tracer.spans(of: traceID).first { $0.operationName == "eventoutbox.publish" })
        #expect(span.parentSpanID == parent)
        #expect(span.kind == .producer)
        try await dropWhenFree(wal, test)
        try await test.drop()
    }
}
