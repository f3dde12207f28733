import Foundation

/// A stored event as a CloudEvent in the Kafka protocol binding's binary mode (CloudEvents 1.0): the payload is
/// the record's value, the attributes are `ce_` headers. One mapping, used by the relay to write and by the
/// consumers to read:
///
/// | CloudEvents | from the event |
/// |---|---|
/// | `ce_specversion` | `1.0` |
/// | `ce_id` | event id |
/// | `ce_source` | the relay's `--cloudevents-source` |
/// | `ce_type` | event type |
/// | `ce_subject` | stream id (also the record's key) |
/// | `ce_time` | occurred-at, RFC 3339, UTC, microseconds |
/// | `ce_streamversion`, `ce_schemaversion` | stream version, payload schema version (extensions) |
/// | `ce_correlationid`, `ce_causationid`, `ce_actor` | metadata (extensions, when set) |
/// | `ce_traceparent` | W3C trace context (the distributed-tracing extension), when set |
/// | `content-type` | `application/json` (the payload) |
public enum CloudEventsBinding {
    public static let specVersion = "1.0"
    /// The header that marks a record as a binary-mode CloudEvent.
    public static let specVersionHeader = "ce_specversion"

    /// The record's headers for `event` (its value is `event.payload`).
    public static func headers(for event: RecordedEvent, source: String) -> [(name: String, value: String)] {
        var headers: [(name: String, value: String)] = [
            ("ce_specversion", specVersion), ("ce_id", event.eventID.uuidString.lowercased()), ("ce_source", source),
            ("ce_type", event.eventType), ("ce_subject", event.streamID), ("ce_time", ISOTimestamp.format(event.occurredAt)),
            ("ce_streamversion", String(event.streamVersion)), ("ce_schemaversion", String(event.schemaVersion)),
            ("content-type", "application/json"),
        ]
        if let value = event.metadata.correlationID { headers.append(("ce_correlationid", value)) }
        if let value = event.metadata.causationID { headers.append(("ce_causationid", value)) }
        if let value = event.metadata.actor { headers.append(("ce_actor", value)) }
        if let value = event.metadata.traceparent { headers.append(("ce_traceparent", value)) }
        return headers
    }

    /// The stored event a binary-mode CloudEvent record describes (position unknown: -1).
    /// - Throws: ``CloudEventError`` naming the attribute that is missing or malformed.
    public static func recordedEvent(headers: [String: String], value: [UInt8]) throws -> RecordedEvent {
        func required(_ name: String) throws -> String {
            guard let value = headers[name], !value.isEmpty else { throw CloudEventError("the CloudEvent has no \(name)") }
            return value
        }
        guard try required("ce_specversion") == specVersion else {
            throw CloudEventError("CloudEvents spec version \(headers["ce_specversion"] ?? "") is not 1.0")
        }
        let idText = try required("ce_id")
        guard let id = UUID(uuidString: idText) else { throw CloudEventError("ce_id '\(idText)' is not an EventOutbox event id (a UUID)") }
        let timeText = try required("ce_time")
        guard let time = ISOTimestamp.parse(timeText) else { throw CloudEventError("ce_time '\(timeText)' is not RFC 3339") }
        let versionText = try required("ce_streamversion")
        guard let version = Int64(versionText), version >= 1 else {
            throw CloudEventError("ce_streamversion '\(versionText)' is not a stream version (1, 2, 3, ...)")
        }
        let schemaVersion = headers["ce_schemaversion"].flatMap { Int($0) } ?? 1
        guard let payload = String(validating: value, as: UTF8.self) else { throw CloudEventError("the CloudEvent's data is not UTF-8 JSON") }
        let metadata = EventMetadata(
            correlationID: headers["ce_correlationid"], causationID: headers["ce_causationid"], actor: headers["ce_actor"],
            traceparent: headers["ce_traceparent"])
        return RecordedEvent(
            position: -1, eventID: id, streamID: try required("ce_subject"), streamVersion: version, eventType: try required("ce_type"),
            schemaVersion: schemaVersion, payload: payload, metadata: metadata, occurredAt: time)
    }
}

/// A record marked as a CloudEvent lacks an attribute EventOutbox needs, or holds one it cannot read.
public struct CloudEventError: Error, CustomStringConvertible, Sendable {
    public var description: String
    init(_ description: String) { self.description = description }
}
