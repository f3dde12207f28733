import EventSourcing
import EventStoreSQL
import Foundation
import Logging
import Metrics
import LibPQ

/// Loads and saves one kind of aggregate: latest snapshot + the events after it, and appends with
/// optimistic concurrency. Writes a snapshot every ``snapshotInterval`` events.
public struct AggregateRepository<State: Aggregate>: Sendable {
    public let store: EventStore
    public let registry: EventRegistry
    /// A snapshot is written when a save crosses a multiple of this many events, and when a load had to replay
    /// this many events or more (a stream imported without snapshots, or whose state schema changed). Default: 100.
    public var snapshotInterval: Int
    /// States that ``execute(_:metadata:maxAttempts:alsoWriting:_:)`` decides on without loading; `nil`: every
    /// command loads its aggregate. Default: `nil`.
    public var cache: AggregateCache<State>?
    public var logger: Logger
    private let commandConflicts: Counter

    public init(
        store: EventStore, registry: EventRegistry, snapshotInterval: Int = 100, cache: AggregateCache<State>? = nil,
        logger: Logger = Logger(label: "eventoutbox.repository")
    ) {
        precondition(snapshotInterval >= 1, "snapshotInterval must be at least 1")
        self.store = store
        self.registry = registry
        self.snapshotInterval = snapshotInterval
        self.cache = cache
        self.logger = logger
        commandConflicts = Counter(label: "eventoutbox_command_conflicts_total", dimensions: [("category", State.category)])
    }

    /// The current state: the latest usable snapshot plus the events after it, read in one statement. A load
    /// that replays ``snapshotInterval`` events or more leaves a snapshot for the next one.
    public func load(_ streamID: String) async throws -> VersionedState<State> {
        let (start, events) = try await snapshotAndTail(streamID, through: .max)
        let state = try replay(events, onto: start)
        if events.count >= snapshotInterval { await writeSnapshot(streamID, state) }
        return state
    }

    /// The state right after event `version` (time travel by version): the newest usable snapshot at or below
    /// `version`, plus the events after it. Past the end of the stream, the current state.
    public func load(_ streamID: String, atVersion version: Int64) async throws -> VersionedState<State> {
        let (start, events) = try await snapshotAndTail(streamID, through: version)
        return try replay(events, onto: start)
    }

    /// The newest usable snapshot at or below `version` (the empty state if none) and the stream's events after it
    /// through `version`: one statement, one round trip. A snapshot that does not decode is passed over (it is
    /// only a cache): the whole stream is read instead.
    private func snapshotAndTail(_ streamID: String, through version: Int64) async throws
        -> (start: VersionedState<State>, events: [RecordedEvent])
    {
        let rows = try await store.pool.withConnection { connection in
            try await connection.query(
                EventTables.snapshotAndTailSQL, [.text(streamID), .int(State.stateSchemaVersion), .int64(version)],
                statement: "load snapshot and events")
        }
        let empty = VersionedState(state: State(), version: 0)
        guard let first = rows.first, try first.decode(Bool.self, "is_snapshot") else {
            return (empty, try rows.map(RecordedEvent.init(row:)))
        }
        let events = try rows.dropFirst().map(RecordedEvent.init(row:))
        do {
            let state = try EventJSON.decoder.decode(State.self, from: Data(try first.decode(String.self, "payload").utf8))
            return (VersionedState(state: state, version: try first.decode(Int64.self, "stream_version")), events)
        } catch {
            logger.warning(
                "ignoring a snapshot that does not decode; replaying the whole stream",
                metadata: ["stream.id": "\(streamID)", "error": "\(error)"])
            return (empty, try await store.readStream(streamID, through: version))
        }
    }

    /// The state as it was at `date` (time travel by time): the state after the last event that had occurred by
    /// then (version 0, the empty state, if none had). Uses snapshots as ``load(_:atVersion:)`` does.
    public func load(_ streamID: String, asOf date: Date) async throws -> VersionedState<State> {
        let version = try await store.pool.withConnection { connection in
            try await connection.queryOne(
                "SELECT COALESCE(max(stream_version), 0) AS version FROM events WHERE stream_id = $1 AND occurred_at <= $2",
                [.text(streamID), .timestamp(date)], statement: "version as of"
            ).decode(Int64.self, "version")
        }
        guard version > 0 else { return VersionedState(state: State(), version: 0) }
        return try await load(streamID, atVersion: version)
    }

    /// Folds stored events into a state.
    /// - Throws: `EventDecodingError` for an event that cannot be read; the aggregate's error for one it rejects.
    public func replay(_ events: [RecordedEvent], onto start: VersionedState<State>) throws -> VersionedState<State> {
        var current = start
        for recorded in events {
            try current.state.apply(try registry.decode(recorded))
            current.version = recorded.streamVersion
        }
        return current
    }

    /// Appends new events to a state loaded earlier; fails with `ConcurrencyConflict` if the stream moved on.
    /// With a ``cache``, the saved state is kept there (the append at its exact version proves it current).
    /// - Parameters:
    ///   - streamID: the aggregate's stream.
    ///   - loaded: the state the events were decided on (its version is the one expected).
    ///   - events: the new events, in order.
    ///   - alsoWriting: given the state after the events, statements that commit with them.
    /// - Returns: the state after the events.
    @discardableResult
    public func save(
        _ streamID: String, _ events: [NewEvent], after loaded: VersionedState<State>,
        alsoWriting: (VersionedState<State>) throws -> [TransactionalWrite] = { _ in [] }
    ) async throws -> VersionedState<State> {
        guard !events.isEmpty else { return loaded }
        var next = loaded
        for event in events { try next.state.apply(event.event) }
        next.version = loaded.version + Int64(events.count)
        let result: AppendResult
        do {
            result = try await store.append(
                events, to: streamID, category: State.category,
                expectedVersion: loaded.version == 0 ? .noStream : .exact(loaded.version), alsoWriting: try alsoWriting(next))
        } catch {
            // A conflict is dealt with by the caller; any other failure may have committed or not: trust nothing.
            if !(error is ConcurrencyConflict) { cache?.forget(streamID, stale: false) }
            throw error
        }
        next.version = result.streamVersion
        // Appended at exactly the version it was decided on: the state is the stream's current one.
        cache?.remember(streamID, next)
        if next.version / Int64(snapshotInterval) > loaded.version / Int64(snapshotInterval) {
            await writeSnapshot(streamID, next)
        }
        return next
    }

    /// Runs a command: load, decide, save; on a concurrency conflict, reload and decide again, at most
    /// `maxAttempts` times. With a ``cache``, the first decision is made on the cached state when there is one;
    /// the append at exactly its version proves it current. A cached state the append finds out of date, or one
    /// on which `decide` refuses or decides nothing, is not trusted: the command is decided again on the state
    /// loaded from the store (not counted as an attempt). Commands on one stream take turns within the process
    /// (``AggregateCache``), so they do not race each other to a version.
    /// - Parameters:
    ///   - streamID: the aggregate's stream.
    ///   - metadata: recorded with each event (correlation, causation, actor, trace).
    ///   - maxAttempts: how many times to decide again after a conflict before giving up.
    ///   - alsoWriting: given the state after the decided events and the events, statements that commit
    ///     with them (not called when the command decides no events).
    ///   - decide: returns the events the command produces from the current state (may be empty);
    ///     throws to refuse the command without recording anything.
    /// - Returns: the new state and the events that were recorded.
    @discardableResult
    public func execute(
        _ streamID: String, metadata: EventMetadata = .init(), maxAttempts: Int = 10,
        alsoWriting: @Sendable (VersionedState<State>, [any DomainEvent]) throws -> [TransactionalWrite] = { _, _ in [] },
        _ decide: @Sendable (VersionedState<State>) throws -> [any DomainEvent]
    ) async throws -> (state: VersionedState<State>, events: [any DomainEvent]) {
        precondition(maxAttempts >= 1, "maxAttempts must be at least 1")
        guard let cache else {
            return try await decideAndSave(streamID, metadata: metadata, maxAttempts: maxAttempts, alsoWriting: alsoWriting, decide)
        }
        return try await cache.inTurn(streamID) {
            if let cached = cache.state(of: streamID) {
                // A refusal or an empty decision would be answered without an append to prove the state current.
                if let decided = try? decide(cached), !decided.isEmpty {
                    do {
                        return try await save(streamID, decided, after: cached, metadata: metadata, alsoWriting: alsoWriting)
                    } catch is ConcurrencyConflict {
                        cache.forget(streamID, stale: true)
                        logger.debug(
                            "cached state was out of date; deciding again on the stored state", metadata: ["stream.id": "\(streamID)"])
                    }
                }
            }
            return try await decideAndSave(streamID, metadata: metadata, maxAttempts: maxAttempts, alsoWriting: alsoWriting, decide)
        }
    }

    /// Load, decide, save, and again after a conflict, at most `maxAttempts` times.
    private func decideAndSave(
        _ streamID: String, metadata: EventMetadata, maxAttempts: Int,
        alsoWriting: @Sendable (VersionedState<State>, [any DomainEvent]) throws -> [TransactionalWrite],
        _ decide: @Sendable (VersionedState<State>) throws -> [any DomainEvent]
    ) async throws -> (state: VersionedState<State>, events: [any DomainEvent]) {
        var attempt = 0
        while true {
            attempt += 1
            let loaded = try await load(streamID)
            let decided = try decide(loaded)
            do {
                return try await save(streamID, decided, after: loaded, metadata: metadata, alsoWriting: alsoWriting)
            } catch let conflict as ConcurrencyConflict where attempt < maxAttempts {
                logger.debug(
                    "retrying command after a concurrency conflict",
                    metadata: ["stream.id": "\(streamID)", "attempt": "\(attempt)", "conflict": "\(conflict)"])
                commandConflicts.increment()
                // Back off a little, with jitter, so that contenders spread out.
                try await Task.sleep(for: .microseconds(Int.random(in: 0...(1000 * min(attempt, 20)))))
            }
        }
    }

    /// ``save(_:_:after:alsoWriting:)`` of the decided events, with their metadata.
    private func save(
        _ streamID: String, _ decided: [any DomainEvent], after loaded: VersionedState<State>, metadata: EventMetadata,
        alsoWriting: @Sendable (VersionedState<State>, [any DomainEvent]) throws -> [TransactionalWrite]
    ) async throws -> (state: VersionedState<State>, events: [any DomainEvent]) {
        let saved = try await save(streamID, decided.map { NewEvent($0, metadata: metadata) }, after: loaded) {
            try alsoWriting($0, decided)
        }
        return (saved, decided)
    }

    private func writeSnapshot(_ streamID: String, _ state: VersionedState<State>) async {
        do {
            let json = String(decoding: try EventJSON.encoder.encode(state.state), as: UTF8.self)
            try await store.pool.withConnection { connection in
                try await connection.execute(
                    // Same stream, version and layout means the same state, unless the stored one is corrupt: replace.
                    "INSERT INTO snapshots (stream_id, version, state_schema_version, state) VALUES ($1, $2, $3, $4) "
                        + "ON CONFLICT (stream_id, version, state_schema_version) DO UPDATE SET state = EXCLUDED.state",
                    [.text(streamID), .int64(state.version), .int(State.stateSchemaVersion), .jsonb(json)],
                    statement: "write snapshot")
            }
        } catch {
            // The events are committed; a missing snapshot only makes the next load replay more.
            logger.warning("could not write snapshot", metadata: ["stream.id": "\(streamID)", "error": "\(error)"])
        }
    }
}
