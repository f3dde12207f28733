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

/// Where a relay under test reads new rows: every test of ``RelaySourceTests`` runs against both.
enum SourceKind: String, Sendable, CaseIterable, CustomTestStringConvertible {
    case table, wal
    var testDescription: String { "--source \(rawValue)" }

    /// Where a test of this source keeps its event store. WAL tests get a database of their own: logical
    /// decoding reads every change of its database, and the other tests' DDL there (tables created,
    /// rewritten and dropped concurrently) once made PostgreSQL's decoder fail with "could not map filenode
    /// ... to relation OID", at the same position on every retry.
    func databaseURL() async throws -> String? {
        self == .wal ? try await TestEnvironment.walDatabaseURL() : nil
    }
}

/// The per-test setup of a source: for `wal`, a publication and slot of the test's own (named after its
/// schema), created before the test's first event and dropped at the end.
struct RelaySource: Sendable {
    let kind: SourceKind
    let wal: OutboxWAL?

    static func prepare(_ kind: SourceKind, _ test: TestEventStore) async throws -> RelaySource {
        guard kind == .wal else { return RelaySource(kind: kind, wal: nil) }
        let wal = try OutboxWAL(publication: "p_" + test.schema.name, slot: "s_" + test.schema.name)
        let connection = try await PQConnection.connect(to: test.schema.url)
        try await wal.setUp(on: connection)
        return RelaySource(kind: kind, wal: wal)
    }

    func configure(_ configuration: inout OutboxRelayConfiguration) {
        if let wal { configuration.source = .wal(wal) }
    }

    var arguments: [String] {
        guard let wal else { return [] }
        return ["--source", "wal", "--slot", wal.slot, "--publication", wal.publication]
    }

    /// Drops the slot (waiting until no relay streams it) and the publication, then the schema.
    func drop(_ test: TestEventStore) async throws {
        if let wal {
            try await dropWhenFree(wal, test)
        }
        try await test.drop()
    }
}

/// Drops a WAL setup's slot, once the relay that streamed it is gone (PostgreSQL refuses while its walsender
/// lingers: 55006), and its publication.
func dropWhenFree(_ wal: OutboxWAL, _ test: TestEventStore) async throws {
    let connection = try await PQConnection.connect(to: test.schema.url)
    try await waitUntil("the slot is free to drop") {
        do {
            _ = try await wal.dropSlot(on: connection)
            return true
        } catch let error as PQError where error.sqlState == "55006" {
            return false
        }
    }
    try await wal.dropPublication(on: connection)
    await connection.close()
}

/// Inserts an event and its outbox row by hand inside an open transaction (to commit later, or roll back).
func insertByHand(_ connection: PQConnection, stream: String, version: Int64, topic: String) async throws -> UUID {
    let event = UUID()
    try await connection.execute(
        "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, occurred_at) "
            + "VALUES ($1, $2, $3, 'Tick', 1, '{\"n\":0,\"filler\":\"\"}', now())", [.uuid(event), .text(stream), .int64(version)])
    try await connection.execute(
        "INSERT INTO outbox (event_id, stream_id, stream_version, topic, message_key, envelope, headers) "
            + "VALUES ($1, $2, $3, $4, $2, '{}', $5)",
        [.uuid(event), .text(stream), .int64(version), .text(topic),
         .jsonb(#"{"event-id": "\#(event.uuidString.lowercased())", "stream-version": "\#(version)"}"#)])
    return event
}

func expectComplete(_ reader: KafkaTopicReader, _ ids: [UUID], sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(reader.eventIDs == Set(ids.map { $0.uuidString.lowercased() }), sourceLocation: sourceLocation)
    #expect(reader.keysOutOfOrder.isEmpty, "keys out of order: \(reader.keysOutOfOrder.prefix(5))", sourceLocation: sourceLocation)
    for (key, versions) in reader.versionsByKey {
        #expect(Set(versions) == Set(1...(versions.max() ?? 0)), "stream \(key) has gaps", sourceLocation: sourceLocation)
    }
}

@Suite("relay sources: the same ordering and loss tests for --source table and --source wal")
struct RelaySourceTests {
    @Test("5,000 events over 50 streams, half before the relay starts, half while it runs", arguments: SourceKind.allCases)
    func fiveThousand(_ kind: SourceKind) async throws {
        let topic = uniqueName("src5k")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await kind.databaseURL())
        let source = try await RelaySource.prepare(kind, test)
        let brokers = try TestEnvironment.kafkaBrokers()
        var ids = try await test.appendTicks(streams: 25, perStream: 100, batch: 20, prefix: "before")
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        try await withRelay(test, brokers: brokers, configure: source.configure) { relay in
            ids += try await test.appendTicks(streams: 25, perStream: 100, batch: 5, prefix: "during")
            try await reader.read(until: "5,000 events", timeout: .seconds(120)) { _ in reader.eventIDs.count >= 5000 }
            try await waitUntil("the relay counts them") { relay.publishedCount >= 5000 }
        }
        expectComplete(reader, ids)
        #expect(reader.versionsByKey.count == 50)
        await reader.close()
        try await source.drop(test)
    }

    @Test("transactions that commit out of id order, interleaved with appends: all published", arguments: SourceKind.allCases)
    func interleavedCommits(_ kind: SourceKind) async throws {
        let topic = uniqueName("srcooo")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await kind.databaseURL())
        let source = try await RelaySource.prepare(kind, test)
        let brokers = try TestEnvironment.kafkaBrokers()
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        var ids: [UUID] = []
        try await withRelay(test, brokers: brokers, configure: source.configure) { _ in
            // Three transactions take ascending outbox ids and commit in the opposite order, appends between.
            var open: [PQConnection] = []
            for n in 0..<3 {
                let connection = try await PQConnection.connect(to: test.schema.url)
                try await connection.executeScript("BEGIN")
                ids.append(try await insertByHand(connection, stream: "open-\(n)", version: 1, topic: topic))
                ids.append(try await insertByHand(connection, stream: "open-\(n)", version: 2, topic: topic))
                open.append(connection)
            }
            ids += try await test.appendTicks(streams: 3, perStream: 10, prefix: "between")
            for connection in open.reversed() {
                try await connection.executeScript("COMMIT")
                try await connection.notify(EventTables.outboxChannel)
                ids += try await test.appendTicks(streams: 1, perStream: 2, prefix: uniqueName("after"))
            }
            try await reader.read(until: "every event") { _ in reader.eventIDs.count >= ids.count }
        }
        expectComplete(reader, ids)
        await reader.close()
        try await source.drop(test)
    }

    @Test("one transaction with 10,000 events", arguments: SourceKind.allCases)
    func tenThousandInOneTransaction(_ kind: SourceKind) async throws {
        let cluster = try MockCluster(brokers: 1)
        let topic = uniqueName("srcbig")
        try cluster.createTopic(topic, partitions: 8)
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await kind.databaseURL())
        let source = try await RelaySource.prepare(kind, test)
        #expect(try await test.bulkFill(streams: 10, perStream: 1000, topic: topic) == 10_000)
        let ids = try await test.pool.withConnection { connection in
            try await connection.query("SELECT event_id FROM outbox").map { try $0.decode(UUID.self, at: 0) }
        }
        let reader = try KafkaTopicReader(brokers: cluster.bootstrapServers, topic: topic)
        try await withRelay(test, brokers: cluster.bootstrapServers, configure: source.configure) { _ in
            try await reader.read(until: "10,000 events", timeout: .seconds(120)) { _ in reader.eventIDs.count >= 10_000 }
        }
        expectComplete(reader, ids)
        #expect(reader.versionsByKey.values.allSatisfy { $0.max() == 1000 })
        await reader.close()
        try await source.drop(test)
    }

    @Test("a 1 MB event (TOASTed in the outbox) arrives whole when the producer allows its size", arguments: SourceKind.allCases)
    func oneMegabyteEvent(_ kind: SourceKind) async throws {
        let topic = uniqueName("srcbig1mb")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await kind.databaseURL())
        let source = try await RelaySource.prepare(kind, test)
        let brokers = try TestEnvironment.kafkaBrokers()
        // Random text, so that compression cannot make it small: the row really is stored out of line.
        let filler = (0..<1_000_000).map { _ in "abcdefghijklmnopqrstuvwxyz0123456789".randomElement()! }
        let event = NewEvent(Tick(n: 1, filler: String(filler)))
        try await test.store.append([event], to: "big", category: "tick", expectedVersion: .noStream)
        let after = try await test.appendTicks(streams: 1, perStream: 2, prefix: "after")
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        try await withRelay(test, brokers: brokers, properties: ["message.max.bytes": "3000000"], configure: source.configure) { _ in
            try await reader.read(until: "the big event and the ones after it") { _ in reader.eventIDs.count >= 3 }
        }
        expectComplete(reader, [event.eventID] + after)
        let big = try #require(reader.messages.first { $0.keyString == "big" })
        let envelope = try OutboxEnvelope.decode(try #require(big.value))
        #expect(envelope.payload["filler"] == .string(String(filler)))
        await reader.close()
        try await source.drop(test)
    }

    @Test("a rolled-back transaction publishes nothing", arguments: SourceKind.allCases)
    func rolledBack(_ kind: SourceKind) async throws {
        let topic = uniqueName("srcrb")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await kind.databaseURL())
        let source = try await RelaySource.prepare(kind, test)
        let brokers = try TestEnvironment.kafkaBrokers()
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        try await withRelay(test, brokers: brokers, configure: source.configure) { _ in
            let connection = try await PQConnection.connect(to: test.schema.url)
            try await connection.executeScript("BEGIN")
            let rolledBack = try await insertByHand(connection, stream: "rolled-back", version: 1, topic: topic)
            let before = try await test.appendTicks(streams: 1, perStream: 3, prefix: "before")
            try await connection.executeScript("ROLLBACK")
            let after = try await test.appendTicks(streams: 1, perStream: 3, prefix: "after")
            try await reader.read(until: "the events around it") { _ in reader.eventIDs.count >= 6 }
            // The relay is past the rollback: the committed events on both sides of it are in.
            expectComplete(reader, before + after)
            #expect(!reader.eventIDs.contains(rolledBack.uuidString.lowercased()))
        }
        await reader.close()
        try await source.drop(test)
    }

    @Test("every broker unresponsive mid-stream (messages time out): producer replaced, every event arrives in order", arguments: SourceKind.allCases)
    func brokersUnresponsive(_ kind: SourceKind) async throws {
        let cluster = try MockCluster(brokers: 3)
        let topic = uniqueName("srcslow")
        try cluster.createTopic(topic, partitions: 4, replicationFactor: 3)
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await kind.databaseURL())
        let source = try await RelaySource.prepare(kind, test)
        var ids = try await test.appendTicks(streams: 10, perStream: 50)
        // Responses delayed past the message timeout: brokers that keep their connections but never answer in
        // time, a fault of its own beside brokers set down (tested in RelayFaultTests). The relay sees
        // deliveries that time out.
        func delay(_ milliseconds: Int32) throws {
            for broker in 1...3 { try cluster.setRoundTrip(broker: Int32(broker), milliseconds: milliseconds) }
        }
        // One request in flight per broker, as in RelayFaultTests: the mock checks no sequence numbers for an
        // idempotent producer, so with several in flight a batch after a timed-out (purged) one can be stored
        // first, which a real broker refuses (fresh-clone run 114: --source wal, three streams out of order, the
        // relay's log showing "Purged in flight ... base seq 10").
        try await withRelay(
            test, brokers: cluster.bootstrapServers,
            properties: ["message.timeout.ms": "1500", "max.in.flight.requests.per.connection": "1"], batchSize: 50,
            configure: source.configure
        ) { relay in
            try await waitUntil("the relay publishes") { relay.publishedCount > 0 }
            try delay(2500)
            ids += try await test.appendTicks(streams: 10, perStream: 30, prefix: "later")
            try await waitUntil("the relay replaces its producer") { relay.producerRestartCount > 0 }
            try delay(0)
            let reader = try KafkaTopicReader(brokers: cluster.bootstrapServers, topic: topic)
            try await reader.read(until: "every event once the brokers answer again", timeout: .seconds(90)) { _ in
                reader.eventIDs.count >= ids.count
            }
            expectComplete(reader, ids)
            await reader.close()
        }
        try await source.drop(test)
    }

    @Test("two relay processes: the active one is SIGKILLed under load, the standby takes over, nothing lost", arguments: SourceKind.allCases)
    func failoverAfterSigkill(_ kind: SourceKind) async throws {
        let topic = uniqueName("srcfail")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: try await kind.databaseURL())
        let source = try await RelaySource.prepare(kind, test)
        let brokers = try TestEnvironment.kafkaBrokers()
        let lockKey = Int64.random(in: 1...2_000_000_000)
        var ids = try await test.appendTicks(streams: 20, perStream: 100, batch: 25)
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        let first = try RelayProcess.start(test, name: "relay-a", lockKey: lockKey, brokers: brokers, extra: source.arguments)
        try await reader.read(until: "the first relay publishes") { _ in reader.eventIDs.count >= 200 }
        let second = try RelayProcess.start(test, name: "relay-b", lockKey: lockKey, brokers: brokers, extra: source.arguments)
        try await waitUntil("the second relay stands by") { second.output.contains("standing by") }
        first.signal(SIGKILL)
        #expect(try await first.waitForExit() != 0)
        ids += try await test.appendTicks(streams: 20, perStream: 20, prefix: "after-kill")
        try await reader.read(until: "every event through the standby", timeout: .seconds(120)) { _ in reader.eventIDs.count >= ids.count }
        #expect(second.process.isRunning)
        second.signal(SIGTERM)
        #expect(try await second.waitForExit() == 0)
        expectComplete(reader, ids)
        await reader.close()
        try await source.drop(test)
    }

    @Test("PostgreSQL crashes (stop -m immediate) twice under load: the relay rides it out, every committed event arrives", arguments: SourceKind.allCases)
    func postgresCrash(_ kind: SourceKind) async throws {
        let server = try await ThrowawayPostgres.start()
        let topic = uniqueName("srccrash")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic), databaseURL: server.url)
        let source = try await RelaySource.prepare(kind, test)
        let brokers = try TestEnvironment.kafkaBrokers()
        let relay = try RelayProcess.start(
            test, name: "relay-crash", lockKey: Int64.random(in: 1...2_000_000_000), brokers: brokers, extra: source.arguments)
        // Appends keep going through the crashes. An append whose answer is lost may have committed or not: the
        // events table says which, at the end.
        let succeeded = Locked(0)
        let lastError = Locked<String?>(nil)
        let appending = Task {
            var version = [Int64](repeating: 0, count: 10)
            while !Task.isCancelled {
                let stream = Int.random(in: 0..<10)
                do {
                    try await test.store.append(
                        [NewEvent(Tick(n: Int(version[stream])))], to: "crash-\(stream)", category: "tick",
                        expectedVersion: .exact(version[stream]))
                    version[stream] += 1
                    succeeded.withLock { $0 += 1 }
                } catch let error as ConcurrencyConflict {
                    version[stream] = error.actual
                } catch {
                    lastError.withLock { $0 = "\(error)" }
                    try? await Task.sleep(for: .milliseconds(50))
                }
            }
        }
        /// 200 more appends; each commit waits for its fsync, which a machine busy writing elsewhere can slow a lot.
        func twoHundredMore(_ what: String) async throws {
            let before = succeeded.value
            do {
                try await waitUntil(what, timeout: .seconds(120)) { succeeded.value >= before + 200 }
            } catch {
                Issue.record("\(succeeded.value - before) appends committed; the last failure: \(lastError.value ?? "none")")
                throw error
            }
        }
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        for round in 1...2 {
            try await twoHundredMore("appends commit before crash \(round)")
            try await server.crash()
            try await Task.sleep(for: .milliseconds(300))
            try await server.restart()
            #expect(relay.process.isRunning, "the relay exited on crash \(round)")
        }
        try await twoHundredMore("appends commit after the crashes")
        appending.cancel()
        _ = await appending.value
        let ids = try await test.pool.withConnection { connection in
            try await connection.query("SELECT event_id FROM events").map { try $0.decode(UUID.self, at: 0) }
        }
        try await reader.read(until: "every committed event", timeout: .seconds(120)) { _ in
            reader.eventIDs.isSuperset(of: ids.map { $0.uuidString.lowercased() })
        }
        #expect(relay.process.isRunning)
        relay.signal(SIGTERM)
        #expect(try await relay.waitForExit() == 0)
        expectComplete(reader, ids)
        await reader.close()
        try await source.drop(test)
        await server.remove()
    }
}
