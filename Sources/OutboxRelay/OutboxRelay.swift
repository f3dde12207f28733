import EventStore
import Foundation
import KafkaClient
import Logging
import Metrics
import PostgresClient
import ServiceLifecycle
import Synchronization

/// Publishes committed outbox rows to Kafka, in order per stream, losing nothing.
///
/// - Only one relay per database is active: it holds a PostgreSQL advisory lock on its connection; others
///   wait as standbys and take over within ``OutboxRelayConfiguration/standbyRetryInterval`` once the active
///   one's connection is gone (crash, kill, network).
/// - Pipelined: rows are fetched in batches and handed to librdkafka without waiting for earlier batches;
///   up to ``OutboxRelayConfiguration/maxInFlight`` rows are unacknowledged at a time. Delivery reports are
///   marked in the database in one statement per group of reports, between fetches.
/// - A row is marked published only after its delivery report says Kafka stored it. A crash between the two
///   publishes the row again (at-least-once); consumers dedupe by event id.
/// - Per-stream order: the message key is the stream id; see `PublishPipeline` for the rules and the Design
///   notes article (EventStore.docc) for the argument. On any failed delivery or fatal producer error the relay purges the
///   producer, marks what was stored, and resumes with a new producer from the rows still waiting.
/// - A row Kafka can never accept (too large, invalid) moves to `outbox_dead_letters`; its stream waits
///   until it is retried (`eventoutbox dead-letters retry`); other streams go on.
public final class OutboxRelay: Service, Sendable {
    public let configuration: OutboxRelayConfiguration
    let logger: Logger
    let table = OutboxTable()
    private let stopping = Atomic<Bool>(false)
    let wakeup = Wakeup()
    let counters = RelayCounters()
    /// The last producer failure not yet followed by a success (a delivery, or a transactional init).
    private let producerFailure = Mutex<String?>(nil)
    let metrics = RelayMetrics()
    let latestStatus = Mutex<OutboxStatus?>(nil)
    /// The wakeups of exactly-once partition engines, by partition (each engine waits on its own).
    let partitionWakeups = Mutex<[Int: Wakeup]>([:])

    public init(configuration: OutboxRelayConfiguration, logger: Logger = Logger(label: "eventoutbox.relay")) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Rows this relay has seen delivered since it started.
    public var publishedCount: Int { counters.published.load(ordering: .relaxed) }
    /// Deliveries that failed since it started (purges the relay made itself not counted).
    public var failedDeliveryCount: Int { counters.failed.load(ordering: .relaxed) }
    /// Producers this relay has replaced after a failed delivery or a fatal error.
    public var producerRestartCount: Int { counters.producerRestarts.load(ordering: .relaxed) }
    /// Client-level Kafka errors reported by librdkafka (brokers unreachable, fatal errors).
    public var kafkaErrorCount: Int { counters.kafkaErrors.load(ordering: .relaxed) }
    /// Kafka transactions this relay has committed (exactly-once delivery).
    public var committedTransactionCount: Int { counters.transactions.load(ordering: .relaxed) }
    /// Kafka transactions this relay has aborted (exactly-once delivery); their rows went out again.
    public var abortedTransactionCount: Int { counters.aborted.load(ordering: .relaxed) }
    /// Whether this relay is currently the active one.
    public var isActive: Bool { counters.active.load(ordering: .relaxed) }
    /// The outbox as the last housekeeping saw it (`nil` before the first).
    public var lastStatus: OutboxStatus? { latestStatus.withLock { $0 } }

    /// Runs until graceful shutdown (SIGTERM/SIGINT through a `ServiceGroup`) or task cancellation: then it
    /// takes no new rows, waits up to ``OutboxRelayConfiguration/shutdownTimeout`` for in-flight deliveries,
    /// marks them, and returns. Rows not acknowledged by then stay waiting.
    public func run() async throws {
        if configuration.delivery == .atLeastOnce, let timeout = configuration.kafka.properties["message.timeout.ms"], timeout != "0" {
            logger.warning(
                "message.timeout.ms is not 0: a message that times out while later ones of its partition get through leaves a gap; the relay counts such order violations but cannot undo them",
                metadata: ["kafka.message.timeout.ms": "\(timeout)"])
        }
        try await checkKafkaConfiguration()
        if case .wal(let wal) = configuration.source { try await checkReplicationSetup(wal) }
        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                switch configuration.source {
                case .table: await self.superviseLeadership()
                case .wal(let wal) where self.configuration.delivery == .exactlyOnce:
                    await self.superviseReplicationExactlyOnce(wal)
                case .wal(let wal): await self.superviseReplication(wal)
                }
            } onCancel: {
                self.stop()
            }
        } onGracefulShutdown: {
            self.stop()
        }
        logger.info("relay stopped", metadata: ["outbox.published": "\(publishedCount)"])
    }

    /// Builds (and closes) a producer with the configured properties, so that a name or value librdkafka
    /// refuses ends the relay at start with that reason, standbys included, instead of failing over and over
    /// once it becomes active.
    /// - Throws: ``KafkaError`` with code ``KafkaError/Code/invalidConfiguration`` naming the property.
    func checkKafkaConfiguration() async throws {
        let transactionalID = configuration.delivery == .exactlyOnce ? "eventoutbox-relay.configuration-check" : nil
        let producer = try makeProducer(ProducerInbox(wakeup: wakeup), transactionalID: transactionalID)
        await producer.close(timeout: .milliseconds(100))
    }

    /// Why this relay should not count as ready, or `nil`: a Kafka producer that failed (fatal error,
    /// fenced, or a failed delivery that restarted it) and has not succeeded since. A standby is ready.
    public var readinessProblem: String? {
        producerFailure.withLock { $0.map { "the Kafka producer failed and has not delivered since: \($0)" } }
    }

    func producerFailed(_ error: KafkaError) { producerFailure.withLock { $0 = "\(error)" } }
    func producerSucceeded() { producerFailure.withLock { if $0 != nil { $0 = nil } } }

    /// Asks the relay to finish: no new rows, in-flight deliveries are awaited (bounded) and marked.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        signalAll()
    }

    /// Wakes the publishing loops: the relay's own and those of exactly-once partitions.
    func signalAll() {
        wakeup.signal()
        for extra in partitionWakeups.withLock({ Array($0.values) }) { extra.signal() }
    }

    var isStopping: Bool { stopping.load(ordering: .acquiring) }

    private func superviseLeadership() async {
        var backoff = Backoff(max: configuration.maxBackoff)
        while !isStopping {
            do {
                let connection = try await PostgresConnection.connect(to: configuration.databaseURL)
                if configuration.delivery == .exactlyOnce {
                    try await leadExactlyOnce(connection, backoff: &backoff)
                    setActive(false)
                    continue
                }
                var ownership: PartitionOwnership?
                if configuration.partitions > 1 {
                    let partitioned = PartitionOwnership(count: configuration.partitions, baseKey: configuration.leaderLockKey)
                    try await partitioned.join(on: connection)
                    ownership = partitioned
                } else {
                    guard try await becomeActive(connection) else { return }
                    setActive(true)
                    logger.info("this relay is now the active one", metadata: ["outbox.lock": "\(configuration.leaderLockKey)"])
                }
                backoff.reset()
                try await lead(connection, ownership)
                setActive(false)
            } catch {
                setActive(false)
                let delay = backoff.next()
                logger.warning(
                    "relay lost its database connection or failed; retrying",
                    metadata: ["error": "\(error)", "retry.in": "\(delay)"])
                await sleepUnlessStopping(delay)
            }
        }
    }

    func setActive(_ active: Bool) {
        counters.active.store(active, ordering: .relaxed)
        metrics.active.record(active ? 1 : 0)
    }

    /// Waits for the advisory lock. Returns `false` if asked to stop first.
    func becomeActive(_ connection: PostgresConnection) async throws -> Bool {
        var announced = false
        while !isStopping {
            let acquired = try await connection.queryOne(
                "SELECT pg_try_advisory_lock($1) AS acquired", [.int64(configuration.leaderLockKey)],
                statement: "relay: try leader lock"
            ).decode(Bool.self, "acquired")
            if acquired { return true }
            if !announced {
                logger.info("another relay is active; standing by", metadata: ["outbox.lock": "\(configuration.leaderLockKey)"])
                announced = true
            }
            await sleepUnlessStopping(configuration.standbyRetryInterval)
        }
        return false
    }

    /// Publishes while this relay holds the lock: one producer after another, each until it fails or the
    /// relay stops. A NOTIFY listener on a second connection wakes the loop when rows are committed.
    private func lead(_ connection: PostgresConnection, _ initialOwnership: PartitionOwnership?) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await self.listenForAppends() }
            defer { group.cancelAll() }
            var backoff = Backoff(max: configuration.maxBackoff)
            var housekeeping = HousekeepingClock(interval: configuration.housekeepingInterval)
            var ownership = initialOwnership
            // Marks go over a second connection, so that marking one group overlaps fetching the next batch.
            let marker = PublishedRowMarker(
                connection: try await PostgresConnection.connect(to: configuration.databaseURL),
                deletes: configuration.publishedRows.deletesAtOnce, wakeup: wakeup)
            while !isStopping {
                let inbox = ProducerInbox(wakeup: wakeup)
                let producer = try makeProducer(inbox)
                let end: GenerationEnd
                do {
                    end = try await publish(producer, inbox, connection, marker, &housekeeping, &ownership)
                } catch {
                    producer.purge()
                    await producer.close(timeout: .seconds(1))
                    throw error
                }
                await producer.close(timeout: .seconds(1))
                guard case .failed(let error, let onlyDeadLetters) = end else { return }
                if !onlyDeadLetters { producerFailed(error) }
                counters.producerRestarts.add(1, ordering: .relaxed)
                metrics.producerRestarts.increment()
                let delay = onlyDeadLetters ? Duration.zero : backoff.next()
                logger.warning(
                    "Kafka producer failed; starting a new one from the rows still waiting",
                    metadata: ["kafka.error": "\(error)", "retry.in": "\(delay)"])
                await sleepUnlessStopping(delay)
            }
        }
    }

    /// A producer with the relay's defaults under the configured properties, reporting into `inbox`.
    /// With a `transactionalID`, a transactional producer (exactly-once delivery).
    func makeProducer(_ inbox: ProducerInbox, transactionalID: String? = nil) throws -> KafkaProducer {
        var properties = transactionalID == nil
            ? OutboxRelayConfiguration.producerDefaults : OutboxRelayConfiguration.transactionalProducerDefaults
        if let transactionalID {
            properties["transactional.id"] = transactionalID
            properties["transaction.timeout.ms"] = "\(configuration.transactionTimeout.components.seconds * 1000)"
        }
        return try KafkaProducer(
            configuration: KafkaConfiguration(
                bootstrapServers: configuration.kafka.bootstrapServers,
                properties: properties.merging(configuration.kafka.properties) { $1 }),
            logger: logger,
            deliveryReports: { [weak self] report in
                if report.error == nil { self?.producerSucceeded() }
                inbox.add(report)
            },
            errors: { [counters, metrics] error in
                counters.kafkaErrors.add(1, ordering: .relaxed)
                metrics.kafkaErrors.increment()
                inbox.error(error)
            })
    }

    private enum GenerationEnd {
        case stopped
        /// The producer is done for; `onlyDeadLetters` when the sole failures were rows now dead-lettered.
        case failed(KafkaError, onlyDeadLetters: Bool)
    }

    /// Runs one producer: fetch, enqueue, mark, until it fails or the relay stops.
    private func publish(
        _ producer: KafkaProducer, _ inbox: ProducerInbox, _ connection: PostgresConnection,
        _ marker: PublishedRowMarker, _ housekeeping: inout HousekeepingClock, _ ownership: inout PartitionOwnership?
    ) async throws -> GenerationEnd {
        var pipeline = PublishPipeline(tracksGaps: ownership == nil)
        var lastBalance: ContinuousClock.Instant?
        // A share to give back once nothing is in flight: fetching pauses until then.
        var releasePending = false
        var purged = false
        var retriableFailures = 0
        var lastFullScan = ContinuousClock.now
        var shutdownDeadline: ContinuousClock.Instant?
        while true {
            retriableFailures += try await settle(inbox.take(), &pipeline, connection, marker)
            try marker.startIfIdle()
            if let fatal = inbox.fatalError { pipeline.abandon(fatal) }
            if let failure = pipeline.failure {
                if !purged {
                    producer.purge()
                    purged = true
                }
                if pipeline.isIdle {
                    try await marker.flush()
                    return .failed(failure, onlyDeadLetters: retriableFailures == 0 && inbox.fatalError == nil)
                }
                await wakeup.wait(timeout: .milliseconds(100))
                continue
            }
            if isStopping {
                let deadline = shutdownDeadline ?? ContinuousClock.now + configuration.shutdownTimeout
                shutdownDeadline = deadline
                if pipeline.isIdle {
                    try await marker.flush()
                    return .stopped
                }
                if ContinuousClock.now >= deadline && !purged {
                    logger.warning(
                        "shutdown timeout: rows without a delivery report stay waiting and go out again later",
                        metadata: ["outbox.in_flight": "\(pipeline.inFlight.count)"])
                    producer.purge()
                    purged = true
                }
                await wakeup.wait(timeout: min(.milliseconds(50), max(.milliseconds(1), deadline - ContinuousClock.now)))
                continue
            }
            if housekeeping.isDue {
                try await self.housekeeping(connection)
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
                    logger.info("publishing outbox partitions", metadata: [
                        "outbox.partitions": "\(partitioned.owned)", "outbox.partition_count": "\(partitioned.count)"])
                    // New partitions' waiting rows may lie behind the cursor.
                    if pipeline.isIdle { pipeline.rescan() } else { pipeline.requestRescan() }
                }
                releasePending = change.mustRelease
                ownership = partitioned
                lastBalance = .now
                setActive(!partitioned.owned.isEmpty)
                metrics.partitionsOwned.record(partitioned.owned.count)
            }
            // Rows of late commits lie behind the cursor. With nothing in flight, start again from the first
            // waiting row (free then). Under load, after a hole or once per poll interval, fetch the waiting
            // rows behind the cursor that are not in flight, without stopping the pipeline.
            if pipeline.isIdle && pipeline.cursor > 0 {
                try await marker.flush()
                pipeline.rescan()
                lastFullScan = .now
            }
            let room = configuration.maxInFlight - pipeline.inFlight.count
            let partitions = ownership?.partitions ?? .all
            if partitions.owned.isEmpty {
                // A partitioned relay with no share yet (or none free): a standby until the next rebalance.
                await wakeup.wait(timeout: configuration.standbyRetryInterval)
                continue
            }
            if releasePending && !pipeline.isIdle {
                await wakeup.wait(timeout: configuration.pollInterval)
                continue
            }
            if room > 0 && !pipeline.isIdle
                && (pipeline.needsRescan || ContinuousClock.now - lastFullScan >= configuration.pollInterval)
            {
                // Delivered rows not yet marked would come back as waiting: write them first.
                try await marker.flush()
                pipeline.beginCatchUp()
                lastFullScan = .now
                let limit = min(configuration.batchSize, room)
                guard let rows = try await fetch(connection, { [cursor = pipeline.cursor, inFlight = Array(pipeline.inFlight.keys)] in
                    try await self.table.waitingRows(
                        through: cursor, excluding: inFlight, limit: limit, partitions: partitions, on: connection)
                }) else { continue }
                let holes = try await table.streamsWithWaitingRows(in: pipeline.rangesToCheck(rows), on: connection)
                try await enqueue(pipeline.admit(rows, holes: holes), producer, &pipeline, connection)
                if rows.count == limit { pipeline.requestRescan() }
                continue
            }
            if room > 0 {
                let limit = min(configuration.batchSize, room)
                let cursor = pipeline.cursor
                let gaps = pipeline.gapsToRecheck()
                guard let rows = try await fetch(connection, {
                    try await self.table.waitingRows(after: cursor, alsoIDs: gaps, limit: limit, partitions: partitions, on: connection)
                }) else { continue }
                pipeline.noteFetched(rows, after: cursor)
                let holes = try await table.streamsWithWaitingRows(in: pipeline.rangesToCheck(rows), on: connection)
                try await enqueue(pipeline.admit(rows, holes: holes), producer, &pipeline, connection)
                if rows.count == limit { continue }
            }
            await wakeup.wait(timeout: configuration.pollInterval)
        }
    }

    /// Runs a fetch of waiting rows. An unreadable row must not stall the outbox: it goes to dead letters (its
    /// stream waits behind it) and `nil` is returned, so that the caller fetches again without it.
    private func fetch(
        _ connection: PostgresConnection, _ body: @Sendable () async throws -> [OutboxRow]
    ) async throws -> [OutboxRow]? {
        do {
            return try await body()
        } catch let error as OutboxRowError {
            try await table.moveToDeadLetters(error.outboxID, error: "\(error)", on: connection)
            metrics.deadLettered.increment()
            logger.error(
                "outbox row cannot be read; moved to dead letters, its stream is held back",
                metadata: ["outbox.id": "\(error.outboxID)", "error": "\(error)"])
            return nil
        }
    }

    /// Hands admitted rows to the producer in order. A row refused for good is dead-lettered; its stream's
    /// later rows wait for the next pass.
    private func enqueue(
        _ rows: [OutboxRow], _ producer: KafkaProducer, _ pipeline: inout PublishPipeline, _ connection: PostgresConnection
    ) async throws {
        await producer.prepare(topics: Array(Set(rows.map(\.topic))))
        for row in rows where pipeline.mayEnqueue(row) {
            let message = row.kafkaMessage(format: configuration.format)
            while true {
                do {
                    try producer.enqueue(message, messageID: UInt64(row.id))
                    pipeline.sent(row)
                } catch let error as KafkaError where error.code == .queueFull {
                    // librdkafka's own queue is full (its limits are below maxInFlight): let reports drain it.
                    try await Task.sleep(for: .milliseconds(1))
                    continue
                } catch let error as KafkaError where error.isPermanentForRecord {
                    pipeline.refused(row)
                    counters.failed.add(1, ordering: .relaxed)
                    metrics.deliveryErrors.increment()
                    try await deadLetter(row, error, connection)
                } catch let error as KafkaError {
                    pipeline.refused(row)
                    pipeline.abandon(error)
                } catch {
                    pipeline.refused(row)
                    pipeline.abandon(KafkaError(code: .invalidArgument, message: "cannot enqueue outbox row \(row.id): \(error)"))
                }
                break
            }
        }
    }

    /// Applies delivery reports: hands what Kafka stored to the marker, dead-letters what it never will.
    /// Returns how many deliveries failed for reasons a new attempt may fix.
    private func settle(
        _ reports: [KafkaDeliveryReport], _ pipeline: inout PublishPipeline, _ connection: PostgresConnection,
        _ marker: PublishedRowMarker
    ) async throws -> Int {
        guard !reports.isEmpty else { return 0 }
        var deliveries: [OutboxTable.Delivery] = []
        deliveries.reserveCapacity(reports.count)
        var deadLetters: [(OutboxRow, KafkaError)] = []
        var retriable = 0
        let violationsBefore = pipeline.orderViolations
        for report in reports {
            switch pipeline.record(report) {
            case .delivered(let delivery): deliveries.append(delivery)
            case .deadLetter(let row, let error): deadLetters.append((row, error))
            case .retry:
                if report.error?.code.isPurge == false {
                    retriable += 1
                    counters.failed.add(1, ordering: .relaxed)
                    metrics.deliveryErrors.increment()
                }
            case .unknown: break
            }
        }
        if pipeline.orderViolations > violationsBefore {
            metrics.orderViolations.increment(by: pipeline.orderViolations - violationsBefore)
            logger.error(
                "Kafka stored a row after an earlier row of its stream failed on the same producer; consumers may see that stream out of order",
                metadata: ["outbox.order_violations": "\(pipeline.orderViolations)"])
        }
        marker.add(deliveries)
        counters.published.add(deliveries.count, ordering: .relaxed)
        metrics.published.increment(by: deliveries.count)
        for (row, error) in deadLetters {
            counters.failed.add(1, ordering: .relaxed)
            metrics.deliveryErrors.increment()
            try await deadLetter(row, error, connection)
        }
        return retriable
    }

    func deadLetter(_ row: OutboxRow, _ error: KafkaError, _ connection: PostgresConnection) async throws {
        try await table.moveToDeadLetters(row.id, error: "\(error)", on: connection)
        metrics.deadLettered.increment()
        logger.error(
            "outbox row moved to dead letters; later events of its stream are held back until it is retried",
            metadata: [
                "outbox.id": "\(row.id)", "event.id": "\(row.eventID)", "stream.id": "\(row.streamID)",
                "stream.version": "\(row.streamVersion)", "kafka.error": "\(error)",
            ])
    }

    /// Gauges of the outbox and retention of published rows (a bounded amount per run, so a backlog keeps
    /// draining meanwhile).
    func housekeeping(_ connection: PostgresConnection) async throws {
        let status = try await table.status(on: connection)
        latestStatus.withLock { $0 = status }
        metrics.waiting.record(status.waiting)
        metrics.oldestAge.record(status.oldestWaitingAgeSeconds)
        metrics.deadLetters.record(status.deadLetters)
        for _ in 0..<10 {
            let deleted = try await table.deletePublished(
                olderThan: configuration.retention, limit: configuration.retentionBatchSize, on: connection)
            if deleted < configuration.retentionBatchSize || isStopping { break }
        }
    }

    /// Signals the publish loop on every NOTIFY of the outbox channel, from a connection of its own. Polling
    /// covers the gaps (a failed listener reconnects after a second).
    func listenForAppends() async {
        while !Task.isCancelled && !isStopping {
            do {
                let listener = try await PostgresConnection.connect(to: configuration.databaseURL)
                try await listener.listen(EventStoreSchema.outboxChannel)
                while !Task.isCancelled && !isStopping {
                    if try await !listener.notifications(timeout: .milliseconds(250)).isEmpty { signalAll() }
                }
            } catch {
                logger.debug("NOTIFY listener failed; the relay polls meanwhile", metadata: ["error": "\(error)"])
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    func sleepUnlessStopping(_ duration: Duration) async {
        let deadline = ContinuousClock.now + duration
        while !isStopping && ContinuousClock.now < deadline {
            try? await Task.sleep(for: min(.milliseconds(50), deadline - ContinuousClock.now))
        }
    }
}

/// Where one producer's delivery reports and errors land (on librdkafka's poll thread) until the publish
/// loop takes them.
final class ProducerInbox: Sendable {
    private let wakeup: Wakeup
    private let reports = Mutex<[KafkaDeliveryReport]>([])
    private let fatal = Mutex<KafkaError?>(nil)

    init(wakeup: Wakeup) { self.wakeup = wakeup }

    func add(_ report: KafkaDeliveryReport) {
        let wasEmpty = reports.withLock { reports in
            defer { reports.append(report) }
            return reports.isEmpty
        }
        if wasEmpty { wakeup.signal() }
    }

    func error(_ error: KafkaError) {
        guard error.isFatal else { return }
        fatal.withLock { $0 = $0 ?? error }
        wakeup.signal()
    }

    func take() -> [KafkaDeliveryReport] { reports.withLock { reports in defer { reports = [] }; return reports } }

    var fatalError: KafkaError? { fatal.withLock { $0 } }
}

/// Writes delivered rows to the outbox (marked, or deleted) on a connection of its own, one statement at a
/// time covering every delivery that arrived meanwhile, while the publish loop goes on fetching.
///
/// Used by the publish loop only (not concurrently): `add`, `startIfIdle` and `flush` are called from that one
/// task; the statement runs in a child task that signals the loop's wakeup when done.
private final class PublishedRowMarker: @unchecked Sendable {
    private let connection: PostgresConnection
    private let deletes: Bool
    private let wakeup: Wakeup
    private let table = OutboxTable()
    private var pending: [OutboxTable.Delivery] = []
    private var running: Task<Void, Never>?
    private let runningDone = Atomic<Bool>(true)
    /// The error of the last statement that failed, as it was thrown.
    private let failure = Mutex<(any Error)?>(nil)

    init(connection: PostgresConnection, deletes: Bool, wakeup: Wakeup) {
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
}

/// When housekeeping is next due.
struct HousekeepingClock {
    let interval: Duration
    private var last: ContinuousClock.Instant?
    init(interval: Duration) { self.interval = interval }
    var isDue: Bool { last.map { ContinuousClock.now - $0 >= interval } ?? true }
    mutating func ran() { last = .now }
}

final class RelayCounters: Sendable {
    let published = Atomic<Int>(0)
    let failed = Atomic<Int>(0)
    let producerRestarts = Atomic<Int>(0)
    let kafkaErrors = Atomic<Int>(0)
    let transactions = Atomic<Int>(0)
    let aborted = Atomic<Int>(0)
    let active = Atomic<Bool>(false)
}

/// The relay's metrics (swift-metrics; exported by whatever backend the executable bootstraps).
struct RelayMetrics: Sendable {
    let published = Counter(label: "eventoutbox_relay_published_total")
    let deliveryErrors = Counter(label: "eventoutbox_relay_delivery_errors_total")
    let deadLettered = Counter(label: "eventoutbox_relay_dead_lettered_total")
    let producerRestarts = Counter(label: "eventoutbox_relay_producer_restarts_total")
    let kafkaErrors = Counter(label: "eventoutbox_relay_kafka_errors_total")
    let orderViolations = Counter(label: "eventoutbox_relay_order_violations_total")
    let transactionsCommitted = Counter(label: "eventoutbox_relay_transactions_committed_total")
    let transactionsAborted = Counter(label: "eventoutbox_relay_transactions_aborted_total")
    let fenced = Counter(label: "eventoutbox_relay_producer_fenced_total")
    let waiting = Gauge(label: "eventoutbox_relay_rows_waiting")
    let oldestAge = Gauge(label: "eventoutbox_relay_oldest_waiting_age_seconds")
    let deadLetters = Gauge(label: "eventoutbox_relay_dead_letters")
    let active = Gauge(label: "eventoutbox_relay_active")
    let partitionsOwned = Gauge(label: "eventoutbox_relay_partitions_owned")
    let walRetainedBytes = Gauge(label: "eventoutbox_relay_wal_retained_bytes")
    let walUnconfirmedAge = Gauge(label: "eventoutbox_relay_wal_unconfirmed_age_seconds")
}

/// Exponential backoff: 100 ms, 200 ms, ... up to `max`.
struct Backoff {
    let max: Duration
    private var attempt = 0
    init(max: Duration) { self.max = max }
    mutating func next() -> Duration {
        attempt += 1
        return min(.milliseconds(100) * (1 << Swift.min(attempt - 1, 16)), max)
    }
    mutating func reset() { attempt = 0 }
}
