/// State rebuilt from a stream's events.
///
/// `apply` must be a pure fold: it only changes state from the event, never checks rules or fails on
/// business grounds (events are facts). The state is `Codable` so it can be snapshotted.
public protocol Aggregate: Codable, Sendable {
    /// Names the kind of stream (e.g. `account`); routes its events to a topic.
    static var category: String { get }
    /// Version of the snapshot format. Raise it when the stored state's shape changes: older snapshots are
    /// then ignored (full replay) instead of misread.
    static var stateSchemaVersion: Int { get }
    /// The state before any event.
    init()
    /// Folds one event into the state. Throw only for an event this aggregate cannot understand.
    mutating func apply(_ event: any DomainEvent) throws
}

/// An aggregate's state together with the stream version it reflects.
public struct VersionedState<State: Aggregate>: Sendable {
    public var state: State
    /// The version of the last event applied (0: no events).
    public var version: Int64

    public init(state: State, version: Int64) {
        self.state = state
        self.version = version
    }

    /// `true` if the stream has no events yet.
    public var isNew: Bool { version == 0 }
}

/// An event the aggregate does not handle.
public struct UnexpectedEvent: Error, CustomStringConvertible, Sendable {
    public var aggregate: String
    public var eventType: String
    public init(aggregate: String, eventType: String) {
        self.aggregate = aggregate
        self.eventType = eventType
    }
    /// The error for `event` reaching an aggregate of type `aggregate` that does not handle it.
    public init<State: Aggregate>(_ event: any DomainEvent, in aggregate: State.Type) {
        self.init(aggregate: State.category, eventType: type(of: event).eventType)
    }
    public var description: String { "aggregate '\(aggregate)' cannot apply an event of type '\(eventType)'" }
}

/// What an append expects the stream's current version to be (optimistic concurrency).
public enum ExpectedVersion: Sendable, Hashable, CustomStringConvertible {
    /// The stream must not exist yet.
    case noStream
    /// The stream's last event must have exactly this version.
    case exact(Int64)
    /// No check.
    case any

    public var description: String {
        switch self {
        case .noStream: "no stream"
        case .exact(let version): "version \(version)"
        case .any: "any version"
        }
    }
}

/// The stream moved on since it was read: someone else appended. Nothing was written.
public struct ConcurrencyConflict: Error, CustomStringConvertible, Sendable {
    public var streamID: String
    public var expected: ExpectedVersion
    /// The stream's version found at append time (0: no stream).
    public var actual: Int64

    public init(streamID: String, expected: ExpectedVersion, actual: Int64) {
        self.streamID = streamID
        self.expected = expected
        self.actual = actual
    }

    public var description: String {
        "concurrency conflict on stream '\(streamID)': expected \(expected), found version \(actual); "
            + "reload the stream and decide again"
    }
}
