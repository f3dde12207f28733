import BlockingIO
import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import Logging
import LibPQ

/// How far a rebuild has come.
public struct RebuildProgress: Sendable {
    public var projection: String
    public var done: Int
    public var total: Int
    public var eventsPerSecond: Double
}

/// Rebuilds a projection from the event store: replays every event in global order through the same
/// handler into fresh tables, then swaps them in atomically.
///
/// Reconciling with the live consumer: the swap transaction locks the live tables (the consumer's apply
/// transactions wait), then replays into the fresh tables every event the store holds after the last replayed
/// position **and**, for each stream the live consumer has taken further than the replay (an event committed out
/// of position order and already consumed), the stream's events up to the live version. After the swap the fresh
/// `_progress` table says, per stream, up to which version the fresh tables hold every event's effect; the
/// consumer skips those and applies any later event when Kafka delivers it. So nothing is counted twice and
/// nothing is lost, whatever the Kafka offsets are.
///
/// An event the projection cannot take (it does not decode, or the handler refuses it for good) does not stop
/// the rebuild: it goes to `projection_dead_letters` (consumer `rebuild`, partition -1, offset = its position in
/// the store), exactly as the live consumer would set it aside, and the replay goes on. The swap removes the
/// projection's older dead letters: the rebuild has met every stored event again.
public struct ProjectionRebuilder: Sendable {
    public let pool: PQPool
    public let registry: EventRegistry
    public var batchSize: Int
    public var logger: Logger

    public init(pool: PQPool, registry: EventRegistry, batchSize: Int = 1000, logger: Logger = Logger(label: "eventoutbox.rebuild")) {
        self.pool = pool
        self.registry = registry
        self.batchSize = batchSize
        self.logger = logger
    }

    /// The `consumer` of the dead letters a rebuild or back-fill writes.
    public static let deadLetterConsumer = "rebuild"

    /// Rebuilds `projection`; calls `progress` after every batch. Returns the number of events replayed
    /// (dead-lettered ones included).
    @discardableResult
    public func rebuild(
        _ projection: Projection, progress: @escaping @Sendable (RebuildProgress) -> Void = { _ in }
    ) async throws -> Int {
        let suffix = "_rebuild"
        let store = EventStore(pool: pool)
        // One rebuild of a projection at a time, across processes.
        let lockConnection = try await PQConnection.connect(to: pool.configuration.url)
        try await lockConnection.query(
            "SELECT pg_advisory_lock($1, hashtext(current_schema() || '.' || $2))",
            [.int32(AdvisoryLockClass.rebuild.rawValue), .text(projection.name)],
            statement: "rebuild: lock")
        try await SchemaMigrator([ProjectionSchema.module]).migrate(pool)
        let olderDeadLetters = try await pool.withConnection { connection in
            try await ProjectionSchema.create(projection, suffix: suffix, on: connection)
            return try await connection.queryOne(
                "SELECT coalesce(max(id), 0) AS last FROM projection_dead_letters", statement: "rebuild: dead letters so far"
            ).decode(Int64.self, "last")
        }

        let total = try await pool.withConnection {
            try await $0.queryOne("SELECT count(*) AS n FROM events", statement: "rebuild: count").decode(Int.self, "n")
        }
        let started = ContinuousClock.now
        var done = 0
        var last: Int64 = 0
        // The next batch is read while the current one is written: the two overlap on the server.
        let batchSize = self.batchSize
        @Sendable func read(after position: Int64) async throws -> [RecordedEvent] {
            try await store.readBatch(after: position, limit: batchSize)
        }
        var next: Task<[RecordedEvent], any Error>? = Task { try await read(after: 0) }
        while let reading = next {
            let events = try await reading.value
            guard let end = events.last?.position else { break }
            next = events.count < batchSize ? nil : Task { try await read(after: end) }
            do {
                try await pool.withTransaction { connection in
                    try await self.apply(events, to: projection, suffix: suffix, on: connection)
                }
            } catch {
                next?.cancel()
                throw error
            }
            done += events.count
            last = end
            let seconds = (ContinuousClock.now - started).inSeconds
            progress(RebuildProgress(projection: projection.name, done: done, total: max(total, done), eventsPerSecond: Double(done) / max(seconds, 0.001)))
        }

        let caughtUp = try await swapIn(projection, after: last, olderDeadLetters: olderDeadLetters, suffix: suffix)
        try await lockConnection.query(
            "SELECT pg_advisory_unlock($1, hashtext(current_schema() || '.' || $2))",
            [.int32(AdvisoryLockClass.rebuild.rawValue), .text(projection.name)], statement: "rebuild: unlock")
        logger.info(
            "projection rebuilt and swapped in",
            metadata: ["projection": "\(projection.name)", "events": "\(done + caughtUp)", "caught.up": "\(caughtUp)"])
        return done + caughtUp
    }

    /// Catches up and swaps the fresh tables in, in one transaction; retried if PostgreSQL picks it as a
    /// deadlock victim.
    private func swapIn(_ projection: Projection, after last: Int64, olderDeadLetters: Int64, suffix: String) async throws -> Int {
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await swapInOnce(projection, after: last, olderDeadLetters: olderDeadLetters, suffix: suffix)
            } catch let error as PQError where error.isRetriable && attempt < 5 {
                logger.warning("swap failed, retrying", metadata: ["projection": "\(projection.name)", "error": "\(error)"])
            }
        }
    }

    private func swapInOnce(_ projection: Projection, after last: Int64, olderDeadLetters: Int64, suffix: String) async throws -> Int {
        try await pool.withTransaction { connection -> Int in
            let live = try await ProjectionSchema.exists(projection, on: connection)
            let columns = EventTables.eventColumns(of: "e")
            var behindLive = ""
            if live {
                // The consumer's apply transactions touch the `_progress` table first, then the others: lock in
                // the same order so the two never wait on each other in a cycle.
                let names = ([projection.progressTable] + projection.tables).map { SQLIdentifier.quoted($0.name) }.joined(separator: ", ")
                try await connection.executeScript("LOCK TABLE \(names) IN ACCESS EXCLUSIVE MODE", statement: "rebuild: lock live tables")
                let liveProgress = SQLIdentifier.quoted(projection.progressTable.name)
                let freshProgress = SQLIdentifier.quoted(projection.progressTable.name + suffix)
                behindLive = " UNION ALL SELECT \(columns) FROM events e JOIN ("
                    + "SELECT l.stream_id, coalesce(f.last_version, 0) AS fresh, l.version AS live "
                    + "FROM (SELECT stream_id, max(last_version) AS version FROM \(liveProgress) GROUP BY stream_id) l "
                    + "LEFT JOIN \(freshProgress) f ON f.stream_id = l.stream_id AND f.source = '' "
                    + "WHERE l.version > coalesce(f.last_version, 0)) b ON e.stream_id = b.stream_id "
                    + "AND e.stream_version > b.fresh AND e.stream_version <= b.live AND e.position <= $1"
            }
            let tail = try await connection.query(
                "SELECT \(columns) FROM events e WHERE e.position > $1\(behindLive) ORDER BY 1",
                [.int64(last)], statement: "rebuild: catch up"
            ).map(RecordedEvent.init(row:))
            try await apply(tail, to: projection, suffix: suffix, on: connection)
            // Every stored event met the projection again: what it refused before is refused again above, or taken.
            try await connection.execute(
                "DELETE FROM projection_dead_letters WHERE projection = $1 AND id <= $2",
                [.text(projection.name), .int64(olderDeadLetters)], statement: "rebuild: drop older dead letters")
            try await connection.executeScript("DROP TABLE IF EXISTS \(SQLIdentifier.quoted(projection.legacyAppliedTable))")
            for table in projection.allTables {
                try await connection.executeScript("DROP TABLE IF EXISTS \(SQLIdentifier.quoted(table.name))")
                try await connection.executeScript(
                    "ALTER TABLE \(SQLIdentifier.quoted(table.name + suffix)) RENAME TO \(SQLIdentifier.quoted(table.name))")
                // Index names are per schema: give the fresh table's indexes the live names back.
                let indexes = try await connection.query(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1",
                    [.text(table.name)]
                ).map { try $0.decode(String.self, "indexname") }
                for index in indexes where index.contains(suffix) {
                    try await connection.executeScript(
                        "ALTER INDEX \(SQLIdentifier.quoted(index)) RENAME TO "
                            + SQLIdentifier.quoted(index.split(separator: suffix, omittingEmptySubsequences: false).joined()))
                }
            }
            return tail.count
        }
    }

    /// Applies `events` to the fresh tables inside the caller's transaction. An event that does not decode, or
    /// that the handler refuses for good, is dead-lettered and the rest applied (each try behind a savepoint);
    /// transient database failures are thrown.
    private func apply(_ events: [RecordedEvent], to projection: Projection, suffix: String, on connection: PQConnection) async throws {
        guard !events.isEmpty else { return }
        let applier = ProjectionApplier(projections: [projection], registry: registry)
        var decoded: [ProjectedEvent] = []
        decoded.reserveCapacity(events.count)
        for event in events {
            do {
                decoded.append(ProjectedEvent(event: try registry.decode(event), recorded: event, topic: nil))
            } catch {
                try await deadLetter(event, projection: projection, reason: "\(error)", on: connection)
            }
        }
        if try await attempt(on: connection, { try await applier.apply(decoded, suffix: suffix, on: connection) }) == nil { return }
        for event in decoded {
            if let error = try await attempt(on: connection, { try await applier.apply([event], suffix: suffix, on: connection) }) {
                try await deadLetter(event.recorded, projection: projection, reason: "handler failed: \(error)", on: connection)
            }
        }
    }

    /// Runs `body` behind a savepoint: `nil` if it succeeded; its error, rolled back to the savepoint, if the
    /// error is not transient. Transient errors are thrown.
    private func attempt(on connection: PQConnection, _ body: () async throws -> ProjectionApplier.Outcome) async throws -> (any Error)? {
        try await connection.executeScript("SAVEPOINT eventoutbox_rebuild", statement: "rebuild: savepoint")
        do {
            _ = try await body()
            try await connection.executeScript("RELEASE SAVEPOINT eventoutbox_rebuild", statement: "rebuild: release savepoint")
            return nil
        } catch where !ProjectionConsumer.isTransient(error) {
            try await connection.executeScript("ROLLBACK TO SAVEPOINT eventoutbox_rebuild", statement: "rebuild: roll back to savepoint")
            return error
        }
    }

    private func deadLetter(_ event: RecordedEvent, projection: Projection, reason: String, on connection: PQConnection) async throws {
        let value = (try? OutboxEnvelope(event).encoded()) ?? Array(event.payload.utf8)
        try await ProjectionDeadLetters.record(
            consumer: Self.deadLetterConsumer, projection: projection.name, topic: "", partition: -1, offset: event.position,
            key: Array(event.streamID.utf8), value: value, reason: reason, on: connection)
        logger.error(
            "event set aside in projection_dead_letters; the rebuild goes on",
            metadata: ["projection": "\(projection.name)", "event.position": "\(event.position)", "event.id": "\(event.eventID)", "reason": "\(reason)"])
    }
}
