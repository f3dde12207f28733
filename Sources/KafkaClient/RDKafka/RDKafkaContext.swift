import CRdKafka
import Logging
import Synchronization

/// What librdkafka's C callbacks need from Swift, reached through the client's opaque pointer.
final class RDKafkaContext: Sendable {
    let logger: Logger
    private let rebalanceSink: Mutex<AsyncStream<KafkaRebalanceEvent>.Continuation?>

    init(logger: Logger, rebalanceSink: AsyncStream<KafkaRebalanceEvent>.Continuation? = nil) {
        self.logger = logger
        self.rebalanceSink = Mutex(rebalanceSink)
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
    let swiftLevel: Logger.Level
    switch level {
    case ...3: swiftLevel = .error  // emerg, alert, crit, err
    case 4: swiftLevel = .warning
    case 5, 6: swiftLevel = .info
    default: swiftLevel = .debug
    }
    context.logger.log(
        level: swiftLevel,
        "\(text.map { String(cString: $0) } ?? "")",
        metadata: ["kafka.facility": "\(facility.map { String(cString: $0) } ?? "")"]
    )
}
