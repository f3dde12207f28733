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
/// - A row is marked published only after its delivery report says Kafka stored it. A crash between the two
///   publishes the row again (at-least-once); consumers dedupe by event id.
/// - Per-stream order: the message key is the stream id, and a stream never has more than one message in
///   flight. Each batch is sent in waves (the first waiting row of every stream, then the second, ...), and a
///   stream whose message failed sends nothing more until that message is delivered. So version n+1 never
///   reaches Kafka before version n, whatever the broker does.
/// - A row Kafka can never accept (too large, invalid) moves to `outbox_dead_letters`; its stream waits
///   until it is retried (`eventoutbox dead-letters retry`); other streams go on.
public final class OutboxRelay: Service, Sendable {
    public let configuration: OutboxRelayConfiguration
    private let logger: Logger
    private let table = OutboxTable()
    private let stopping = Atomic<Bool>(false)
    private let counters = RelayCounters()
    private let metrics = RelayMetrics()

    public init(configuration: OutboxRelayConfiguration, logger: Logger = Logger(label: "eventoutbox.relay")) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Rows this relay has seen delivered since it started.
    public var publishedCount: Int { counters.published.load(ordering: .relaxed) }
    /// Deliveries that failed (retriable or not) since it started.
    public var failedDeliveryCount: Int { counters.failed.load(ordering: .relaxed) }
    /// Whether this relay is currently the active one.
    public var isActive: Bool { counters.active.load(ordering: .relaxed) }

    /// Runs until graceful shutdown (SIGTERM/SIGINT through a `ServiceGroup`) or task cancellation:
    /// then it takes no new rows, waits for in-flight deliveries, marks them, and returns.
    public func run() async throws {
        let producer = try KafkaProducer(
            configuration: KafkaConfiguration(
                bootstrapServers: configuration.kafka.bootstrapServers,
                properties: OutboxRelayConfiguration.producerDefaults.merging(configuration.kafka.properties) { $1 }),
            logger: logger)
        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                await self.superviseLeadership(producer)
            } onCancel: {
                self.stop()
            }
        } onGracefulShutdown: {
            self.stop()
        }
        await producer.close(timeout: configuration.shutdownTimeout)
        logger.info("relay stopped", metadata: ["outbox.published": "\(publishedCount)"])
    }

    /// Asks the relay to finish: no new rows, in-flight deliveries are awaited and marked.
    public func stop() { stopping.store(true, ordering: .releasing) }

    private var isStopping: Bool { stopping.load(ordering: .acquiring) }

    private func superviseLeadership(_ producer: KafkaProducer) async {
        var backoff = Backoff(max: configuration.maxBackoff)
        while !isStopping {
            do {
                let connection = try await PostgresConnection.connect(to: configuration.databaseURL)
                guard try await becomeActive(connection) else { return }
                counters.active.store(true, ordering: .relaxed)
                metrics.active.record(1)
                logger.info("this relay is now the active one", metadata: ["outbox.lock": "\(configuration.leaderLockKey)"])
                backoff.reset()
                try await lead(connection, producer)
                counters.active.store(false, ordering: .relaxed)
                metrics.active.record(0)
            } catch {
                counters.active.store(false, ordering: .relaxed)
                metrics.active.record(0)
                let delay = backoff.next()
                logger.warning(
                    "relay lost its database connection or failed; retrying",
                    metadata: ["error": "\(error)", "retry.in": "\(delay)"])
                await sleepUnlessStopping(delay)
            }
        }
    }

    /// Waits for the advisory lock. Returns `false` if asked to stop first.
    private func becomeActive(_ connection: PostgresConnection) async throws -> Bool {
        var announced = false
        while !isStopping {
            let acquired = try await connection.query(
                "SELECT pg_try_advisory_lock($1) AS acquired", [.int64(configuration.leaderLockKey)],
                statement: "relay: try leader lock"
            ).first!.decode(Bool.self, "acquired")
            if acquired { return true }
            if !announced {
                logger.info("another relay is active; standing by", metadata: ["outbox.lock": "\(configuration.leaderLockKey)"])
                announced = true
            }
            await sleepUnlessStopping(configuration.standbyRetryInterval)
        }
        return false
    }

    private func lead(_ connection: PostgresConnection, _ producer: KafkaProducer) async throws {
        try await connection.listen(EventStoreSchema.outboxChannel)
        var backoff = Backoff(max: configuration.maxBackoff)
        var lastHousekeeping = ContinuousClock.now - .seconds(3600)
        while !isStopping {
            let rows = try await table.waitingRows(limit: configuration.batchSize, on: connection)
            if rows.isEmpty {
                if ContinuousClock.now - lastHousekeeping > .seconds(5) {
                    try await housekeeping(connection)
                    lastHousekeeping = .now
                }
                _ = try await connection.notifications(timeout: configuration.pollInterval)
                continue
            }
            let started = ContinuousClock.now
            let outcome = try await publish(rows, producer, connection)
            let elapsed = (ContinuousClock.now - started).components
            metrics.batchDuration.recordNanoseconds(elapsed.seconds * 1_000_000_000 + elapsed.attoseconds / 1_000_000_000)
            if outcome.retriableFailures > 0 {
                let delay = backoff.next()
                logger.warning(
                    "some deliveries failed; their rows stay in the outbox and are retried",
                    metadata: ["outbox.failed": "\(outcome.retriableFailures)", "retry.in": "\(delay)",
                               "kafka.error": "\(outcome.lastError.map { "\($0)" } ?? "")"])
                try await housekeeping(connection)
                await sleepUnlessStopping(delay)
            } else {
                backoff.reset()
            }
        }
    }

    private struct BatchOutcome {
        var delivered = 0
        var retriableFailures = 0
        var lastError: KafkaError?
    }

    /// Sends a batch in waves of at most one message per stream; see the type's documentation.
    private func publish(_ rows: [OutboxRow], _ producer: KafkaProducer, _ connection: PostgresConnection) async throws
        -> BatchOutcome
    {
        var order: [String] = []
        var byStream: [String: [OutboxRow]] = [:]
        for row in rows {
            if byStream[row.streamID] == nil { order.append(row.streamID) }
            byStream[row.streamID, default: []].append(row)
        }
        var blocked = Set<String>()
        var outcome = BatchOutcome()
        var wave = 0
        while !isStopping {
            let waveRows = order.compactMap { stream -> OutboxRow? in
                guard !blocked.contains(stream), let streamRows = byStream[stream], wave < streamRows.count else { return nil }
                return streamRows[wave]
            }
            if waveRows.isEmpty { break }
            var sent: [(OutboxRow, Result<KafkaDeliveryPromise, KafkaError>)] = []
            for row in waveRows {
                sent.append((row, await enqueue(row, producer)))
            }
            var deliveries: [OutboxTable.Delivery] = []
            for (row, result) in sent {
                let report: KafkaDeliveryReport
                switch result {
                case .success(let promise): report = await promise.report()
                case .failure(let error): report = KafkaDeliveryReport(topic: row.topic, partition: -1, offset: nil, error: error)
                }
                if let error = report.error {
                    blocked.insert(row.streamID)
                    metrics.deliveryErrors.increment()
                    counters.failed.add(1, ordering: .relaxed)
                    if error.isPermanentForRecord {
                        try await deadLetter(row, error, connection)
                    } else {
                        outcome.retriableFailures += 1
                        outcome.lastError = error
                    }
                } else {
                    deliveries.append(.init(id: row.id, partition: report.partition, offset: report.offset ?? -1))
                }
            }
            try await table.markPublished(deliveries, on: connection)
            outcome.delivered += deliveries.count
            counters.published.add(deliveries.count, ordering: .relaxed)
            metrics.published.increment(by: deliveries.count)
            wave += 1
        }
        return outcome
    }

    private func enqueue(_ row: OutboxRow, _ producer: KafkaProducer) async -> Result<KafkaDeliveryPromise, KafkaError> {
        let message = KafkaOutgoingMessage(
            topic: row.topic, key: Array(row.key.utf8), value: Array(row.envelope.utf8),
            headers: row.headers.sorted { $0.key < $1.key }.map { KafkaHeader(name: $0.key, value: $0.value) })
        while true {
            do {
                return .success(try producer.enqueue(message))
            } catch let error as KafkaError where error.code == .queueFull && !isStopping {
                try? await Task.sleep(for: .milliseconds(5))
            } catch let error as KafkaError {
                return .failure(error)
            } catch {
                return .failure(KafkaError(code: .invalidArgument, message: "\(error)"))
            }
        }
    }

    private func deadLetter(_ row: OutboxRow, _ error: KafkaError, _ connection: PostgresConnection) async throws {
        try await table.moveToDeadLetters(row.id, error: "\(error)", on: connection)
        metrics.deadLettered.increment()
        logger.error(
            "outbox row moved to dead letters; later events of its stream are held back until it is retried",
            metadata: [
                "outbox.id": "\(row.id)", "event.id": "\(row.eventID)", "stream.id": "\(row.streamID)",
                "stream.version": "\(row.streamVersion)", "kafka.error": "\(error)",
            ])
    }

    /// Gauges of the outbox and retention of published rows.
    private func housekeeping(_ connection: PostgresConnection) async throws {
        let status = try await table.status(on: connection)
        metrics.waiting.record(status.waiting)
        metrics.oldestAge.record(status.oldestWaitingAgeSeconds)
        metrics.deadLetters.record(status.deadLetters)
        var deleted = 0
        repeat {
            deleted = try await table.deletePublished(
                olderThan: configuration.retention, limit: configuration.retentionBatchSize, on: connection)
        } while deleted == configuration.retentionBatchSize && !isStopping
    }

    private func sleepUnlessStopping(_ duration: Duration) async {
        let deadline = ContinuousClock.now + duration
        while !isStopping && ContinuousClock.now < deadline {
            try? await Task.sleep(for: min(.milliseconds(50), deadline - ContinuousClock.now))
        }
    }
}

private final class RelayCounters: Sendable {
    let published = Atomic<Int>(0)
    let failed = Atomic<Int>(0)
    let active = Atomic<Bool>(false)
}

/// The relay's metrics (swift-metrics; exported by whatever backend the executable bootstraps).
private struct RelayMetrics: Sendable {
    let published = Counter(label: "eventoutbox_relay_published_total")
    let deliveryErrors = Counter(label: "eventoutbox_relay_delivery_errors_total")
    let deadLettered = Counter(label: "eventoutbox_relay_dead_lettered_total")
    let waiting = Gauge(label: "eventoutbox_relay_rows_waiting")
    let oldestAge = Gauge(label: "eventoutbox_relay_oldest_waiting_age_seconds")
    let deadLetters = Gauge(label: "eventoutbox_relay_dead_letters")
    let active = Gauge(label: "eventoutbox_relay_active")
    let batchDuration = Metrics.Timer(label: "eventoutbox_relay_batch_duration_seconds")
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
