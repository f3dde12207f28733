import BankAccount
import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import OutboxRelayStore
import LibPQ
import TestSupport
import Testing

struct Note: DomainEvent, Hashable {
    static let eventType = "Note"
    var text: String
}

@Suite("event store (real PostgreSQL)")
struct EventStoreTests {
    @Test("append writes events and exactly one outbox row each; reads return them in order")
    func appendAndRead() async throws {
        let test = try await TestEventStore.create()
        let stream = #"it's a "stream" \ with 🏦 "# + String(repeating: "x", count: 480)
        let result = try await test.store.append(
            [NewEvent(Note(text: "one")), NewEvent(Note(text: "two 'q' \"dq\" 🙂"))], to: stream, category: "notes",
            expectedVersion: .noStream)
        #expect(result.streamVersion == 2)
        let events = try await test.store.readStream(stream)
        #expect(events.map(\.streamVersion) == [1, 2])
        #expect(events.map(\.streamID) == [stream, stream])
        #expect(events[1].payload.contains("🙂"))
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE stream_id = $1", [.text(stream)]) == 2)
        #expect(try await test.count("SELECT count(*) FROM outbox o JOIN events e USING (event_id)") == 2)
        try await test.drop()
    }

    @Test("a version mismatch throws a conflict naming stream, expected and actual, and writes nothing")
    func conflictWritesNothing() async throws {
        let test = try await TestEventStore.create()
        try await test.store.append([NewEvent(Note(text: "a"))], to: "s", category: "n", expectedVersion: .noStream)
        let conflict = await #expect(throws: ConcurrencyConflict.self) {
            try await test.store.append(
                [NewEvent(Note(text: "b")), NewEvent(Note(text: "c"))], to: "s", category: "n", expectedVersion: .exact(5))
        }
        #expect(conflict?.streamID == "s")
        #expect(conflict?.expected == .exact(5))
        #expect(conflict?.actual == 1)
        await #expect(throws: ConcurrencyConflict.self) {
            try await test.store.append([NewEvent(Note(text: "d"))], to: "s", category: "n", expectedVersion: .noStream)
        }
        #expect(try await test.count("SELECT count(*) FROM events") == 1)
        #expect(try await test.count("SELECT count(*) FROM outbox") == 1)
        try await test.store.append([NewEvent(Note(text: "e"))], to: "s", category: "n", expectedVersion: .any)
        #expect(try await test.store.currentVersion(of: "s") == 2)
        try await test.drop()
    }

    @Test("an append that fails in the middle leaves no event and no outbox row")
    func failedAppendRollsBack() async throws {
        let test = try await TestEventStore.create()
        let reused = UUID()
        try await test.store.append([NewEvent(Note(text: "first"), eventID: reused)], to: "a", category: "n", expectedVersion: .noStream)
        // The second event reuses an event id: the events insert fails after the version check passed.
        await #expect(throws: PQError.self) {
            try await test.store.append(
                [NewEvent(Note(text: "fresh")), NewEvent(Note(text: "dup"), eventID: reused)], to: "b", category: "n",
                expectedVersion: .noStream)
        }
        // A payload PostgreSQL cannot store (NUL in text) fails as well.
        await #expect(throws: PQError.self) {
            try await test.store.append([NewEvent(Note(text: "nul \u{0} byte"))], to: "c", category: "n", expectedVersion: .any)
        }
        #expect(try await test.count("SELECT count(*) FROM events WHERE stream_id <> 'a'") == 0)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE stream_id <> 'a'") == 0)
        #expect(
            try await test.count("SELECT count(*) FROM events e WHERE (SELECT count(*) FROM outbox o WHERE o.event_id = e.event_id) <> 1")
                == 0)
        try await test.drop()
    }

    @Test("metadata that is not EventMetadata fails the read with an error naming the event, never empty metadata")
    func unreadableMetadata() async throws {
        let test = try await TestEventStore.create()
        let id = UUID()
        try await test.pool.withConnection { connection in
            try await connection.execute(
                "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata, occurred_at) "
                    + "VALUES ($1, 'odd', 1, 'Note', 1, '{\"text\": \"x\"}', '{\"actor\": 5}', now())", [.uuid(id)])
        }
        await #expect { try await test.store.readStream("odd") } throws: { error in
            guard let error = error as? EventDecodingError else { return false }
            return error.eventID == id && error.streamID == "odd" && error.reason.contains("metadata")
        }
        try await test.drop()
    }

    @Test("events cannot be updated or deleted")
    func appendOnly() async throws {
        let test = try await TestEventStore.create()
        try await test.store.append([NewEvent(Note(text: "fact"))], to: "s", category: "n", expectedVersion: .noStream)
        let error = await #expect(throws: PQError.self) {
            try await test.pool.withConnection { try await $0.execute("UPDATE events SET payload = '{}'") }
        }
        #expect(error?.message.contains("append-only") == true)
        await #expect(throws: PQError.self) {
            try await test.pool.withConnection { try await $0.execute("DELETE FROM events") }
        }
        #expect(try await test.count("SELECT count(*) FROM events") == 1)
        try await test.drop()
    }

    @Test("migrate is safe to run twice, and concurrently")
    func migrateTwice() async throws {
        let test = try await TestEventStore.create()
        let migrator = SchemaMigrator(EventOutboxSchema.modules)
        #expect(try await migrator.migrate(test.pool).isEmpty)
        async let first = migrator.migrate(test.pool)
        async let second = migrator.migrate(test.pool)
        let (a, b) = try await (first, second)
        #expect(a.isEmpty && b.isEmpty)
        try await test.drop()
    }

    @Test("read-all walks every event in global order in batches")
    func readAll() async throws {
        let test = try await TestEventStore.create()
        for stream in 0..<5 {
            for n in 0..<7 {
                try await test.store.append([NewEvent(Note(text: "\(stream)-\(n)"))], to: "s\(stream)", category: "n", expectedVersion: .any)
            }
        }
        var positions: [Int64] = []
        for try await event in test.store.readAll(batchSize: 4) { positions.append(event.position) }
        #expect(positions.count == 35)
        #expect(positions == positions.sorted())
        #expect(try await test.store.headPosition() == positions.last)
        var tail: [Int64] = []
        for try await event in test.store.readAll(after: positions[29], batchSize: 2) { tail.append(event.position) }
        #expect(tail == Array(positions[30...]))
        try await test.drop()
    }

    @Test("an append notifies the outbox channel when it commits")
    func appendNotifies() async throws {
        let test = try await TestEventStore.create()
        let listener = try await PQConnection.connect(to: test.schema.url)
        try await listener.listen(EventTables.outboxChannel)
        try await test.store.append([NewEvent(Note(text: "wake"))], to: "s", category: "n", expectedVersion: .any)
        var received: [PQNotification] = []
        try await waitUntil("an outbox notification") {
            received += try await listener.notifications(timeout: .milliseconds(200))
            return !received.isEmpty
        }
        #expect(received.first?.channel == EventTables.outboxChannel)
        try await test.drop()
    }

    @Test("with notifiesOnAppend off, an append sends no NOTIFY but still writes its outbox row")
    func quietAppend() async throws {
        // One connection, so both appends come from one backend: the channel is database-wide and other
        // tests' appends notify it too, so only that backend's notifications count.
        let test = try await TestEventStore.create(maxConnections: 1)
        let backend = try await test.count("SELECT pg_backend_pid()")
        let listener = try await PQConnection.connect(to: test.schema.url)
        try await listener.listen(EventTables.outboxChannel)
        var quiet = test.store
        quiet.notifiesOnAppend = false
        try await quiet.append([NewEvent(Note(text: "quiet"))], to: "q", category: "n", expectedVersion: .noStream)
        // A notifying append afterwards. Notifications arrive in commit order, so had the quiet append sent
        // one, it would be here by the time the loud one is.
        try await test.store.append([NewEvent(Note(text: "loud"))], to: "l", category: "n", expectedVersion: .noStream)
        var received: [PQNotification] = []
        func ours(_ batch: [PQNotification]) -> [PQNotification] { batch.filter { $0.senderProcessID == backend } }
        try await waitUntil("the loud append's notification") {
            received += ours(try await listener.notifications(timeout: .milliseconds(200)))
            return !received.isEmpty
        }
        received += ours(try await listener.notifications(timeout: .milliseconds(200)))
        #expect(received.count == 1, "\(received)")
        #expect(try await test.count("SELECT count(*) FROM outbox") == 2)
        try await test.drop()
    }

    @Test("outbox rows carry the topic, key, envelope and headers")
    func outboxRow() async throws {
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: "d", topicByCategory: ["n": "notes"]))
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        let event = NewEvent(Note(text: "hello"), metadata: .init(correlationID: "corr", traceparent: traceparent))
        try await test.store.append([event], to: "stream-1", category: "n", expectedVersion: .noStream)
        let row = try await test.pool.withConnection {
            try await $0.query("SELECT topic, message_key, envelope, headers::text AS headers FROM outbox").first!
        }
        #expect(try row.decode(String.self, "topic") == "notes")
        #expect(try row.decode(String.self, "message_key") == "stream-1")
        let envelope = try OutboxEnvelope.decode(Array(try row.decode(String.self, "envelope").utf8))
        #expect(envelope.eventId == event.eventID)
        #expect(envelope.streamVersion == 1)
        #expect(envelope.payload["text"] == .string("hello"))
        #expect(envelope.metadata.traceparent == traceparent)
        let headers = try JSONDecoder().decode([String: String].self, from: Data(try row.decode(String.self, "headers").utf8))
        #expect(headers["event-id"] == event.eventID.uuidString.lowercased())
        #expect(headers["event-type"] == "Note")
        #expect(headers["stream-version"] == "1")
        #expect(headers["content-type"] == "application/json")
        #expect(headers["traceparent"] == traceparent)
        try await test.drop()
    }
}
