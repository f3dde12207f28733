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
/// transactions wait), then replays into the fresh tables every event the store holds after the last
/// replayed position **and** every event the live `_applied` table has that the fresh one lacks (an event
/// committed out of position order and already consumed). After the swap the fresh `_applied` table holds
/// exactly the events whose effects the fresh tables contain; the consumer skips those and applies any
/// other event when Kafka delivers it. So nothing is counted twice and nothing is lost, whatever the
/// Kafka offsets are.
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
        var batch: [RecordedEvent] = []
        func flush() async throws {
            let events = batch
            guard !events.isEmpty else { return }
            try await pool.withTransaction { connection in
                for event in events { _ = try await applier.apply(event, suffix: suffix, on: connection) }
            }
            done += events.count
            last = events.last!.position
            batch.removeAll(keepingCapacity: true)
            let seconds = Double((ContinuousClock.now - started).components.seconds)
                + Double((ContinuousClock.now - started).components.attoseconds) / 1e18
            progress(RebuildProgress(projection: projection.name, done: done, total: max(total, done), eventsPerSecond: Double(done) / max(seconds, 0.001)))
        }
        for try await event in store.readAll(after: 0, batchSize: batchSize) {
            batch.append(event)
            if batch.count >= batchSize { try await flush() }
        }
        try await flush()

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
            var missingFilter = ""
            if live {
                // The consumer's apply transactions touch the `_applied` table first, then the others: lock in
                // the same order so the two never wait on each other in a cycle.
                let names = ([projection.appliedTable] + projection.tables).map { SQLIdentifier.quoted($0.name) }.joined(separator: ", ")
                try await connection.executeScript("LOCK TABLE \(names) IN ACCESS EXCLUSIVE MODE", statement: "rebuild: lock live tables")
                missingFilter = " OR event_id IN (SELECT event_id FROM \(SQLIdentifier.quoted(projection.appliedTable.name)) "
                    + "EXCEPT SELECT event_id FROM \(SQLIdentifier.quoted(projection.appliedTable.name + suffix)))"
            }
            let tail = try await connection.query(
                "SELECT position, event_id, stream_id, stream_version, event_type, schema_version, payload, metadata, occurred_at "
                    + "FROM events WHERE position > $1\(missingFilter) ORDER BY position",
                [.int64(last)], statement: "rebuild: catch up"
            ).map(RecordedEvent.init(row:))
            for event in tail { _ = try await applier.apply(event, suffix: suffix, on: connection) }
            for table in projection.allTables {
                if live { try await connection.executeScript("DROP TABLE \(SQLIdentifier.quoted(table.name))") }
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
