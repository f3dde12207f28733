import Foundation

/// An event of the domain: a fact, named in the past tense, that never changes once stored.
///
/// The type name and schema version are stored with each event. When the payload's shape changes, raise
/// ``schemaVersion`` and register an ``Upcaster`` that turns the previous version's JSON into the new one,
/// so old events keep reading.
public protocol DomainEvent: Codable, Sendable {
    /// The stable name stored with the event (e.g. `MoneyDeposited`). Never rename it.
    static var eventType: String { get }
    /// The current version of the payload's schema. Default: 1.
    static var schemaVersion: Int { get }
}

extension DomainEvent {
    public static var schemaVersion: Int { 1 }
}

/// Who and what caused an event; stored with it and carried into the outbox message.
public struct EventMetadata: Codable, Sendable, Hashable {
    /// Ties together every event caused by one request.
    public var correlationID: String?
    /// The event or command that directly caused this one.
    public var causationID: String?
    /// Who issued the command (a user, a service).
    public var actor: String?
    /// W3C trace context (`traceparent` header) of the request, so traces continue through Kafka.
    public var traceparent: String?

    public init(correlationID: String? = nil, causationID: String? = nil, actor: String? = nil, traceparent: String? = nil) {
        self.correlationID = correlationID
        self.causationID = causationID
        self.actor = actor
        self.traceparent = traceparent
    }

    /// Reads metadata from its JSON text, as stored: a flat object of strings by a small scanner (the common case,
    /// read once per event), anything else (nulls, unknown shapes) by `JSONDecoder`.
    public init(jsonText: String) throws {
        if let fields = JSONText.stringObject(jsonText) {
            self.init(
                correlationID: fields["correlationID"], causationID: fields["causationID"], actor: fields["actor"],
                traceparent: fields["traceparent"])
        } else {
            self = try EventJSON.decoder.decode(EventMetadata.self, from: Data(jsonText.utf8))
        }
    }
}

/// An event to append, with the identity and time it will be stored under.
public struct NewEvent: Sendable {
    public var eventID: UUID
    public var event: any DomainEvent
    public var metadata: EventMetadata
    public var occurredAt: Date

    public init(
        _ event: any DomainEvent, metadata: EventMetadata = .init(), eventID: UUID = .random(), occurredAt: Date = Date()
    ) {
        self.eventID = eventID
        self.event = event
        self.metadata = metadata
        self.occurredAt = occurredAt
    }

    public var eventType: String { type(of: event).eventType }
    public var schemaVersion: Int { type(of: event).schemaVersion }

    /// The payload as JSON text.
    public func encodedPayload() throws -> String {
        String(decoding: try EventJSON.encoder.encode(event), as: UTF8.self)
    }
}

/// An event as stored: raw payload, not yet decoded into a Swift type.
public struct RecordedEvent: Sendable, Hashable {
    /// Position in the store's global order (for replays of everything).
    public var position: Int64
    public var eventID: UUID
    public var streamID: String
    /// 1 for a stream's first event, then 2, 3, ...
    public var streamVersion: Int64
    public var eventType: String
    public var schemaVersion: Int
    /// The payload as JSON text, as stored (before upcasting).
    public var payload: String
    public var metadata: EventMetadata
    public var occurredAt: Date

    public init(
        position: Int64, eventID: UUID, streamID: String, streamVersion: Int64, eventType: String, schemaVersion: Int,
        payload: String, metadata: EventMetadata, occurredAt: Date
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
}

/// JSON settings shared by payloads, snapshots and envelopes: sorted keys (stable bytes), ISO-8601 dates.
public enum EventJSON {
    public static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }()

    public static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }()
}

extension UUID {
    /// A random (version 4) UUID from the system's generator (`getrandom`). Foundation's `UUID()` opens
    /// `/dev/urandom` for each one on Linux: measurable on the append path.
    public static func random() -> UUID {
        var generator = SystemRandomNumberGenerator()
        var bytes = (generator.next() as UInt64, generator.next() as UInt64)
        return withUnsafeMutableBytes(of: &bytes) { raw in
            raw[6] = raw[6] & 0x0F | 0x40  // version 4
            raw[8] = raw[8] & 0x3F | 0x80  // RFC 4122 variant
            return UUID(uuid: raw.load(as: uuid_t.self))
        }
    }
}
