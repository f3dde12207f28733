import EventSourcing
import Foundation

/// Names and statements of the event store's tables that every driver shares.
public enum EventTables {
    /// The channel on which every notifying append sends `NOTIFY` (payload: the number of outbox rows).
    public static let outboxChannel = "eventoutbox_outbox"
    /// The unique constraint on `(stream_id, stream_version)` that a lost append race violates.
    public static let streamVersionConstraint = "events_stream_version_unique"
    /// The version of a stream's last event (0 if it has none); `$1` is the stream id.
    public static let currentVersionSQL = "SELECT COALESCE(max(stream_version), 0) AS version FROM events WHERE stream_id = $1"
    /// The columns of `events` that ``EventRow`` reads, in that order (`payload` and `metadata` as text).
    public static let eventColumns = eventColumns(of: nil)

    /// ``eventColumns`` qualified by a table alias (`e.position, e.event_id, …`), for statements that join `events`.
    public static func eventColumns(of alias: String?) -> String {
        let prefix = alias.map { $0 + "." } ?? ""
        return ["position", "event_id", "stream_id", "stream_version", "event_type", "schema_version", "payload::text",
                "metadata::text", "occurred_at"].map { prefix + $0 }.joined(separator: ", ")
    }
    /// A stream's events in version order, from `$2` through `$3` (inclusive); `$1` is the stream id.
    public static let readStreamSQL =
        "SELECT \(eventColumns) FROM events WHERE stream_id = $1 AND stream_version >= $2 AND stream_version <= $3 "
        + "ORDER BY stream_version"
}

/// A row of `events` as a driver decoded it, before its metadata is parsed.
public struct EventRow: Sendable {
    public var position: Int64
    public var eventID: UUID
    public var streamID: String
    public var streamVersion: Int64
    public var eventType: String
    public var schemaVersion: Int
    public var payload: String
    public var metadata: String
    public var occurredAt: Date

    public init(
        position: Int64, eventID: UUID, streamID: String, streamVersion: Int64, eventType: String, schemaVersion: Int,
        payload: String, metadata: String, occurredAt: Date
    ) {
        self.position = position
        self.eventID = eventID
        self.streamID = streamID
        self.streamVersion = streamVersion
        self.eventType = eventType
        self.schemaVersion = schemaVersion
        self.payload = payload
        self.metadata = metadata
        self.occurredAt = occurredAt
    }

    /// The event, with its metadata parsed.
    /// - Throws: `EventDecodingError` naming the event when its metadata is not an `EventMetadata` object
    ///   (it is never replaced by empty metadata: the correlation and trace ids would be lost unnoticed).
    public func recorded() throws -> RecordedEvent {
        let parsed: EventMetadata
        do {
            parsed = try EventMetadata(jsonText: metadata)
        } catch {
            throw EventDecodingError(
                eventID: eventID, eventType: eventType, schemaVersion: schemaVersion, streamID: streamID,
                reason: "its metadata is not an object of optional strings (correlationID, causationID, actor, traceparent): \(error)")
        }
        return RecordedEvent(
            position: position, eventID: eventID, streamID: streamID, streamVersion: streamVersion, eventType: eventType,
            schemaVersion: schemaVersion, payload: payload, metadata: parsed, occurredAt: occurredAt)
    }
}
