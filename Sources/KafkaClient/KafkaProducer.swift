import BlockingIO
import CRdKafka
import Foundation
import Logging
import Synchronization

/// A Kafka producer over librdkafka.
///
/// Idempotence is on by default (`enable.idempotence=true`, which implies `acks=all`), so retries after
/// broker faults neither duplicate nor reorder records of a partition.
///
/// Each record enqueued with ``enqueue(_:)`` gets a ``KafkaDeliveryPromise`` that librdkafka fulfils with a
/// ``KafkaDeliveryReport`` once the record is stored (or has failed). Records enqueued in order with the same
/// key land in one partition in that order.
///
/// A dedicated thread serves librdkafka's event queue (`rd_kafka_poll`), which is where delivery reports are
/// produced; it keeps that blocking call off Swift's cooperative pool. Call ``close(timeout:)`` when done.
public final class KafkaProducer: Sendable {
    /// Defaults this wrapper applies under the caller's properties.
    public static let defaultProperties: [String: String] = [
        "enable.idempotence": "true",
        "acks": "all",
        "linger.ms": "5",
        // See KafkaConsumer.defaultProperties: back within a second of the brokers, not ten.
        "reconnect.backoff.max.ms": "1000",
    ]

    private let handle: RDKafkaHandle
    private let router: KafkaDeliveryRouter
    private let pollLoop = PollLoopState()
    /// Topics ``prepare(topics:)`` has looked up; its blocking metadata requests (and transactional calls)
    /// run on their own thread.
    private let knownTopics = Mutex<Set<String>>([])
    private let metadataThread = SerialThread(name: "eventoutbox-kafka-metadata")
    private let logger: Logger

    /// Creates a producer.
    /// - Parameters:
    ///   - configuration: the brokers and librdkafka properties (over the producer's defaults).
    ///   - logger: where librdkafka's log lines go.
    ///   - deliveryReports: receives the report of every record enqueued with ``enqueue(_:messageID:)``, on
    ///     the producer's poll thread, in the order librdkafka produces them (per partition: the order the
    ///     records were enqueued). It must return quickly.
    ///   - errors: receives client-level errors, on the poll thread: brokers unreachable (librdkafka keeps
    ///     retrying) and fatal errors (``KafkaError/isFatal``), after which this producer can send nothing
    ///     more and must be replaced.
    /// - Throws: ``KafkaError`` with ``KafkaError/Code/invalidConfiguration`` naming a rejected property.
    public init(
        configuration: KafkaConfiguration, logger: Logger = Logger(label: "eventoutbox.kafka.producer"),
        deliveryReports: (@Sendable (KafkaDeliveryReport) -> Void)? = nil,
        errors: (@Sendable (KafkaError) -> Void)? = nil
    ) throws {
        let conf = try RDKafkaConfig.make(configuration.merged(over: Self.defaultProperties))
        rd_kafka_conf_set_dr_msg_cb(conf, deliveryReportCallback)
        rd_kafka_conf_set_error_cb(conf, rdKafkaErrorCallback)
        router = KafkaDeliveryRouter(handler: deliveryReports)
        handle = try RDKafkaHandle(
            type: RD_KAFKA_PRODUCER, conf: conf,
            context: RDKafkaContext(logger: logger, deliveries: router, errorHandler: errors))
        self.logger = logger
        let thread = Thread { [handle, pollLoop] in
            while !pollLoop.stopping.load(ordering: .acquiring) {
                rd_kafka_poll(handle.pointer, 100)
            }
            // Fail what is still queued so that every promise is fulfilled, then serve those reports.
            rd_kafka_purge(handle.pointer, Int32(RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT))
            let deadline = ContinuousClock.now + .seconds(5)
            while rd_kafka_outq_len(handle.pointer) > 0 && ContinuousClock.now < deadline {
                rd_kafka_poll(handle.pointer, 100)
            }
            rd_kafka_poll(handle.pointer, 0)
            let waiters = pollLoop.finished.withLock { waiters -> [CheckedContinuation<Void, Never>] in
                defer { waiters = nil }
                return waiters ?? []
            }
            waiters.forEach { $0.resume() }
        }
        thread.name = "eventoutbox-kafka-producer-poll"
        thread.start()
    }

    deinit {
        pollLoop.stopping.store(true, ordering: .releasing)
        metadataThread.stop()
    }

    /// Hands a record to librdkafka without waiting for the broker.
    /// - Returns: a promise of the record's delivery report.
    /// - Throws: ``KafkaError`` when librdkafka refuses the record right away (e.g. ``KafkaError/Code/queueFull``,
    ///   ``KafkaError/Code/messageSizeTooLarge`` above `message.max.bytes`, or the producer is closed). Nothing
    ///   was enqueued then.
    public func enqueue(_ message: KafkaOutgoingMessage) throws -> KafkaDeliveryPromise {
        let promise = KafkaDeliveryPromise(topic: message.topic)
        let id = router.register(promise)
        do {
            try produce(message, messageID: id)
        } catch {
            router.unregister(id)
            throw error
        }
        return promise
    }

    /// Hands a record to librdkafka without waiting for the broker; its report goes to the `deliveryReports`
    /// handler given at creation, carrying `messageID`. No allocation per record beyond librdkafka's own.
    /// - Parameters:
    ///   - message: the record.
    ///   - messageID: the caller's id for the record, from 1 to 2^63 - 1.
    /// - Throws: as ``enqueue(_:)``; the handler never hears of a record that was refused.
    public func enqueue(_ message: KafkaOutgoingMessage, messageID: UInt64) throws {
        precondition(router.hasHandler, "enqueue(_:messageID:) needs a producer created with a deliveryReports handler")
        precondition(messageID > 0 && messageID < KafkaDeliveryRouter.firstPromiseID, "messageID out of range")
        try produce(message, messageID: messageID)
    }

    private func produce(_ message: KafkaOutgoingMessage, messageID: UInt64) throws {
        guard !pollLoop.stopping.load(ordering: .acquiring) else {
            throw KafkaError(code: .closed, message: "producer is closed; cannot send to '\(message.topic)'")
        }
        // The id travels as the record's opaque pointer value (never dereferenced).
        if let error = RDKafkaProduce.produce(handle.pointer, message, opaque: UnsafeMutableRawPointer(bitPattern: UInt(messageID))!) {
            throw error
        }
    }

    /// Fetches the metadata (partitions, leaders) of topics this producer has not sent to yet, waiting up to
    /// `timeout`. Optional: without it, librdkafka learns of a topic first used by a running producer only on
    /// its next periodic topic scan, up to a second later, and holds that topic's first records meanwhile.
    public func prepare(topics: [String], timeout: Duration = .seconds(5)) async {
        let newTopics = knownTopics.withLock { known in topics.filter { known.insert($0).inserted } }
        guard !newTopics.isEmpty else { return }
        let milliseconds = timeout.clampedMilliseconds
        let handle = self.handle
        await metadataThread.run {
            for topic in newTopics {
                guard let topicHandle = rd_kafka_topic_new(handle.pointer, topic, nil) else { continue }
                var metadata: UnsafePointer<rd_kafka_metadata>?
                if rd_kafka_metadata(handle.pointer, 0, topicHandle, &metadata, milliseconds) == RD_KAFKA_RESP_ERR_NO_ERROR,
                    let metadata
                {
                    rd_kafka_metadata_destroy(metadata)
                }
                rd_kafka_topic_destroy(topicHandle)
            }
        }
    }

    // MARK: Transactions (a producer created with `transactional.id`)

    /// Registers this producer's `transactional.id` with its coordinator: completes or aborts whatever an
    /// earlier producer with the same id left open, and fences that producer (it can commit nothing more).
    /// Call once, before the first ``beginTransaction()``.
    /// - Throws: ``KafkaError``; fatal or timed out, the producer must be replaced.
    public func initTransactions(timeout: Duration) async throws {
        try await transactionCall("init transactions", timeout) { rd_kafka_init_transactions($0, $1) }
    }

    /// Starts a transaction: records enqueued from now on are committed or aborted together.
    public func beginTransaction() throws {
        if let error = rd_kafka_begin_transaction(handle.pointer) {
            throw KafkaError(consuming: error, context: "begin transaction")
        }
    }

    /// Flushes the transaction's records and commits them. Only after this returns are they visible to
    /// `read_committed` consumers.
    /// - Throws: ``KafkaError``: with ``KafkaError/requiresAbort`` call ``abortTransaction(timeout:)``; fatal
    ///   (``KafkaError/isFenced`` among them), replace the producer; retriable (timed out), the outcome is
    ///   unknown until a retried commit or abort says.
    public func commitTransaction(timeout: Duration) async throws {
        try await transactionCall("commit transaction", timeout) { rd_kafka_commit_transaction($0, $1) }
    }

    /// Aborts the current transaction: its records are never visible to `read_committed` consumers.
    public func abortTransaction(timeout: Duration) async throws {
        try await transactionCall("abort transaction", timeout) { rd_kafka_abort_transaction($0, $1) }
    }

    /// Runs a blocking transactional call on the producer's own thread.
    private func transactionCall(
        _ what: String, _ timeout: Duration, _ call: @escaping @Sendable (OpaquePointer, Int32) -> OpaquePointer?
    ) async throws {
        let milliseconds = timeout.clampedMilliseconds
        let handle = self.handle
        let error: KafkaError? = await metadataThread.run {
            call(handle.pointer, milliseconds).map { KafkaError(consuming: $0, context: what) }
        }
        if let error { throw error }
    }

    /// The fatal error this producer hit, if any: it can send nothing more and must be replaced.
    public var fatalError: KafkaError? {
        var text = [CChar](repeating: 0, count: 512)
        let code = rd_kafka_fatal_error(handle.pointer, &text, text.count)
        guard code != RD_KAFKA_RESP_ERR_NO_ERROR else { return nil }
        return KafkaError(code: KafkaError.Code(code), message: "fatal: \(RDKafkaConfig.string(text))", isFatal: true)
    }

    /// Fails every record not yet acknowledged, queued or in flight, at once: each gets a report with
    /// ``KafkaError/Code/purgedQueue`` or ``KafkaError/Code/purgedInFlight``. A purged in-flight record may
    /// still have been stored by the broker; treat it as "unknown", never as "not sent".
    public func purge() {
        rd_kafka_purge(handle.pointer, Int32(RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT))
    }

    /// Enqueues a record and waits for its delivery report, retrying while librdkafka's local queue is full.
    public func send(_ message: KafkaOutgoingMessage) async throws -> KafkaDeliveryReport {
        while true {
            do {
                return try await enqueue(message).report()
            } catch let error as KafkaError where error.code == .queueFull {
                try await Task.sleep(for: .milliseconds(5))
            }
        }
    }

    /// Number of records not yet acknowledged (queued or in flight).
    public var pendingCount: Int { Int(rd_kafka_outq_len(handle.pointer)) }

    /// Waits until every enqueued record has a delivery report, or `timeout` passes.
    /// - Throws: ``KafkaError/Code/timedOut`` if records remain after `timeout`.
    public func flush(timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        while pendingCount > 0 {
            guard ContinuousClock.now < deadline else {
                throw KafkaError(
                    code: .timedOut, message: "flush: \(pendingCount) records still undelivered after \(timeout)")
            }
            try await Task.sleep(for: .milliseconds(5))
        }
    }

    /// Flushes for up to `timeout`, then stops the producer. Records still undelivered get a failed report
    /// (purged), so no promise is left waiting.
    public func close(timeout: Duration = .seconds(10)) async {
        do {
            try await flush(timeout: timeout)
        } catch {
            logger.warning("closing producer with undelivered records", metadata: ["kafka.error": "\(error)"])
        }
        pollLoop.stopping.store(true, ordering: .releasing)
        await withCheckedContinuation { continuation in
            let alreadyDone = pollLoop.finished.withLock { waiters -> Bool in
                guard waiters != nil else { return true }
                waiters!.append(continuation)
                return false
            }
            if alreadyDone { continuation.resume() }
        }
    }
}

/// Shared between the producer and its poll thread.
private final class PollLoopState: Sendable {
    /// Set once to stop the poll thread (by `close` or `deinit`).
    let stopping = Atomic<Bool>(false)
    /// Who waits for the poll thread to finish; `nil` once it has.
    let finished = Mutex<[CheckedContinuation<Void, Never>]?>([])
}

/// The delivery report of one record, available once librdkafka has one.
public final class KafkaDeliveryPromise: Sendable {
    private enum State {
        case pending([CheckedContinuation<KafkaDeliveryReport, Never>])
        case done(KafkaDeliveryReport)
    }

    public let topic: String
    private let state = Mutex<State>(.pending([]))

    init(topic: String) { self.topic = topic }

    /// Waits for the report: where the record was stored, or why it failed.
    public func report() async -> KafkaDeliveryReport {
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> KafkaDeliveryReport? in
                switch state {
                case .done(let report): return report
                case .pending(var waiters):
                    waiters.append(continuation)
                    state = .pending(waiters)
                    return nil
                }
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// The report if it has arrived.
    public var currentReport: KafkaDeliveryReport? {
        state.withLock { if case .done(let report) = $0 { report } else { nil } }
    }

    func fulfill(_ report: KafkaDeliveryReport) {
        let waiters = state.withLock { state -> [CheckedContinuation<KafkaDeliveryReport, Never>] in
            guard case .pending(let waiters) = state else { return [] }
            state = .done(report)
            return waiters
        }
        waiters.forEach { $0.resume(returning: report) }
    }
}

/// Sends each delivery report to its promise, or else to the producer's report handler.
final class KafkaDeliveryRouter: Sendable {
    /// Ids from here up belong to promises; callers' ids (``KafkaProducer/enqueue(_:messageID:)``) stay below.
    static let firstPromiseID: UInt64 = 1 << 62
    private let handler: (@Sendable (KafkaDeliveryReport) -> Void)?
    private let promises = Mutex<(next: UInt64, waiting: [UInt64: KafkaDeliveryPromise])>((firstPromiseID, [:]))

    init(handler: (@Sendable (KafkaDeliveryReport) -> Void)?) { self.handler = handler }

    var hasHandler: Bool { handler != nil }

    func register(_ promise: KafkaDeliveryPromise) -> UInt64 {
        promises.withLock { state in
            let id = state.next
            state.next += 1
            state.waiting[id] = promise
            return id
        }
    }

    func unregister(_ id: UInt64) { _ = promises.withLock { $0.waiting.removeValue(forKey: id) } }

    func route(_ report: KafkaDeliveryReport) {
        if report.messageID >= Self.firstPromiseID {
            promises.withLock { $0.waiting.removeValue(forKey: report.messageID) }?.fulfill(report)
        } else {
            handler?(report)
        }
    }
}

/// Called by librdkafka (on the producer's poll thread) once per record.
private let deliveryReportCallback: @convention(c) (OpaquePointer?, UnsafePointer<rd_kafka_message_t>?, UnsafeMutableRawPointer?) -> Void = {
    client, message, _ in
    guard let message, let router = RDKafkaHandle.context(of: client)?.deliveries else { return }
    let messageID = UInt64(UInt(bitPattern: message.pointee._private))
    let error = message.pointee.err
    let topic = message.pointee.rkt.map { String(cString: rd_kafka_topic_name($0)) } ?? ""
    router.route(
        KafkaDeliveryReport(
            messageID: messageID,
            topic: topic,
            partition: message.pointee.partition,
            offset: error == RD_KAFKA_RESP_ERR_NO_ERROR ? message.pointee.offset : nil,
            error: error == RD_KAFKA_RESP_ERR_NO_ERROR ? nil : KafkaError(error, context: "delivery to '\(topic)' failed")
        )
    )
}
