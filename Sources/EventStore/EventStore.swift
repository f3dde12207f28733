import EventSourcing
import EventStoreSQL
import Foundation
import LibPQ

/// Event streams in PostgreSQL, with a transactional outbox.
///
/// Every ``append(_:to:category:expectedVersion:alsoWriting:)`` writes the events and one outbox row per event in a single
/// transaction, and sends `NOTIFY` on `EventTables.outboxChannel`: either all of it commits or none.
public struct EventStore: Sendable {
    public let pool: PQPool
    public var routing: OutboxRouting
    /// Whether appends send `NOTIFY` so that the relay wakes at once. Default: `true`.
    ///
    /// PostgreSQL serializes the commits of notifying transactions (a global lock at commit), which caps
    /// concurrent append throughput (measured: 1,538 tps with NOTIFY vs 3,126 without, 8 clients). With
    /// `false`, the relay finds new rows by polling (`--poll-interval`): more throughput, more latency.
    /// With `outbox-relay --source wal` nothing listens (the relay reads the write-ahead log): set it to `false`.
    public var notifiesOnAppend: Bool

    public init(pool: PQPool, routing: OutboxRouting = OutboxRouting(), notifiesOnAppend: Bool = true) {
        self.pool = pool
        self.routing = routing
        self.notifiesOnAppend = notifiesOnAppend
    }

    /// Appends events to a stream if its version is as expected.
    /// - Parameters:
    ///   - events: the new events, in order (their versions follow the stream's).
    ///   - streamID: the stream to append to.
    ///   - category: the kind of stream (routes the outbox messages to a topic, see `OutboxRouting` in EventStoreSQL).
    ///   - expectedVersion: the version the stream must have now (`ExpectedVersion`).
    ///   - writes: statements that commit in the same transaction as the events, and only with them (for
    ///     example a service's idempotency record). A failure of one rolls the events back too.
    /// - Throws: `ConcurrencyConflict` (nothing written) when the stream's version differs from
    ///   `expectedVersion`; `PQError` for database failures (nothing written either).
    @discardableResult
    public func append(
        _ events: [NewEvent], to streamID: String, category: String, expectedVersion: ExpectedVersion,
        alsoWriting writes: [TransactionalWrite] = []
    ) async throws -> AppendResult {
        precondition(!events.isEmpty, "append needs at least one event")
        return try await withAppendSpan(events, streamID: streamID) { traced in
            try await append(traced, streamID, category, expectedVersion, writes)
        }
    }

    private func append(
        _ events: [NewEvent], _ streamID: String, _ category: String, _ expectedVersion: ExpectedVersion, _ writes: [TransactionalWrite]
    ) async throws -> AppendResult {
        var attempt = 0
        while true {
            attempt += 1
            let base = try await expectedVersion.base { try await currentVersion(of: streamID) }
            let statement = try AppendStatement(
                events, to: streamID, category: category, after: base, routing: routing, notify: notifiesOnAppend)
            do {
                let outcome = try await pool.withConnection { connection in
                    guard !writes.isEmpty else { return try await Self.run(statement, on: connection) }
                    return try await connection.withTransaction { tx in
                        let outcome = try await Self.run(statement, on: tx)
                        if case .appended = outcome {
                            for write in writes { try await tx.execute(write.sql, write.binds, statement: write.statement) }
                        }
                        return outcome
                    }
                }
                switch outcome {
                case .appended(let appended): return appended
                case .versionMismatch(let actual):
                    if expectedVersion.retriesMismatch(attempt: attempt) { continue }
                    throw ConcurrencyConflict(streamID: streamID, expected: expectedVersion, actual: actual)
                }
            } catch let error as PQError where error.constraint == EventTables.streamVersionConstraint {
                // Another append won the race for the same versions between our check and our insert.
                if expectedVersion.retriesMismatch(attempt: attempt) { continue }
                let actual = try await currentVersion(of: streamID)
                throw ConcurrencyConflict(streamID: streamID, expected: expectedVersion, actual: actual)
            }
        }
    }

    private static func run(_ statement: AppendStatement, on connection: PQConnection) async throws -> AppendOutcome {
        let result = try await connection.query(statement.sql, statement.values.map(PQBind.init), statement: "append")
        // The statement always returns a row (`current` is left-joined): without one, the server changed it.
        guard let first = result.first else {
            throw PQError(code: .noRow, message: "statement 'append' returned no row where one was expected")
        }
        return statement.outcome(
            current: try first.decode(Int64.self, "current"),
            positions: try result.compactMap { try $0.decodeIfPresent(Int64.self, "position") })
    }

    /// The version of a stream's last event (0 if the stream does not exist).
    public func currentVersion(of streamID: String) async throws -> Int64 {
        try await pool.withConnection { connection in
            try await connection.queryOne(EventTables.currentVersionSQL, [.text(streamID)], statement: "current version"
            ).decode(Int64.self, "version")
        }
    }

    /// A stream's events in version order, from `version` through `throughVersion` (inclusive, default: the end).
    public func readStream(_ streamID: String, from version: Int64 = 1, through throughVersion: Int64 = .max) async throws
        -> [RecordedEvent]
    {
        try await pool.withConnection { connection in
            try await connection.query(
                EventTables.readStreamSQL, [.text(streamID), .int64(version), .int64(throughVersion)], statement: "read stream"
            ).map(RecordedEvent.init(row:))
        }
    }

    /// The stream as it was at `date` (inclusive): its events through the last one that had occurred by then. A
    /// state is a prefix of its history, so an earlier version stamped later (clocks differ) is included.
    public func readStream(_ streamID: String, asOf date: Date) async throws -> [RecordedEvent] {
        try await query(
            "WHERE stream_id = $1 AND stream_version <= (SELECT COALESCE(max(stream_version), 0) FROM events "
                + "WHERE stream_id = $1 AND occurred_at <= $2) ORDER BY stream_version",
            [.text(streamID), .timestamp(date)], statement: "read stream as of")
    }

    /// Every event after global position `position`, in global order, fetched `batchSize` at a time so
    /// memory stays constant however long the store is.
    public func readAll(after position: Int64 = 0, batchSize: Int = 1000) -> AllEventsSequence {
        AllEventsSequence(store: self, start: position, batchSize: batchSize)
    }

    /// The highest global position (0 if the store is empty).
    public func headPosition() async throws -> Int64 {
        try await pool.withConnection { connection in
            try await connection.queryOne("SELECT COALESCE(max(position), 0) AS head FROM events", statement: "head position")
                .decode(Int64.self, "head")
        }
    }

    /// Up to `limit` events after `position`, in global order: one batch of ``readAll(after:batchSize:)``, for
    /// readers that fetch the next batch while they work on the last one.
    public func readBatch(after position: Int64, limit: Int) async throws -> [RecordedEvent] {
        try await query(
            "WHERE position > $1 ORDER BY position LIMIT $2", [.int64(position), .int(limit)], statement: "read all")
    }

    private func query(_ filter: String, _ binds: [PQBind], statement: String) async throws -> [RecordedEvent] {
        try await pool.withConnection { connection in
            try await connection.query("SELECT \(EventTables.eventColumns) FROM events " + filter, binds, statement: statement)
                .map(RecordedEvent.init(row:))
        }
    }
}

extension RecordedEvent {
    /// Reads a row of `events` with the columns of `EventTables.eventColumns`.
    /// - Throws: `EventDecodingError` naming the event when its metadata is not an `EventMetadata` object.
    public init(row: PQRow) throws {
        try self.init(
            position: try row.decode(Int64.self, "position"), eventID: try row.decode(UUID.self, "event_id"),
            streamID: try row.decode(String.self, "stream_id"), streamVersion: try row.decode(Int64.self, "stream_version"),
            eventType: try row.decode(String.self, "event_type"), schemaVersion: try row.decode(Int.self, "schema_version"),
            payload: try row.decode(String.self, "payload"), metadataJSON: try row.decode(String.self, "metadata"),
            occurredAt: try row.decode(Date.self, "occurred_at"))
    }
}

extension PQBind {
    /// The libpq form of a driver-independent statement value.
    init(_ value: SQLValue) {
        switch value {
        case .text(let text): self = .text(text)
        case .int64(let number): self = .int64(number)
        case .uuid(let uuid): self = .uuid(uuid)
        case .jsonb(let json): self = .jsonb(json)
        case .timestamp(let date): self = .timestamp(date)
        }
    }
}

/// A statement to run in an append's transaction (see ``EventStore/append(_:to:category:expectedVersion:alsoWriting:)``).
public struct TransactionalWrite: Sendable {
    public var sql: String
    public var binds: [PQBind]
    /// Names the statement in errors and logs.
    public var statement: String

    public init(_ sql: String, _ binds: [PQBind] = [], statement: String) {
        self.sql = sql
        self.binds = binds
        self.statement = statement
    }
}

/// Every event in global order, read in batches (see ``EventStore/readAll(after:batchSize:)``).
public struct AllEventsSequence: AsyncSequence, Sendable {
    public typealias Element = RecordedEvent
    let store: EventStore
    let start: Int64
    let batchSize: Int

    public struct AsyncIterator: AsyncIteratorProtocol {
        let store: EventStore
        let batchSize: Int
        var position: Int64
        var buffer: [RecordedEvent] = []
        var index = 0
        var finished = false

        public mutating func next() async throws -> RecordedEvent? {
            if index == buffer.count {
                guard !finished else { return nil }
                buffer = try await store.readBatch(after: position, limit: batchSize)
                index = 0
                if buffer.count < batchSize { finished = true }
                guard !buffer.isEmpty else { return nil }
            }
            let event = buffer[index]
            index += 1
            position = event.position
            return event
        }
    }

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(store: store, batchSize: batchSize, position: start)
    }
}
