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
    /// The columns of `events` that `RecordedEvent.init(position:eventID:streamID:streamVersion:eventType:schemaVersion:payload:metadataJSON:occurredAt:)` reads, in that order (`payload` and `metadata` as text).
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
    /// An aggregate's newest snapshot and the events after it, in one statement: `$1` the stream, `$2` the state
    /// schema version, `$3` the last version wanted. The snapshot, if any, is the first row (`is_snapshot`), in the
    /// event columns: its version as `stream_version`, its state as `payload`; the events after it follow in order.
    public static let snapshotAndTailSQL = """
        WITH snapshot AS MATERIALIZED (
            SELECT version, state FROM snapshots WHERE stream_id = $1 AND state_schema_version = $2 AND version <= $3
            ORDER BY version DESC LIMIT 1)
        SELECT true AS is_snapshot, NULL::bigint AS position, NULL::uuid AS event_id, NULL::text AS stream_id,
               version AS stream_version, NULL::text AS event_type, NULL::int AS schema_version, state::text AS payload,
               NULL::text AS metadata, NULL::timestamptz AS occurred_at
        FROM snapshot
        UNION ALL
        SELECT false, \(eventColumns) FROM events
        WHERE stream_id = $1 AND stream_version > COALESCE((SELECT version FROM snapshot), 0) AND stream_version <= $3
        ORDER BY is_snapshot DESC, stream_version
        """
}

extension RecordedEvent {
    /// An event from a row of `events` (the columns of ``EventTables/eventColumns``), its metadata still JSON text.
    /// - Throws: `EventDecodingError` naming the event when its metadata is not an `EventMetadata` object
    ///   (it is never replaced by empty metadata: the correlation and trace ids would be lost unnoticed).
    public init(
        position: Int64, eventID: UUID, streamID: String, streamVersion: Int64, eventType: String, schemaVersion: Int,
        payload: String, metadataJSON: String, occurredAt: Date
    ) throws {
        let metadata: EventMetadata
        do {
            metadata = try EventMetadata(jsonText: metadataJSON)
        } catch {
            throw EventDecodingError(
                eventID: eventID, eventType: eventType, schemaVersion: schemaVersion, streamID: streamID,
                reason: "its metadata is not an object of optional strings (correlationID, causationID, actor, traceparent): \(error)")
        }
        self.init(
            position: position, eventID: eventID, streamID: streamID, streamVersion: streamVersion, eventType: eventType,
            schemaVersion: schemaVersion, payload: payload, metadata: metadata, occurredAt: occurredAt)
    }
}

extension ExpectedVersion {
    /// How often an append with `.any` tries again by itself while other writers move the stream on.
    public static let anyVersionAttempts = 20

    /// The version an append builds on. The envelope names each event's version, so the versions are fixed
    /// before the statement runs; `.any` reads the current version first and appends as if it had expected that.
    public func base(current: () async throws -> Int64) async throws -> Int64 {
        switch self {
        case .noStream: 0
        case .exact(let version): version
        case .any: try await current()
        }
    }

    /// Whether an append that found another version on its `attempt`-th try goes again by itself (only `.any`).
    public func retriesMismatch(attempt: Int) -> Bool { self == .any && attempt < Self.anyVersionAttempts }
}
