import CRdKafka
import Logging
import Synchronization

/// What librdkafka's C callbacks need from Swift, reached through the client's opaque pointer.
package final class RDKafkaContext: Sendable {
    let logger: Logger
    private let rebalanceSink: Mutex<AsyncStream<KafkaRebalanceEvent>.Continuation?>
    /// Where a producer's delivery reports go (`nil` for other clients).
    let deliveries: KafkaDeliveryRouter?
    /// Told about client-level errors (fatal ones included), on librdkafka's poll thread.
    let errorHandler: (@Sendable (KafkaError) -> Void)?

    /// A context that only logs (for handles that host something, such as the mock cluster).
    package convenience init(logger: Logger) { self.init(logger: logger, rebalanceSink: nil) }

    init(
        logger: Logger, rebalanceSink: AsyncStream<KafkaRebalanceEvent>.Continuation? = nil,
        deliveries: KafkaDeliveryRouter? = nil, errorHandler: (@Sendable (KafkaError) -> Void)? = nil
    ) {
        self.logger = logger
        self.rebalanceSink = Mutex(rebalanceSink)
        self.deliveries = deliveries
        self.errorHandler = errorHandler
    }

    func publish(_ event: KafkaRebalanceEvent) {
        _ = rebalanceSink.withLock { $0?.yield(event) }
    }

    func finishRebalanceEvents() {
        rebalanceSink.withLock {
            $0?.finish()
            $0 = nil
        }
    }
}

/// librdkafka's log lines, forwarded to swift-log with the facility as metadata.
let rdKafkaLogCallback: @convention(c) (OpaquePointer?, Int32, UnsafePointer<CChar>?, UnsafePointer<CChar>?) -> Void = {
    client, level, facility, text in
    guard let context = RDKafkaHandle.context(of: client) else { return }
    var swiftLevel: Logger.Level
    switch level {
    case ...3: swiftLevel = .error  // emerg, alert, crit, err
    case 4: swiftLevel = .warning
    case 5, 6: swiftLevel = .info
    default: swiftLevel = .debug
    }
    let message = text.map { String(cString: $0) } ?? ""
    // librdkafka flags the gapless guarantee as experimental on every start; the relay relies on it on purpose
    // (the Design notes article), so that notice is not worth a warning each time.
    if swiftLevel == .warning, message.contains("enable.gapless.guarantee is experimental") { swiftLevel = .debug }
    context.logger.log(
        level: swiftLevel,
        "\(message)",
        metadata: ["kafka.facility": "\(facility.map { String(cString: $0) } ?? "")"]
    )
}

/// librdkafka's client-level errors (`error_cb`): broker connections lost, all brokers down, and fatal errors,
/// after which the client must be replaced. A fatal error's real code and reason come from
/// `rd_kafka_fatal_error`.
let rdKafkaErrorCallback: @convention(c) (OpaquePointer?, Int32, UnsafePointer<CChar>?, UnsafeMutableRawPointer?) -> Void = {
    client, code, reason, _ in
    guard let context = RDKafkaHandle.context(of: client) else { return }
    var error = KafkaError(rd_kafka_resp_err_t(rawValue: code), context: reason.map { String(cString: $0) } ?? "")
    if code == RD_KAFKA_RESP_ERR__FATAL.rawValue, let client {
        var text = [CChar](repeating: 0, count: 512)
        let fatal = rd_kafka_fatal_error(client, &text, text.count)
        error = KafkaError(code: KafkaError.Code(fatal), message: "fatal: \(RDKafkaConfig.string(text))", isFatal: true)
        context.logger.error("Kafka client hit a fatal error and must be replaced", metadata: ["kafka.error": "\(error)"])
    } else {
        context.logger.warning("Kafka client error", metadata: ["kafka.error": "\(error)"])
    }
    context.errorHandler?(error)
}
