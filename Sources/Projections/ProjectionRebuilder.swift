import EventSourcing
import EventStore
import Foundation
import Logging
import PostgresClient

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
public struct ProjectionRebuilder: Sendable {
    public let pool: PostgresPool
    public let registry: EventRegistry
    public var batchSize: Int
    public var logger: Logger

    public init(pool: PostgresPool, registry: EventRegistry, batchSize: Int = 1000, logger: Logger = Logger(label: "eventoutbox.rebuild")) {
        self.pool = pool
        self.registry = registry
        self.batchSize = batchSize
        self.logger = logger
    }

    /// Rebuilds `projection`; calls `progress` after every batch. Returns the number of events replayed.
    @discardableResult
    public func rebuild(
        _ projection: Projection, progress: @escaping @Sendable (RebuildProgress) -> Void = { _ in }
    ) async throws -> Int {
        let applier = ProjectionApplier(projections: [projection], registry: registry)
        let suffix = "_rebuild"
        let store = EventStore(pool: pool)
        // One rebuild of a projection at a time, across processes.
        let lockConnection = try await PostgresConnection.connect(to: pool.configuration.url)
        try await lockConnection.query(
            "SELECT pg_advisory_lock(hashtext($1))", [.text("eventoutbox.rebuild." + projection.name)],
            statement: "rebuild: lock")
        try await pool.withConnection { try await ProjectionSchema.create(projection, suffix: suffix, on: $0) }

        let total = try await pool.withConnection {
            try await $0.query("SELECT count(*) AS n FROM events", statement: "rebuild: count").first!.decode(Int.self, "n")
        }
        let started = ContinuousClock.now
        var done = 0
        var last: Int64 = 0
        // The next batch is read and decoded while the current one is written: the two overlap on the server.
        let registry = self.registry
        let batchSize = self.batchSize
        @Sendable func read(after position: Int64) async throws -> [ProjectedEvent] {
            try await store.readBatch(after: position, limit: batchSize).map {
                ProjectedEvent(event: try registry.decode($0), recorded: $0, topic: nil)
            }
        }
        var next: Task<[ProjectedEvent], any Error>? = Task { try await read(after: 0) }
        while let reading = next {
            let events = try await reading.value
            guard let end = events.last?.recorded.position else { break }
            next = events.count < batchSize ? nil : Task { try await read(after: end) }
            do {
                try await pool.withTransaction { connection in
                    _ = try await applier.apply(events, suffix: suffix, on: connection)
                }
            } catch {
                next?.cancel()
                throw error
            }
            done += events.count
            last = end
            let seconds = Double((ContinuousClock.now - started).components.seconds)
                + Double((ContinuousClock.now - started).components.attoseconds) / 1e18
            progress(RebuildProgress(projection: projection.name, done: done, total: max(total, done), eventsPerSecond: Double(done) / max(seconds, 0.001)))
        }

        let caughtUp = try await swapIn(projection, after: last, applier: applier, suffix: suffix)
        try await lockConnection.query("SELECT pg_advisory_unlock(hashtext($1))", [.text("eventoutbox.rebuild." + projection.name)])
        logger.info(
            "projection rebuilt and swapped in",
            metadata: ["projection": "\(projection.name)", "events": "\(done + caughtUp)", "caught.up": "\(caughtUp)"])
        return done + caughtUp
    }

    /// Catches up and swaps the fresh tables in, in one transaction; retried if PostgreSQL picks it as a
    /// deadlock victim.
    private func swapIn(_ projection: Projection, after last: Int64, applier: ProjectionApplier, suffix: String) async throws -> Int {
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await swapInOnce(projection, after: last, applier: applier, suffix: suffix)
            } catch let error as PostgresError where error.isRetriable && attempt < 5 {
                logger.warning("swap failed, retrying", metadata: ["projection": "\(projection.name)", "error": "\(error)"])
            }
        }
    }

    private func swapInOnce(_ projection: Projection, after last: Int64, applier: ProjectionApplier, suffix: String) async throws -> Int {
        try await pool.withTransaction { connection -> Int in
            let live = try await ProjectionSchema.exists(projection, on: connection)
            let columns = "e.position, e.event_id, e.stream_id, e.stream_version, e.event_type, e.schema_version, e.payload, e.metadata, e.occurred_at"
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
            if !tail.isEmpty {
                let projected = try tail.map { ProjectedEvent(event: try registry.decode($0), recorded: $0, topic: nil) }
                _ = try await applier.apply(projected, suffix: suffix, on: connection)
            }
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
}
