import EventSourcing
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

/// Runs an in-process relay for the duration of `body`, then stops it gracefully.
func withRelay<T>(
    _ test: TestEventStore, brokers: String, properties: [String: String] = [:], batchSize: Int = 500,
    applicationName: String = "relay", retention: Duration = .seconds(3600),
    configure: (inout OutboxRelayConfiguration) -> Void = { _ in }, _ body: (OutboxRelay) async throws -> T
) async throws -> T {
    var configuration = OutboxRelayConfiguration(
        databaseURL: test.schema.url + "&application_name=\(applicationName)", kafka: KafkaConfiguration(bootstrapServers: brokers, properties: properties))
    configuration.batchSize = batchSize
    configuration.retention = retention
    configuration.pollInterval = .milliseconds(200)
    configuration.maxBackoff = .milliseconds(500)
    // Each test schema is its own "database": its relay must not wait for another test's lock.
    configuration.leaderLockKey = Int64.random(in: 1...Int64.max)
    configure(&configuration)
    let relay = OutboxRelay(configuration: configuration)
    let task = Task { try await relay.run() }
    do {
        let value = try await body(relay)
        relay.stop()
        try await task.value
        return value
    } catch {
        relay.stop()
        _ = try? await task.value
        throw error
    }
}

@Suite("outbox relay (real PostgreSQL + Kafka mock cluster)")
struct OutboxRelayTests {
    @Test("rows written without NOTIFY, between rows that notify and with the relay idle, are all published (by the next fetch or the poll)")
    func writersWithoutNotify() async throws {
        let test = try await TestEventStore.create()
        var quiet = test.store
        quiet.notifiesOnAppend = false
        let waiting = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        try await withRelay(test, brokers: try TestEnvironment.kafkaBrokers()) { _ in
            for n in 0..<20 {
                try await quiet.append([NewEvent(Tick(n: n))], to: "quiet-\(n)", category: "tick", expectedVersion: .noStream)
                if n.isMultiple(of: 2) {
                    try await test.store.append([NewEvent(Tick(n: n))], to: "loud-\(n)", category: "tick", expectedVersion: .noStream)
                }
            }
            try await waitUntil("every row published") { try await test.count(waiting) == 0 }
            // Idle now, nothing in flight: a quiet row alone is found by the poll (200 ms here).
            try await quiet.append([NewEvent(Tick(n: 99))], to: "quiet-last", category: "tick", expectedVersion: .noStream)
            try await waitUntil("the last quiet row published") { try await test.count(waiting) == 0 }
        }
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == 31)
        try await test.drop()
    }

    @Test("5,000 events over 50 streams all arrive, each key's versions strictly increasing in one partition")
    func fiveThousandEvents() async throws {
        let topic = uniqueName("relay")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        let appendStart = ContinuousClock.now
        let ids = try await test.appendTicks(streams: 50, perStream: 100, batch: 20)
        print("appended 5000 events in \(ContinuousClock.now - appendStart)")
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        let started = ContinuousClock.now
        try await withRelay(test, brokers: brokers) { relay in
            try await waitUntil("first row published") { relay.publishedCount > 0 }
            print("first row published \(ContinuousClock.now - started) after the relay started")
            try await waitUntil("all rows published", timeout: .seconds(120)) { relay.publishedCount >= 5000 }
        }
        let drained = ContinuousClock.now - started
        try await reader.read(until: "first") { !$0.isEmpty }
        print("first message \(ContinuousClock.now - started) after the relay started")
        try await reader.read(until: "5000 event ids", timeout: .seconds(180)) { _ in reader.eventIDs.count >= 5000 }
        print("read 5000 messages \(ContinuousClock.now - started) after the relay started")
        print("relay drained 5000 outbox rows in \(drained)")
        #expect(reader.eventIDs == Set(ids.map { $0.uuidString.lowercased() }))
        #expect(reader.messages.count == 5000)
        for (key, versions) in reader.versionsByKey {
            #expect(versions == Array(1...100), "stream \(key)")
        }
        for key in Set(reader.messages.compactMap(\.keyString)) {
            #expect(Set(reader.messages.filter { $0.keyString == key }.map(\.partition)).count == 1)
        }
        let sample = try #require(reader.messages.first)
        let envelope = try OutboxEnvelope.decode(try #require(sample.value))
        #expect(sample.header("event-id")?.stringValue == envelope.eventId.uuidString.lowercased())
        #expect(sample.header("event-type")?.stringValue == "Tick")
        #expect(sample.header("content-type")?.stringValue == "application/json")
        #expect(sample.keyString == envelope.streamId)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0)
        await reader.close()
        try await test.drop()
    }

    @Test("a transaction that commits after a later one is still published")
    func outOfOrderCommits() async throws {
        let topic = uniqueName("ooo")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        try await withRelay(test, brokers: brokers) { relay in
            // Transaction A takes the lower outbox id but stays open.
            let slow = try await PQConnection.connect(to: test.schema.url)
            try await slow.executeScript("BEGIN")
            let slowEvent = UUID()
            try await slow.execute(
                "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, occurred_at) "
                    + "VALUES ($1, 'slow', 1, 'Tick', 1, '{\"n\":0,\"filler\":\"\"}', now())", [.uuid(slowEvent)])
            try await slow.execute(
                "INSERT INTO outbox (event_id, stream_id, stream_version, topic, message_key, envelope, headers) "
                    + "VALUES ($1, 'slow', 1, $2, 'slow', '{}', $3)",
                [.uuid(slowEvent), .text(topic), .jsonb(#"{"event-id": "\#(slowEvent.uuidString.lowercased())", "stream-version": "1"}"#)])
            // Transaction B takes a higher id and commits first.
            let fast = try await test.appendTicks(streams: 1, perStream: 1, prefix: "fast")
            try await reader.read(until: "the fast event") { _ in reader.eventIDs.contains(fast[0].uuidString.lowercased()) }
            let slowID = try await test.count("SELECT max(id) FROM outbox WHERE stream_id = 'fast-0'")
            #expect(slowID > 0)
            try await slow.executeScript("COMMIT")
            try await slow.notify(EventTables.outboxChannel)
            try await reader.read(until: "the slow event") { _ in reader.eventIDs.contains(slowEvent.uuidString.lowercased()) }
            #expect(try await test.count("SELECT min(id) FROM outbox WHERE stream_id = 'slow'") < slowID)
            try await waitUntil("both marked published") {
                try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
            }
            _ = relay
        }
        await reader.close()
        try await test.drop()
    }

    @Test("message timeouts while every broker is down: the producer is replaced, every event arrives, order per key holds")
    func brokerDownMidRun() async throws {
        let cluster = try MockCluster(brokers: 3)
        let topic = uniqueName("down")
        try cluster.createTopic(topic, partitions: 4, replicationFactor: 3)
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        var ids = try await test.appendTicks(streams: 10, perStream: 50)
        try await withRelay(test, brokers: cluster.bootstrapServers, properties: ["message.timeout.ms": "1500"], batchSize: 50) {
            relay in
            try await waitUntil("the relay publishes") { relay.publishedCount > 0 }
            try cluster.setAllBrokersDown()
            ids += try await test.appendTicks(streams: 10, perStream: 30, prefix: "later")
            try await waitUntil("the relay sees deliveries fail") { relay.failedDeliveryCount > 0 }
            try await waitUntil("the relay replaces its producer") { relay.producerRestartCount > 0 }
            #expect(try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") > 0)
            try cluster.setAllBrokersUp()
            try await waitUntil("everything published after the brokers came back", timeout: .seconds(90)) {
                try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
            }
        }
        let reader = try KafkaTopicReader(brokers: cluster.bootstrapServers, topic: topic)
        try await reader.read(until: "every event id") { _ in reader.eventIDs.count >= ids.count }
        #expect(reader.eventIDs == Set(ids.map { $0.uuidString.lowercased() }))
        #expect(reader.keysOutOfOrder.isEmpty)
        for (key, versions) in reader.versionsByKey {
            #expect(Set(versions).count == versions.max().map(Int.init), "stream \(key) has gaps")
        }
        await reader.close()
        try await test.drop()
    }

    @Test("a row Kafka refuses goes to dead letters; its stream is held back, others go on; retry releases it")
    func deadLetters() async throws {
        let topic = uniqueName("dead")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        let big = String(repeating: "x", count: 40_000)
        var held: [UUID] = []
        for (n, filler) in ["", big, ""].enumerated() {
            let event = NewEvent(Tick(n: n, filler: filler))
            held.append(event.eventID)
            try await test.store.append([event], to: "held", category: "tick", expectedVersion: .exact(Int64(n)))
        }
        let free = try await test.appendTicks(streams: 1, perStream: 3, prefix: "free")
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        try await withRelay(test, brokers: brokers, properties: ["message.max.bytes": "20000"]) { _ in
            try await reader.read(until: "the free stream and the first held event") { _ in
                reader.eventIDs.isSuperset(of: free.map { $0.uuidString.lowercased() } + [held[0].uuidString.lowercased()])
            }
            try await waitUntil("the big row dead-lettered") {
                try await test.count("SELECT count(*) FROM outbox_dead_letters") == 1
            }
        }
        #expect(!reader.eventIDs.contains(held[1].uuidString.lowercased()))
        #expect(!reader.eventIDs.contains(held[2].uuidString.lowercased()))
        let env = ["EVENTOUTBOX_DATABASE_URL": test.schema.url]
        let listed = try await Tools.run("eventoutbox", ["dead-letters", "list"], environment: env)
        #expect(listed.stdout.contains("stream held v2"))
        #expect(listed.stdout.contains("MSG_SIZE_TOO_LARGE"))
        let status = try await Tools.run("eventoutbox", ["outbox", "status", "--json"], environment: env)
        let statusJSON = try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any]
        #expect(statusJSON?["deadLetters"] as? Int == 1)
        #expect(statusJSON?["waiting"] as? Int == 1)
        #expect(try await Tools.run("eventoutbox", ["dead-letters", "retry", "999999"], environment: env).status != 0)
        let letters = try await test.pool.withConnection { try await OutboxTable().deadLetters(on: $0) }
        #expect(letters.first?.eventID == held[1])
        #expect(letters.first?.error.contains("MSG_SIZE_TOO_LARGE") == true)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE stream_id = 'held' AND published_at IS NULL") == 1)

        // With a broker limit that fits, retrying the dead letter publishes it and then the held row, in order.
        let retried = try await test.pool.withConnection { try await OutboxTable().retryDeadLetter(letters[0].outboxID, on: $0) }
        #expect(retried)
        try await withRelay(test, brokers: brokers) { _ in
            try await reader.read(until: "the held stream") { _ in reader.eventIDs.isSuperset(of: held.map { $0.uuidString.lowercased() }) }
        }
        #expect(reader.versionsByKey["held"] == [1, 2, 3])
        #expect(try await test.count("SELECT count(*) FROM outbox_dead_letters") == 0)
        await reader.close()
        try await test.drop()
    }
}

extension OutboxRelayTests {
    @Test("an outbox row whose headers cannot be read is dead-lettered with the reason; its stream waits, others go on")
    func unreadableRow() async throws {
        let topic = uniqueName("unreadable")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let bad = try await test.appendTicks(streams: 1, perStream: 2, prefix: "bad")
        try await test.pool.withConnection { connection in
            try await connection.execute(
                #"UPDATE outbox SET headers = '{"event-id": 42}' WHERE stream_id = 'bad-0' AND stream_version = 1"#)
        }
        let good = try await test.appendTicks(streams: 2, perStream: 5, prefix: "good")
        try await withRelay(test, brokers: try TestEnvironment.kafkaBrokers()) { relay in
            try await waitUntil("the good streams published") { relay.publishedCount >= good.count }
        }
        let letters = try await test.pool.withConnection { try await OutboxTable().deadLetters(on: $0) }
        #expect(letters.map(\.eventID) == [bad[0]])
        #expect(letters.first?.error.contains("headers are not a JSON object of strings") == true)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE stream_id = 'bad-0' AND published_at IS NULL") == 1)
        let reader = try await KafkaTopicReader.readAll(good, brokers: try TestEnvironment.kafkaBrokers(), topic: topic)
        #expect(!reader.eventIDs.contains(bad[1].uuidString.lowercased()))
        try await test.drop()
    }
}

extension OutboxRelayTests {
    @Test("partitions split the waiting rows by stream: disjoint, complete, and as PostgreSQL computes them")
    func partitionsSplitStreams() async throws {
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: uniqueName("split")))
        let odd = [#"it's "quoted""#, "🏦", "", "a,b{c}"]
        for stream in odd {
            try await test.store.append([NewEvent(Tick(n: 0))], to: stream, category: "tick", expectedVersion: .noStream)
        }
        try await test.appendTicks(streams: 30, perStream: 2)
        let table = OutboxTable()
        try await test.pool.withConnection { connection in
            let all = try await table.waitingRows(after: 0, limit: 1000, on: connection)
            #expect(all.count == 64)
            var seen: [Int64] = []
            for partition in 0..<4 {
                let rows = try await table.waitingRows(
                    after: 0, limit: 1000, partitions: OutboxPartitions(count: 4, owned: [partition]), on: connection)
                for row in rows {
                    #expect(try await OutboxPartitions.partition(of: row.streamID, count: 4, on: connection) == partition)
                }
                seen += rows.map(\.id)
            }
            #expect(seen.sorted() == all.map(\.id))
            let two = try await table.waitingRows(after: 0, limit: 1000, partitions: OutboxPartitions(count: 4, owned: [1, 3]), on: connection)
            #expect(Set(two.map(\.streamID)).count < 34)
        }
        try await test.drop()
    }
}

@Suite("outbox retention")
struct OutboxRetentionTests {
    @Test("published rows are deleted after the retention period; waiting rows never are")
    func retention() async throws {
        let topic = uniqueName("retention")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        try await test.appendTicks(streams: 3, perStream: 20)
        try await withRelay(test, brokers: try TestEnvironment.kafkaBrokers(), retention: .zero) { relay in
            try await waitUntil("all published") { relay.publishedCount == 60 }
            try await waitUntil("published rows removed") { try await test.count("SELECT count(*) FROM outbox") == 0 }
        }
        #expect(try await test.count("SELECT count(*) FROM events") == 60)
        try await test.drop()
    }
}

@Suite("outbox relay and a database that drops its connections")
struct RelayDatabaseRestartTests {
    @Test("the relay's database sessions are terminated (as in a server restart): it reconnects and loses nothing")
    func reconnects() async throws {
        let topic = uniqueName("pgrestart")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        var ids = try await test.appendTicks(streams: 10, perStream: 40)
        let admin = try await PQConnection.connect(to: try TestEnvironment.databaseURL())
        let name = uniqueName("relay")
        try await withRelay(test, brokers: brokers, batchSize: 20, applicationName: name) { relay in
            try await waitUntil("the relay publishes") { relay.publishedCount > 0 }
            for round in 0..<3 {
                let before = relay.publishedCount
                try await admin.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", [.text(name)])
                ids += try await test.appendTicks(streams: 2, perStream: 10, prefix: "round\(round)")
                try await waitUntil("the relay publishes again after round \(round)") { relay.publishedCount > before }
            }
            try await waitUntil("everything published", timeout: .seconds(60)) {
                try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
            }
        }
        let reader = try await KafkaTopicReader.readAll(ids, brokers: brokers, topic: topic)
        #expect(reader.eventIDs == Set(ids.map { $0.uuidString.lowercased() }))
        #expect(reader.keysOutOfOrder.isEmpty)
        try await test.drop()
    }
}
