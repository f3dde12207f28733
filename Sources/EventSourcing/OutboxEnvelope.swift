import Foundation

/// The JSON value of every Kafka message the outbox publishes. Any consumer can read it:
///
/// ```json
/// {"eventId":"6F9619FF-...","streamId":"...","streamVersion":3,"eventType":"MoneyDeposited",
///  "schemaVersion":2,"occurredAt":"2026-11-25T12:00:00.123456Z","payload":{...},"metadata":{...}}
/// ```
/// `payload` is the event as stored (its `schemaVersion` says which shape); `metadata` holds
/// `correlationID`, `causationID`, `actor` and `traceparent` when set.
public struct OutboxEnvelope: Codable, Sendable, Hashable {
    public var eventId: UUID
    public var streamId: String
    public var streamVersion: Int64
    public var eventType: String
    public var schemaVersion: Int
    /// ISO 8601, UTC, microseconds.
    public var occurredAt: String
    public var payload: JSONValue
    public var metadata: EventMetadata

    public init(_ event: RecordedEvent) throws {
        eventId = event.eventID
        streamId = event.streamID
        streamVersion = event.streamVersion
        eventType = event.eventType
        schemaVersion = event.schemaVersion
        occurredAt = ISOTimestamp.format(event.occurredAt)
        payload = try EventJSON.decoder.decode(JSONValue.self, from: Data(event.payload.utf8))
        metadata = event.metadata
    }

    /// The envelope as the stored event it describes (position unknown: -1).
    public func recordedEvent() throws -> RecordedEvent {
        guard let date = ISOTimestamp.parse(occurredAt) else {
            throw EventDecodingError(
                eventID: eventId, eventType: eventType, schemaVersion: schemaVersion, streamID: streamId,
                reason: "occurredAt '\(occurredAt)' is not an ISO 8601 timestamp")
        }
        return RecordedEvent(
            position: -1, eventID: eventId, streamID: streamId, streamVersion: streamVersion, eventType: eventType,
            schemaVersion: schemaVersion, payload: String(decoding: try EventJSON.encoder.encode(payload), as: UTF8.self),
            metadata: metadata, occurredAt: date)
    }

    private enum CodingKeys: String, CodingKey {
        case eventId, streamId, streamVersion, eventType, schemaVersion, occurredAt, payload, metadata
    }

    /// Event ids are written in lowercase, as in the Kafka headers and in PostgreSQL.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(eventId.uuidString.lowercased(), forKey: .eventId)
        try container.encode(streamId, forKey: .streamId)
        try container.encode(streamVersion, forKey: .streamVersion)
        try container.encode(eventType, forKey: .eventType)
        try container.encode(schemaVersion, forKey: .schemaVersion)
        try container.encode(occurredAt, forKey: .occurredAt)
        try container.encode(payload, forKey: .payload)
        try container.encode(metadata, forKey: .metadata)
    }

    public func encoded() throws -> [UInt8] { Array(try EventJSON.encoder.encode(self)) }

    public static func decode(_ bytes: [UInt8]) throws -> OutboxEnvelope {
        try EventJSON.decoder.decode(OutboxEnvelope.self, from: Data(bytes))
    }
}

/// ISO 8601 timestamps with microseconds in UTC (`2026-11-25T12:00:00.123456Z`).
public enum ISOTimestamp {
    public static func format(_ date: Date) -> String {
        let micros = Int64((date.timeIntervalSince1970 * 1_000_000).rounded())
        let seconds = micros >= 0 ? micros / 1_000_000 : (micros - 999_999) / 1_000_000
        let fraction = micros - seconds * 1_000_000
        var time = time_t(seconds)
        var parts = tm()
        gmtime_r(&time, &parts)
        func pad(_ value: Int64, _ width: Int) -> String {
            let digits = String(value)
            return String(repeating: "0", count: max(0, width - digits.count)) + digits
        }
        return "\(pad(Int64(parts.tm_year) + 1900, 4))-\(pad(Int64(parts.tm_mon) + 1, 2))-\(pad(Int64(parts.tm_mday), 2))T"
            + "\(pad(Int64(parts.tm_hour), 2)):\(pad(Int64(parts.tm_min), 2)):\(pad(Int64(parts.tm_sec), 2)).\(pad(fraction, 6))Z"
    }

    /// Parses ISO 8601 with or without fractional seconds, `Z` or `±hh:mm`.
    public static func parse(_ text: String) -> Date? {
        let withFraction = Date.ISO8601FormatStyle(includingFractionalSeconds: true)
        if let date = try? withFraction.parse(text) {
            // The formatter keeps milliseconds only; recover the microseconds from the text.
            return refine(date, text)
        }
        return try? Date.ISO8601FormatStyle().parse(text)
    }

    private static func refine(_ date: Date, _ text: String) -> Date {
        guard let dot = text.firstIndex(of: ".") else { return date }
        let digits = text[text.index(after: dot)...].prefix { $0.isNumber }
        guard let value = Double("0." + digits) else { return date }
        let whole = (date.timeIntervalSince1970).rounded(.down)
        return Date(timeIntervalSince1970: whole + value)
    }
}
