import EventSourcing
import Foundation
import LibPQ

/// Applies events to projections exactly once each.
///
/// Per projection, `<projection>_progress` holds for each stream and source the last version applied; the
/// handler's writes and the new versions commit in one transaction. An event at or below its stream's version
/// for its source is a duplicate and skipped. This is exact because a stream's events reach a projection in
/// version order on each source: the relay publishes a stream's rows in order, with the stream id as the key, so
/// they land on one partition of each topic; the event store replays them in order.
/// The source `''` (the event store) stands for all of a stream's events, whatever topic they are routed to.
public struct ProjectionApplier: Sendable {
    public let projections: [Projection]
    public let registry: EventRegistry

    public init(projections: [Projection], registry: EventRegistry) {
        self.projections = projections
        self.registry = registry
    }

    /// The same applier with only `projection`: for applying an event to each projection on its own, so that
    /// one projection refusing it does not keep it from the others.
    public func only(_ projection: Projection) -> ProjectionApplier {
        ProjectionApplier(projections: [projection], registry: registry)
    }

    /// What happened to a batch, summed over projections: one event applied to two projections counts 2.
    public struct Outcome: Sendable, Equatable {
        public var applied = 0
        public var duplicates = 0
        public init(applied: Int = 0, duplicates: Int = 0) {
            self.applied = applied
            self.duplicates = duplicates
        }
    }

    /// Decodes `recorded` (with ``registry``) and applies it inside the caller's transaction.
    /// - Throws: `EventDecodingError` if the event cannot be decoded (nothing written); database errors.
    public func apply(_ recorded: RecordedEvent, topic: String?, suffix: String = "", on connection: PQConnection) async throws -> Outcome {
        try await apply([ProjectedEvent(event: try registry.decode(recorded), recorded: recorded, topic: topic)], suffix: suffix, on: connection)
    }

    /// Applies events, in order, to every projection inside the caller's transaction. Per projection: one statement
    /// locks and reads the progress of the batch's streams, one records the new versions, and the handler gets the
    /// new events.
    public func apply(_ events: [ProjectedEvent], suffix: String = "", on connection: PQConnection) async throws -> Outcome {
        try await apply(events, suffix: suffix, evenIfBehind: false, on: connection)
    }

    /// `evenIfBehind`: apply every event although its stream has moved past it (a dead letter being retried: it
    /// was never applied, and later events of its stream were).
    func apply(_ events: [ProjectedEvent], suffix: String = "", evenIfBehind: Bool, on connection: PQConnection) async throws -> Outcome {
        var outcome = Outcome()
        guard !events.isEmpty else { return outcome }
        let context = ProjectionContext(connection: connection, suffix: suffix)
        for projection in projections {
            let table = SQLIdentifier.quoted(projection.progressTable.name + suffix)
            var progress = try await StreamProgress.lock(events, in: table, on: connection)
            let fresh = events.filter { evenIfBehind ? progress.force($0) : progress.admit($0) }
            outcome.duplicates += events.count - fresh.count
            guard !fresh.isEmpty else { continue }
            // Progress first: a stream another transaction is recording at the same moment fails here, retriably,
            // before the handler's writes can collide with that transaction's.
            try await progress.record(in: table, on: connection)
            try await projection.applyBatch(fresh, context)
            outcome.applied += fresh.count
        }
        return outcome
    }
}

/// The last applied version per stream and source, for the streams of one batch; decides which events are new.
struct StreamProgress: Equatable {
    struct Key: Hashable, Comparable {
        var stream: String
        var source: String
        static func < (a: Key, b: Key) -> Bool { (a.stream, a.source) < (b.stream, b.source) }
    }

    /// The source recorded for events replayed from the event store: it covers every topic.
    static let store = ""

    private(set) var versions: [Key: Int64]
    private(set) var changed: Set<Key> = []
    /// Keys that have a row (read by ``lock(_:in:on:)``).
    let existing: Set<Key>

    init(versions: [Key: Int64] = [:]) {
        self.versions = versions
        self.existing = Set(versions.keys)
    }

    static func key(_ event: ProjectedEvent) -> Key { Key(stream: event.recorded.streamID, source: event.topic ?? store) }

    /// `true` (and remembered) if `event` is past what was applied for its stream, from its source and from the store.
    mutating func admit(_ event: ProjectedEvent) -> Bool {
        let key = Self.key(event)
        let applied = max(versions[key] ?? 0, versions[Key(stream: key.stream, source: Self.store)] ?? 0)
        guard event.recorded.streamVersion > applied else { return false }
        versions[key] = event.recorded.streamVersion
        changed.insert(key)
        return true
    }

    /// Records `event` as applied whatever the stream's version (never lowering it); always `true`.
    mutating func force(_ event: ProjectedEvent) -> Bool {
        let key = Self.key(event)
        versions[key] = max(versions[key] ?? 0, event.recorded.streamVersion)
        changed.insert(key)
        return true
    }

    /// Reads the progress of the batch's streams and locks their rows until the transaction ends, so that two
    /// consumers (during a rebalance) cannot both apply an event. A stream new to the projection has no row to
    /// lock: ``record(in:on:)`` detects a concurrent first insert instead.
    static func lock(_ events: [ProjectedEvent], in table: String, on connection: PQConnection) async throws -> StreamProgress {
        // Sorted, so that two transactions lock rows in the same order.
        let streams = Set(events.map(\.recorded.streamID)).sorted()
        let rows = try await connection.query(
            "SELECT stream_id, source, last_version FROM \(table) WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, source FOR UPDATE",
            [.textArray(streams)], statement: "projection: lock progress")
        var versions: [Key: Int64] = [:]
        for row in rows {
            versions[Key(stream: try row.decode(String.self, at: 0), source: try row.decode(String.self, at: 1))] = try row.decode(Int64.self, at: 2)
        }
        return StreamProgress(versions: versions)
    }

    /// Writes the versions that ``admit(_:)`` advanced.
    /// - Throws: ``ConcurrentProjectionUpdate`` if another transaction recorded a stream this one found new.
    func record(in table: String, on connection: PQConnection) async throws {
        let keys = changed.sorted()
        guard !keys.isEmpty else { return }
        let updates = keys.filter { existing.contains($0) }
        let inserts = keys.filter { !existing.contains($0) }
        let inserted = try await connection.queryOne(
            "WITH updated AS (UPDATE \(table) AS p SET last_version = u.version "
                + "FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(stream_id, source, version) "
                + "WHERE p.stream_id = u.stream_id AND p.source = u.source RETURNING 1), "
                + "inserted AS (INSERT INTO \(table) (stream_id, source, last_version) "
                + "SELECT * FROM unnest($4::text[], $5::text[], $6::bigint[]) ON CONFLICT DO NOTHING RETURNING 1) "
                + "SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM updated) AS updated",
            [.textArray(updates.map(\.stream)), .textArray(updates.map(\.source)), .int64Array(updates.map { versions[$0]! }),
             .textArray(inserts.map(\.stream)), .textArray(inserts.map(\.source)), .int64Array(inserts.map { versions[$0]! })],
            statement: "projection: record progress"
        ).decode(Int.self, "inserted")
        guard inserted == inserts.count else {
            throw ConcurrentProjectionUpdate(table: table, streams: inserts.map(\.stream))
        }
    }
}

/// Another transaction applied events of a stream this one was applying for the first time (two consumers
/// overlapping during a rebalance). Transient: the transaction is rolled back and the batch retried, and then
/// the other's progress is seen.
public struct ConcurrentProjectionUpdate: Error, CustomStringConvertible, Sendable {
    public var table: String
    public var streams: [String]
    public var description: String {
        "another transaction recorded progress in \(table) for streams this one found new (\(streams.prefix(3).joined(separator: ", "))"
            + (streams.count > 3 ? ", …" : "") + "); the batch is rolled back and retried"
    }
}
