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

    /// The stored event a Kafka record's value describes: what a consumer needs, read without building the
    /// envelope's tree (the payload stays raw JSON text for the registry to decode). An envelope of unusual
    /// shape (nulls in metadata, duplicate keys, numbers with fractions) takes the full decoder's path, which
    /// also gives the precise error when the value is not an envelope.
    public static func recordedEvent(from bytes: [UInt8]) throws -> RecordedEvent {
        if let event = bytes.withUnsafeBufferPointer(EnvelopeReader.read) { return event }
        return try decode(bytes).recordedEvent()
    }
}

/// The fast path of ``OutboxEnvelope/recordedEvent(from:)``: `nil` whenever anything is unusual.
private enum EnvelopeReader {
    static func read(_ bytes: UnsafeBufferPointer<UInt8>) -> RecordedEvent? {
        guard let members = JSONText.members(of: bytes) else { return nil }
        var fields: [String: Range<Int>] = [:]
        for member in members {
            guard fields.updateValue(member.value, forKey: member.key) == nil else { return nil }
        }
        func raw(_ key: String) -> String? {
            fields[key].map { String(decoding: UnsafeBufferPointer(rebasing: bytes[$0]), as: UTF8.self) }
        }
        func string(_ key: String) -> String? {
            guard let text = raw(key), text.utf8.first == UInt8(ascii: "\""), text.utf8.count >= 2 else { return nil }
            if !text.utf8.contains(UInt8(ascii: "\\")) { return String(text.dropFirst().dropLast()) }
            // Escapes: the object scanner decodes them.
            return JSONText.stringObject("{\"v\":" + text + "}")?["v"]
        }
        func integer(_ key: String) -> Int64? {
            guard let text = raw(key), text.utf8.allSatisfy({ $0 == UInt8(ascii: "-") || ($0 >= 48 && $0 <= 57) }) else { return nil }
            return Int64(text)
        }
        guard let idText = string("eventId"), let eventID = UUID(uuidString: idText),
            let streamID = string("streamId"), let streamVersion = integer("streamVersion"),
            let eventType = string("eventType"), let schemaVersion = integer("schemaVersion").flatMap({ Int(exactly: $0) }),
            let occurredAt = string("occurredAt").flatMap(ISOTimestamp.parse),
            let payload = raw("payload"), let metadataText = raw("metadata"),
            let metadata = try? EventMetadata(jsonText: metadataText)
        else { return nil }
        return RecordedEvent(
            position: -1, eventID: eventID, streamID: streamID, streamVersion: streamVersion, eventType: eventType,
            schemaVersion: schemaVersion, payload: payload,
            metadata: metadata, occurredAt: occurredAt)
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
        if let date = parseFormatted(text) { return date }
        let withFraction = Date.ISO8601FormatStyle(includingFractionalSeconds: true)
        if let date = try? withFraction.parse(text) {
            // The formatter keeps milliseconds only; recover the microseconds from the text.
            return refine(date, text)
        }
        return try? Date.ISO8601FormatStyle().parse(text)
    }

    /// The exact form ``format(_:)`` writes (`2026-11-25T12:00:00.123456Z`), read by arithmetic: a consumer
    /// reads one per record, and the general parser costs microseconds each. `nil` for any other form.
    private static func parseFormatted(_ text: String) -> Date? {
        var text = text
        return text.withUTF8 { bytes -> Date? in
            guard bytes.count == 27, bytes[4] == UInt8(ascii: "-"), bytes[7] == UInt8(ascii: "-"), bytes[10] == UInt8(ascii: "T"),
                bytes[13] == UInt8(ascii: ":"), bytes[16] == UInt8(ascii: ":"), bytes[19] == UInt8(ascii: "."), bytes[26] == UInt8(ascii: "Z")
            else { return nil }
            func number(_ range: Range<Int>) -> Int64? {
                var value: Int64 = 0
                for index in range {
                    let digit = bytes[index] &- UInt8(ascii: "0")
                    guard digit <= 9 else { return nil }
                    value = value * 10 + Int64(digit)
                }
                return value
            }
            guard let year = number(0..<4), let month = number(5..<7), let day = number(8..<10), let hour = number(11..<13),
                let minute = number(14..<16), let second = number(17..<19), let micros = number(20..<26),
                year >= 1, (1...12).contains(month), hour < 24, minute < 60, second < 60
            else { return nil }
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
            let monthDays: [Int64] = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
            guard day >= 1, day <= monthDays[Int(month) - 1] else { return nil }
            // Days since 1970-01-01 of a proleptic Gregorian date (the civil-from-days inverse).
            let y = month <= 2 ? year - 1 : year
            let era = y / 400
            let yearOfEra = y - era * 400
            let dayOfYear = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
            let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
            let days = era * 146_097 + dayOfEra - 719_468
            let seconds = days * 86_400 + hour * 3600 + minute * 60 + second
            return Date(timeIntervalSince1970: Double(seconds) + Double(micros) / 1_000_000)
        }
    }

    private static func refine(_ date: Date, _ text: String) -> Date {
        guard let dot = text.firstIndex(of: ".") else { return date }
        let digits = text[text.index(after: dot)...].prefix { $0.isNumber }
        guard let value = Double("0." + digits) else { return date }
        let whole = (date.timeIntervalSince1970).rounded(.down)
        return Date(timeIntervalSince1970: whole + value)
    }
}
