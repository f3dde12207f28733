import Coordination
import EventStore
import KafkaClient
import Logging
import Metrics
import OutboxRelayStore
import LibPQ
import Synchronization

/// `--source table` for the at-least-once engine: the waiting rows of the outbox (all of them, or those of the
/// partitions this relay holds), fetched above a cursor and admitted by ``PublishPipeline``'s order rules;
/// delivered rows are marked (or deleted) by a ``PublishedRowMarker`` on a connection of its own.
struct TablePipelinedSource: PipelinedSource {
    let relay: OutboxRelay
    /// Holds the relay's lock (or its partitions' membership) and runs the fetches.
    let connection: PQConnection
    private let marker: PublishedRowMarker
    private let table = OutboxTable()
    private var ownership: PartitionOwnership?
    private var pipeline = PublishPipeline()
    private var housekeeping: HousekeepingClock
    private var lastBalance: ContinuousClock.Instant?
    /// A share to give back once nothing is in flight: fetching pauses until then.
    private var releasePending = false
    private var lastFullScan = ContinuousClock.now
    /// The last fetch above the cursor found every waiting row (fewer than it asked for), at `lastFetch`.
    private var drained = false
    private var lastFetch = ContinuousClock.now

    init(relay: OutboxRelay, connection: PQConnection, marker: PublishedRowMarker, ownership: PartitionOwnership?) {
        self.relay = relay
        self.connection = connection
        self.marker = marker
        self.ownership = ownership
        self.housekeeping = HousekeepingClock(interval: relay.configuration.housekeepingInterval)
    }

    private var configuration: OutboxRelayConfiguration { relay.configuration }

    mutating func startGeneration() async throws -> Bool {
        pipeline = PublishPipeline(tracksGaps: ownership == nil)
        drained = false
        return !relay.stopRequest.isRequested
    }

    mutating func nextRows(room: Int, idle: Bool) async throws -> (rows: [OutboxRow], waitAfter: Bool) {
        if housekeeping.isDue {
            try await relay.housekeeping(connection)
            housekeeping.ran()
        }
        // Partitioned relays: take free partitions at any time, give back a surplus only with nothing in
        // flight (fetching pauses for that below).
        if var partitioned = ownership,
            (releasePending && pipeline.isIdle)
                || lastBalance.map({ ContinuousClock.now - $0 >= configuration.standbyRetryInterval }) ?? true
        {
            if pipeline.isIdle { try await marker.flush() }
            let change = try await partitioned.rebalance(mayRelease: pipeline.isIdle, on: connection)
            if change.changed {
                relay.logger.info("publishing outbox partitions", metadata: [
                    "outbox.partitions": "\(partitioned.owned)", "outbox.partition_count": "\(partitioned.count)"])
                // New partitions' waiting rows may lie behind the cursor.
                if pipeline.isIdle { pipeline.rescan() } else { pipeline.requestRescan() }
                drained = false
            }
            releasePending = change.mustRelease
            ownership = partitioned
            lastBalance = .now
            relay.setActive(!partitioned.owned.isEmpty)
            relay.metrics.partitionsOwned.record(partitioned.owned.count)
        }
        // Rows of late commits lie behind the cursor. With nothing in flight, start again from the first
        // waiting row (free then). Under load, after a hole or once per poll interval, fetch the waiting
        // rows behind the cursor that are not in flight, without stopping the pipeline.
        if pipeline.isIdle && pipeline.cursor > 0 {
            try await marker.flush()
            if pipeline.needsRescan { drained = false }  // rows were held back behind their stream's: fetch them now
            pipeline.rescan()
            lastFullScan = .now
        }
        let partitions = ownership?.partitions ?? .all
        if partitions.owned.isEmpty {
            // A partitioned relay with no share yet (or none free): a standby until the next rebalance.
            await relay.wakeup.wait(timeout: configuration.standbyRetryInterval)
            return ([], false)
        }
        if releasePending && !pipeline.isIdle { return ([], true) }
        let limit = min(configuration.batchSize, room)
        if !pipeline.isIdle && (pipeline.needsRescan || ContinuousClock.now - lastFullScan >= configuration.pollInterval) {
            // Delivered rows not yet marked would come back as waiting: write them first.
            try await marker.flush()
            pipeline.beginCatchUp()
            lastFullScan = .now
            let (cursor, inFlight) = (pipeline.cursor, Array(pipeline.inFlight.keys))
            guard let rows = try await fetch({ [table, connection] in
                try await table.waitingRows(through: cursor, excluding: inFlight, limit: limit, partitions: partitions, on: connection)
            }) else { return ([], false) }
            let holes = try await table.streamsWithWaitingRows(in: pipeline.rangesToCheck(rows), on: connection)
            if rows.count == limit { pipeline.requestRescan() }
            return (pipeline.admit(rows, holes: holes), false)
        }
        // Once everything waiting was fetched, new rows announce themselves (NOTIFY) or are found by the poll:
        // a wake-up for delivery reports alone fetches nothing (at 1,000 commits/s, a third fewer fetches).
        let noticed = relay.takeAppendNotice()
        if drained && !noticed && ContinuousClock.now - lastFetch < configuration.pollInterval { return ([], true) }
        let cursor = pipeline.cursor
        let gaps = pipeline.gapsToRecheck()
        lastFetch = .now
        guard let rows = try await fetch({ [table, connection] in
            try await table.waitingRows(after: cursor, alsoIDs: gaps, limit: limit, partitions: partitions, on: connection)
        }) else { return ([], false) }
        pipeline.noteFetched(rows, after: cursor)
        let holes = try await table.streamsWithWaitingRows(in: pipeline.rangesToCheck(rows), on: connection)
        drained = rows.count < limit
        return (pipeline.admit(rows, holes: holes), drained)
    }

    /// Runs a fetch of waiting rows. An unreadable row must not stall the outbox: it goes to dead letters (its
    /// stream waits behind it) and `nil` is returned, so that the caller fetches again without it.
    private func fetch(_ body: @Sendable () async throws -> [OutboxRow]) async throws -> [OutboxRow]? {
        do {
            return try await body()
        } catch let error as OutboxRowError {
            try await relay.deadLetterUnreadable(error.outboxID, "\(error)", on: connection)
            return nil
        }
    }

    func mayEnqueue(_ row: OutboxRow) async throws -> Bool { pipeline.mayEnqueue(row) }

    mutating func sent(_ row: OutboxRow) { pipeline.sent(row) }

    mutating func refused(_ row: OutboxRow, _ error: KafkaError) {
        pipeline.refused(row)
        if !error.isPermanentForRecord { pipeline.abandon(error) }
    }

    mutating func record(_ row: OutboxRow, _ report: KafkaDeliveryReport, failing: Bool) -> ReportVerdict {
        let violationsBefore = pipeline.orderViolations
        defer {
            if pipeline.orderViolations > violationsBefore {
                relay.metrics.orderViolations.increment(by: pipeline.orderViolations - violationsBefore)
                relay.logger.error(
                    "Kafka stored a row after an earlier row of its stream failed on the same producer; consumers may see that stream out of order",
                    metadata: ["outbox.order_violations": "\(pipeline.orderViolations)", "outbox.id": "\(row.id)"])
            }
        }
        switch pipeline.record(report) {
        case .delivered(let delivery): return .delivered(delivery)
        // The pipeline admits nothing more after a failure: this producer ends.
        case .deadLetter(let row, let error): return .deadLetter(row, error, restart: true)
        case .retry, .unknown:
            return .retry(report.error ?? KafkaError(code: .invalidArgument, message: "the pipeline had no outbox row \(row.id)"))
        }
    }

    func deadLetter(_ row: OutboxRow, error: KafkaError) async throws {
        try await table.moveToDeadLetters(row.id, error: "\(error)", on: connection)
    }

    func settled(_ deliveries: [OutboxTable.Delivery], idle: Bool) async throws {
        marker.add(deliveries)
        try marker.startIfIdle()
    }

    func finish() async throws { try await marker.flush() }
}

/// Writes delivered rows to the outbox (marked, or deleted) on a connection of its own, one statement at a
/// time covering every delivery that arrived meanwhile, while the publish loop goes on fetching.
///
/// Used by one publish loop only (not concurrently): `add`, `startIfIdle` and `flush` are called from that one
/// task; the statement runs in a child task that signals the loop's wakeup when done.
final class PublishedRowMarker: @unchecked Sendable {
    private let connection: PQConnection
    private let deletes: Bool
    private let wakeup: Wakeup
    private let table = OutboxTable()
    private var pending: [OutboxTable.Delivery] = []
    private var running: Task<Void, Never>?
    private let runningDone = Atomic<Bool>(true)
    /// The error of the last statement that failed, as it was thrown.
    private let failure = Mutex<(any Error)?>(nil)

    init(connection: PQConnection, deletes: Bool, wakeup: Wakeup) {
        self.connection = connection
        self.deletes = deletes
        self.wakeup = wakeup
    }

    func add(_ deliveries: [OutboxTable.Delivery]) { pending += deliveries }

    /// Starts writing what is pending unless a statement is still running. Rethrows a finished statement's error.
    func startIfIdle() throws {
        guard runningDone.load(ordering: .acquiring) else { return }
        running = nil
        if let error = failure.withLock({ $0 }) { throw error }
        guard !pending.isEmpty else { return }
        let batch = pending
        pending = []
        runningDone.store(false, ordering: .releasing)
        running = Task { [self] in
            defer {
                runningDone.store(true, ordering: .releasing)
                wakeup.signal()
            }
            do {
                if deletes {
                    try await table.deletePublished(batch, on: connection)
                } else {
                    try await table.markPublished(batch, on: connection)
                }
            } catch {
                failure.withLock { $0 = error }
            }
        }
    }

    /// Waits until every delivery added so far is written.
    func flush() async throws {
        while true {
            await running?.value
            try startIfIdle()
            if running == nil { return }
        }
    }

    /// Ends the marker's connection (after ``flush()``).
    func close() async { await connection.close() }
}
