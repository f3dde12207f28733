import BlockingIO
import Coordination
import EventStore
import EventStoreSQL
import Foundation
import KafkaClient
import Logging
import Metrics
import OutboxRelayStore
import LibPQ
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
    /// The graceful stop: every loop reads it, every wait between rounds sleeps on it.
    let stopRequest = StopRequest()
    let wakeup = Wakeup()
    let counters = RelayCounters()
    /// The last producer failure not yet followed by a success (a delivery, or a transactional init).
    private let producerFailure = Mutex<String?>(nil)
    let metrics = RelayMetrics()
    let latestStatus = Mutex<OutboxStatus?>(nil)
    /// The wakeups of exactly-once partition engines, by partition (each engine waits on its own).
    let partitionWakeups = Mutex<[Int: Wakeup]>([:])
    /// A NOTIFY of the outbox channel arrived since the table source last fetched: rows may be waiting.
    private let appendsNotified = Atomic<Bool>(false)

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
        stopRequest.request()
        signalAll()
    }

    /// Whether a NOTIFY of the outbox channel arrived since the last call (which clears it).
    func takeAppendNotice() -> Bool { appendsNotified.exchange(false, ordering: .acquiringAndReleasing) }

    /// Wakes the publishing loops: the relay's own and those of exactly-once partitions.
    func signalAll() {
        wakeup.signal()
        for extra in partitionWakeups.withLock({ Array($0.values) }) { extra.signal() }
    }

    private func superviseLeadership() async {
        var backoff = Backoff(max: configuration.maxBackoff)
        while !stopRequest.isRequested {
            do {
                let connection = try await PQConnection.connect(to: configuration.databaseURL)
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
                await stopRequest.sleep(for: delay)
            }
        }
    }

    func setActive(_ active: Bool) {
        counters.active.store(active, ordering: .relaxed)
        metrics.active.record(active ? 1 : 0)
    }

    /// Waits for the advisory lock. Returns `false` if asked to stop first.
    func becomeActive(_ connection: PQConnection) async throws -> Bool {
        var announced = false
        while !stopRequest.isRequested {
            let acquired = try await connection.queryOne(
                "SELECT pg_try_advisory_lock($1) AS acquired", [.int64(configuration.leaderLockKey)],
                statement: "relay: try leader lock"
            ).decode(Bool.self, "acquired")
            if acquired { return true }
            if !announced {
                logger.info("another relay is active; standing by", metadata: ["outbox.lock": "\(configuration.leaderLockKey)"])
                announced = true
            }
            await stopRequest.sleep(for: configuration.standbyRetryInterval)
        }
        return false
    }

    /// Publishes while this relay holds the lock (or a share of the partitions): the at-least-once engine over
    /// the outbox table. A NOTIFY listener on a second connection wakes it when rows are committed.
    private func lead(_ connection: PQConnection, _ ownership: PartitionOwnership?) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await self.listenForAppends() }
            defer { group.cancelAll() }
            // Marks go over a second connection, so that marking one group overlaps fetching the next batch.
            let marker = PublishedRowMarker(
                connection: try await PQConnection.connect(to: configuration.databaseURL),
                deletes: configuration.publishedRows.deletesAtOnce, wakeup: wakeup)
            var source = TablePipelinedSource(relay: self, connection: connection, marker: marker, ownership: ownership)
            do {
                try await PipelinedPublisher(relay: self).run(&source)
            } catch {
                await marker.close()
                throw error
            }
            await marker.close()
        }
    }

    /// A producer with the relay's defaults under the configured properties, reporting into `inbox`.
    /// With a `transactionalID`, a transactional producer (exactly-once delivery).
    func makeProducer(_ inbox: ProducerInbox, transactionalID: String? = nil) throws -> KafkaProducer {
        var properties = transactionalID == nil
            ? OutboxRelayConfiguration.producerDefaults : OutboxRelayConfiguration.transactionalProducerDefaults
        if let transactionalID {
            properties["transactional.id"] = transactionalID
            properties["transaction.timeout.ms"] = "\(configuration.transactionTimeout.clampedMilliseconds)"
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

    /// Gauges of the outbox and retention of published rows (a bounded amount per run, so a backlog keeps
    /// draining meanwhile).
    func housekeeping(_ connection: PQConnection) async throws {
        let status = try await table.status(on: connection)
        latestStatus.withLock { $0 = status }
        metrics.waiting.record(status.waiting)
        metrics.oldestAge.record(status.oldestWaitingAgeSeconds)
        metrics.deadLetters.record(status.deadLetters)
        for _ in 0..<10 {
            let deleted = try await table.deletePublished(
                olderThan: configuration.retention, limit: configuration.retentionBatchSize, on: connection)
            if deleted < configuration.retentionBatchSize || stopRequest.isRequested { break }
        }
    }

    /// Signals the publish loop on every NOTIFY of the outbox channel, from a connection of its own. Polling
    /// covers the gaps (a failed listener reconnects after a second).
    func listenForAppends() async {
        while !Task.isCancelled && !stopRequest.isRequested {
            do {
                let listener = try await PQConnection.connect(to: configuration.databaseURL)
                try await listener.listen(EventTables.outboxChannel)
                while !Task.isCancelled && !stopRequest.isRequested {
                    if try await !listener.notifications(timeout: .milliseconds(250)).isEmpty {
                        appendsNotified.store(true, ordering: .releasing)
                        signalAll()
                    }
                }
            } catch {
                logger.debug("NOTIFY listener failed; the relay polls meanwhile", metadata: ["error": "\(error)"])
                try? await Task.sleep(for: .seconds(1))
            }
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
