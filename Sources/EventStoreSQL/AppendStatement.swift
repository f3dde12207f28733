import EventSourcing
import Foundation

/// A value bound to a statement parameter, independent of the PostgreSQL driver that sends it.
///
/// Every placeholder the statements here use carries an explicit cast (`$3::jsonb`), so a driver may send
/// each value as text or in its own binary format: the server reads the same thing either way.
public enum SQLValue: Sendable, Hashable {
    case text(String)
    case int64(Int64)
    case uuid(UUID)
    /// JSON text, cast to `jsonb` in the statement.
    case jsonb(String)
    case timestamp(Date)
}

/// The result of a successful append.
public struct AppendResult: Sendable, Hashable {
    /// The stream's version after the append (its last event's version).
    public var streamVersion: Int64
    /// Global positions of the appended events, in order.
    public var positions: [Int64]

    public init(streamVersion: Int64, positions: [Int64]) {
        self.streamVersion = streamVersion
        self.positions = positions
    }
}

/// What an ``AppendStatement`` did: appended, or nothing because the stream had moved on.
public enum AppendOutcome: Sendable, Hashable {
    case appended(AppendResult)
    case versionMismatch(actual: Int64)
}

/// The statement that appends events to a stream together with their outbox rows, for any driver.
///
/// The libpq `EventStore` and the postgres-nio adapter both run this one statement, so the `events` and `outbox`
/// rows they write are the same bytes, and the relay and the projections cannot tell who wrote them.
///
/// It writes the events, one outbox row per event and the `NOTIFY` in **one statement**: one round trip, and
/// atomic on its own. The events are inserted only if the stream's version is still `base`, the outbox rows
/// only if the events were, the notification only then. A concurrent append that wins the race between the
/// check and the insert makes it fail on ``EventTables/streamVersionConstraint`` instead.
public struct AppendStatement: Sendable {
    /// The SQL text, with `$1`, `$2`, … placeholders.
    public let sql: String
    /// The values of the placeholders, in order.
    public let values: [SQLValue]
    /// The version the stream must have for the append to happen.
    public let base: Int64
    /// How many events (and outbox rows) it appends.
    public let eventCount: Int

    /// - Parameters:
    ///   - events: the new events, in order; at least one.
    ///   - streamID: the stream (also each outbox message's key).
    ///   - category: the kind of stream, which routes the messages to a topic.
    ///   - base: the version the stream must have now; the events get `base + 1`, `base + 2`, …
    ///   - routing: which topic each event's outbox message goes to.
    ///   - notify: whether the statement sends `NOTIFY` on ``EventTables/outboxChannel``.
    /// - Throws: the payload encoder's error when an event's payload cannot be encoded as JSON.
    public init(
        _ events: [NewEvent], to streamID: String, category: String, after base: Int64,
        routing: OutboxRouting, notify: Bool
    ) throws {
        precondition(!events.isEmpty, "an append needs at least one event")
        var values: [SQLValue] = [.text(streamID), .int64(base), .text(EventTables.outboxChannel), .text(String(events.count))]
        func placeholder(_ value: SQLValue, _ cast: String) -> String {
            values.append(value)
            return "$\(values.count)::\(cast)"
        }
        var eventValues: [String] = []
        var outboxValues: [String] = []
        for (index, event) in events.enumerated() {
            let row = try OutboxRow(event, category: category, routing: routing)
            let version = base + Int64(index) + 1
            eventValues.append(
                "(" + [
                    placeholder(.uuid(event.eventID), "uuid"), placeholder(.int64(version), "bigint"),
                    placeholder(.text(event.eventType), "text"), placeholder(.int64(Int64(event.schemaVersion)), "int"),
                    placeholder(.jsonb(row.payload), "jsonb"), placeholder(.jsonb(row.metadata), "jsonb"),
                    placeholder(.timestamp(event.occurredAt), "timestamptz"),
                ].joined(separator: ", ") + ")")
            outboxValues.append(
                "(" + [
                    placeholder(.uuid(event.eventID), "uuid"), placeholder(.int64(version), "bigint"),
                    placeholder(.text(row.topic), "text"),
                    placeholder(.text(row.envelope(streamID: streamID, version: version)), "text"),
                    placeholder(.jsonb(row.headers(version: version)), "jsonb"),
                ].joined(separator: ", ") + ")")
        }
        self.values = values
        self.base = base
        self.eventCount = events.count
        sql = """
            WITH current AS (
                SELECT COALESCE(max(stream_version), 0) AS version FROM events WHERE stream_id = $1
            ), appended AS (
                INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata, occurred_at)
                SELECT v.event_id, $1, v.version, v.event_type, v.schema_version, v.payload, v.metadata, v.occurred_at
                FROM (VALUES \(eventValues.joined(separator: ", "))) AS v(event_id, version, event_type, schema_version, payload, metadata, occurred_at)
                WHERE (SELECT version FROM current) = $2::bigint
                RETURNING position
            ), outboxed AS (
                INSERT INTO outbox (event_id, stream_id, stream_version, topic, message_key, envelope, headers)
                SELECT o.event_id, $1, o.version, o.topic, $1, o.envelope, o.headers
                FROM (VALUES \(outboxValues.joined(separator: ", "))) AS o(event_id, version, topic, envelope, headers)
                WHERE EXISTS (SELECT 1 FROM appended)
                RETURNING 1
            ), notified AS (
                SELECT pg_notify($3, $4) FROM current WHERE \(notify ? "" : "false AND ")EXISTS (SELECT 1 FROM appended)
            )
            SELECT (SELECT version FROM current) AS current,
                   (SELECT count(*) FROM outboxed) AS outboxed,
                   (SELECT count(*) FROM notified) AS notified,
                   appended.position
            FROM current LEFT JOIN appended ON true
            """
    }

    /// What the statement did, from the `current` column of its first row and the `position` column of every row
    /// (the statement always returns at least one row: `current` is left-joined with what it appended).
    public func outcome(current: Int64, positions: [Int64]) -> AppendOutcome {
        guard positions.count == eventCount else { return .versionMismatch(actual: current) }
        return .appended(AppendResult(streamVersion: base + Int64(eventCount), positions: positions.sorted()))
    }
}

/// An event encoded for its `events` row and its `outbox` row.
private struct OutboxRow {
    var event: NewEvent
    var payload: String
    var metadata: String
    var topic: String

    init(_ event: NewEvent, category: String, routing: OutboxRouting) throws {
        self.event = event
        payload = try event.encodedPayload()
        metadata = event.metadata.jsonText
        topic = routing.topic(eventType: event.eventType, category: category)
    }

    func envelope(streamID: String, version: Int64) -> String {
        OutboxEnvelope.jsonText(
            eventID: event.eventID, streamID: streamID, streamVersion: version, eventType: event.eventType,
            schemaVersion: event.schemaVersion, occurredAt: event.occurredAt, payloadJSON: payload, metadataJSON: metadata)
    }

    /// Kafka headers of the message, as a JSON object (keys sorted).
    func headers(version: Int64) -> String {
        var members: [(key: String, json: String)] = [
            ("content-type", "\"application/json\""),
            ("event-id", "\"" + event.eventID.uuidString.lowercased() + "\""),
            ("event-type", JSONText.string(event.eventType)),
            ("stream-version", "\"\(version)\""),
        ]
        if let traceparent = event.metadata.traceparent { members.append(("traceparent", JSONText.string(traceparent))) }
        return JSONText.object(members)
    }
}
