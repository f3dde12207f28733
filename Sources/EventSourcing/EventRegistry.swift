import Foundation

/// Turns an older schema version of one event type into the next version, as JSON.
public struct Upcaster: Sendable {
    public var eventType: String
    /// The version this upcaster reads; it produces `fromVersion + 1`.
    public var fromVersion: Int
    public var transform: @Sendable (JSONValue) throws -> JSONValue

    public init(eventType: String, fromVersion: Int, transform: @escaping @Sendable (JSONValue) throws -> JSONValue) {
        self.eventType = eventType
        self.fromVersion = fromVersion
        self.transform = transform
    }
}

/// A stored event could not be turned into a Swift event. Says which event, of which type, in which stream.
public struct EventDecodingError: Error, CustomStringConvertible, Sendable {
    public var eventID: UUID
    public var eventType: String
    public var schemaVersion: Int
    public var streamID: String
    public var reason: String
    /// The error behind `reason`, when there was one (a `DecodingError` from the payload, an upcaster's own
    /// error), for callers that look into it; `reason` already says what it was.
    public var underlying: (any Error)?

    public init(eventID: UUID, eventType: String, schemaVersion: Int, streamID: String, reason: String, underlying: (any Error)? = nil) {
        self.eventID = eventID
        self.eventType = eventType
        self.schemaVersion = schemaVersion
        self.streamID = streamID
        self.reason = reason
        self.underlying = underlying
    }

    public var description: String {
        "cannot decode event \(eventID) of type '\(eventType)' v\(schemaVersion) in stream '\(streamID)': \(reason)"
    }
}

/// The event types an application knows, with the upcasters for their older schema versions.
///
/// Reading an event whose type is not registered, or whose payload does not decode, throws
/// ``EventDecodingError``; nothing is ever skipped silently.
public struct EventRegistry: Sendable {
    private var decoders: [String: (version: Int, decode: @Sendable (Data) throws -> any DomainEvent)] = [:]
    private var upcasters: [String: [Int: Upcaster]] = [:]

    public init() {}

    /// Registers an event type under its ``DomainEvent/eventType``.
    public mutating func register<Event: DomainEvent>(_ type: Event.Type) {
        precondition(decoders[Event.eventType] == nil, "event type '\(Event.eventType)' registered twice")
        decoders[Event.eventType] = (Event.schemaVersion, { try EventJSON.decoder.decode(Event.self, from: $0) })
    }

    /// Registers an upcaster from `fromVersion` to `fromVersion + 1` of an event type.
    public mutating func register(_ upcaster: Upcaster) {
        upcasters[upcaster.eventType, default: [:]][upcaster.fromVersion] = upcaster
    }

    public func isRegistered(_ eventType: String) -> Bool { decoders[eventType] != nil }

    /// Decodes a stored event into its current Swift type, upcasting older schema versions first.
    public func decode(_ recorded: RecordedEvent) throws(EventDecodingError) -> any DomainEvent {
        func failure(_ reason: String, _ underlying: (any Error)? = nil) -> EventDecodingError {
            EventDecodingError(
                eventID: recorded.eventID, eventType: recorded.eventType, schemaVersion: recorded.schemaVersion,
                streamID: recorded.streamID, reason: reason, underlying: underlying)
        }
        guard let entry = decoders[recorded.eventType] else {
            throw failure("the event type is not registered (known: \(decoders.keys.sorted().joined(separator: ", ")))")
        }
        var data = Data(recorded.payload.utf8)
        if recorded.schemaVersion != entry.version {
            guard recorded.schemaVersion < entry.version else {
                throw failure("stored schema version is newer than this program's (\(entry.version)); upgrade the reader")
            }
            do {
                var json = try EventJSON.decoder.decode(JSONValue.self, from: data)
                for version in recorded.schemaVersion..<entry.version {
                    guard let upcaster = upcasters[recorded.eventType]?[version] else {
                        throw failure("no upcaster registered from v\(version) to v\(version + 1)")
                    }
                    json = try upcaster.transform(json)
                }
                data = try EventJSON.encoder.encode(json)
            } catch let error as EventDecodingError {
                throw error
            } catch {
                throw failure("upcasting failed: \(error)", error)
            }
        }
        do {
            return try entry.decode(data)
        } catch let error as DecodingError {
            throw failure("payload does not match the type: \(Self.describe(error))", error)
        } catch {
            throw failure("payload does not decode: \(error)", error)
        }
    }

    private static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            context.codingPath.map(\.stringValue).joined(separator: ".")
        }
        switch error {
        case .keyNotFound(let key, let context): return "missing key '\(path(context).isEmpty ? key.stringValue : path(context) + "." + key.stringValue)'"
        case .typeMismatch(_, let context): return "wrong type at '\(path(context))': \(context.debugDescription)"
        case .valueNotFound(_, let context): return "null at '\(path(context))'"
        case .dataCorrupted(let context): return "malformed JSON: \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }
}
