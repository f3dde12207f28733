import EventSourcing
import EventStoreSQL
import Foundation
import Logging
import PostgresNIO

/// Event streams with a transactional outbox, on a connection of postgres-nio.
///
/// For services that already talk to PostgreSQL through postgres-nio (Hummingbird, Vapor): they append an
/// aggregate's events and their outbox rows **inside their own transaction**, next to their own writes, so that
/// all of it commits or none. The statement is the one the libpq `EventStore` runs (`AppendStatement`), with the
/// same version check, so it writes the same `events` and `outbox` rows: `outbox-relay` and the projections work
/// unchanged, and both kinds of writer can share one database.
///
/// ```swift
/// try await connection.withTransaction(logger: logger) { tx in
///     try await tx.query("INSERT INTO receipts (reference) VALUES (\(reference))", logger: logger)
///     try await store.append(events, to: accountID, category: "account", expectedVersion: .exact(version),
///                            on: tx, logger: logger)
/// }
/// ```
///
/// The tables come from `eventoutbox migrate` (the event store's and the relay's schema modules).
public struct PostgresNIOEventStore: Sendable {
    /// Which topic each event's outbox message goes to.
    public var routing: OutboxRouting
    /// Whether appends send `NOTIFY` so that a table-source relay wakes at once (see `EventStore.notifiesOnAppend`).
    public var notifiesOnAppend: Bool

    public init(routing: OutboxRouting = OutboxRouting(), notifiesOnAppend: Bool = true) {
        self.routing = routing
        self.notifiesOnAppend = notifiesOnAppend
    }

    /// Appends events to a stream if its version is as expected, on `connection` (in its transaction, if one is open).
    ///
    /// A version that does not match is found without an error from the server, so the caller's transaction stays
    /// usable: it may roll back, or reload and decide again. With `.any` the append reads the current version and
    /// tries again by itself (up to `ExpectedVersion.anyVersionAttempts` times) while other writers move the stream on.
    /// - Throws: `ConcurrencyConflict` when the stream's version is not `expectedVersion` (nothing appended). If a
    ///   concurrent writer committed the same versions between the check and the insert, the server's unique
    ///   violation aborts the caller's transaction: that conflict is reported as a `ConcurrencyConflict` too, with
    ///   the least version the stream then has. `PSQLError` for other database failures.
    @discardableResult
    public func append(
        _ events: [NewEvent], to streamID: String, category: String, expectedVersion: ExpectedVersion,
        on connection: PostgresConnection, logger: Logger
    ) async throws -> AppendResult {
        precondition(!events.isEmpty, "append needs at least one event")
        return try await withAppendSpan(events, streamID: streamID) { traced in
            var attempt = 0
            while true {
                attempt += 1
                let base = try await expectedVersion.base { try await currentVersion(of: streamID, on: connection, logger: logger) }
                let statement = try AppendStatement(
                    traced, to: streamID, category: category, after: base, routing: routing, notify: notifiesOnAppend)
                switch try await run(statement, streamID, expectedVersion, on: connection, logger: logger) {
                case .appended(let result): return result
                case .versionMismatch(let actual):
                    if expectedVersion.retriesMismatch(attempt: attempt) { continue }
                    throw ConcurrencyConflict(streamID: streamID, expected: expectedVersion, actual: actual)
                }
            }
        }
    }

    /// The version of a stream's last event (0 if the stream does not exist).
    public func currentVersion(of streamID: String, on connection: PostgresConnection, logger: Logger) async throws -> Int64 {
        let rows = try await connection.query(Self.query(EventTables.currentVersionSQL, [.text(streamID)]), logger: logger)
        for try await version in rows.decode(Int64.self) { return version }
        throw PostgresNIOEventStoreError(statement: "current version", reason: "returned no row where one was expected")
    }

    /// A stream's events in version order, from `version` through `throughVersion` (inclusive, default: the end).
    /// - Throws: `EventDecodingError` naming an event whose metadata is not an `EventMetadata` object.
    public func readStream(
        _ streamID: String, from version: Int64 = 1, through throughVersion: Int64 = .max,
        on connection: PostgresConnection, logger: Logger
    ) async throws -> [RecordedEvent] {
        let rows = try await connection.query(
            Self.query(EventTables.readStreamSQL, [.text(streamID), .int64(version), .int64(throughVersion)]), logger: logger)
        var events: [RecordedEvent] = []
        for try await (position, eventID, stream, streamVersion, eventType, schemaVersion, payload, metadata, occurredAt)
            in rows.decode((Int64, UUID, String, Int64, String, Int, String, String, Date).self)
        {
            events.append(
                try RecordedEvent(
                    position: position, eventID: eventID, streamID: stream, streamVersion: streamVersion, eventType: eventType,
                    schemaVersion: schemaVersion, payload: payload, metadataJSON: metadata, occurredAt: occurredAt))
        }
        return events
    }

    private func run(
        _ statement: AppendStatement, _ streamID: String, _ expectedVersion: ExpectedVersion,
        on connection: PostgresConnection, logger: Logger
    ) async throws -> AppendOutcome {
        var current: Int64?
        var positions: [Int64] = []
        do {
            let rows = try await connection.query(Self.query(statement.sql, statement.values), logger: logger)
            for try await (version, _, _, position) in rows.decode((Int64, Int64, Int64, Int64?).self) {
                current = version
                if let position { positions.append(position) }
            }
        } catch let error as PSQLError where error.serverInfo?[.constraintName] == EventTables.streamVersionConstraint {
            // Another append won the race for these versions. The transaction is aborted, so neither a retry nor a
            // read of the version can follow here: the caller's transaction must roll back and decide again.
            throw ConcurrencyConflict(streamID: streamID, expected: expectedVersion, actual: statement.base + 1)
        }
        guard let current else {
            // The statement always returns a row (`current` is left-joined): without one, the server changed it.
            throw PostgresNIOEventStoreError(statement: "append", reason: "returned no row where one was expected")
        }
        return statement.outcome(current: current, positions: positions)
    }

    static func query(_ sql: String, _ values: [SQLValue]) -> PostgresQuery {
        var bindings = PostgresBindings(capacity: values.count)
        for value in values {
            switch value {
            case .text(let text), .jsonb(let text): bindings.append(text)
            case .int64(let number): bindings.append(number)
            case .uuid(let uuid): bindings.append(uuid)
            case .timestamp(let date): bindings.append(date)
            }
        }
        return PostgresQuery(unsafeSQL: sql, binds: bindings)
    }
}

/// A statement of ``PostgresNIOEventStore`` answered in a way it cannot use.
public struct PostgresNIOEventStoreError: Error, CustomStringConvertible, Sendable {
    /// The statement's name (`append`, `current version`).
    public var statement: String
    public var reason: String

    public var description: String {
        "statement '\(statement)' \(reason): the events table is not the one `eventoutbox migrate` makes; run it on this database"
    }
}
