import BlockingIO
import CRdKafka
import Logging

/// Reads one partition from a given offset to its end, outside any consumer group (nothing is committed).
///
/// `read_committed` by default: records of aborted or still open transactions are never returned, and the
/// end is the partition's last stable offset. For reading back a small, known partition, such as the
/// relay's progress records.
public final class KafkaPartitionReader: Sendable {
    public static let defaultProperties: [String: String] = [
        "isolation.level": "read_committed",
        "enable.partition.eof": "true",
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "reconnect.backoff.max.ms": "1000",
    ]

    private let handle: RDKafkaHandle
    private let thread = SerialThread(name: "eventoutbox-kafka-reader")

    /// - Throws: ``KafkaError`` naming a rejected property.
    public init(configuration: KafkaConfiguration, logger: Logger = Logger(label: "eventoutbox.kafka.reader")) throws {
        var properties = configuration.merged(over: Self.defaultProperties)
        // librdkafka wants a group id for any consumer handle; it is never joined (assign, no subscribe).
        properties["group.id"] = properties["group.id"] ?? "eventoutbox-partition-reader"
        let conf = try RDKafkaConfig.make(properties)
        handle = try RDKafkaHandle(type: RD_KAFKA_CONSUMER, conf: conf, context: RDKafkaContext(logger: logger))
        rd_kafka_poll_set_consumer(handle.pointer)
    }

    deinit { thread.stop() }

    /// Every record of `topic`/`partition` from `offset` (default: the beginning) to the end.
    /// - Throws: ``KafkaError`` from the broker (unknown topic or partition, fatal errors), or
    ///   ``KafkaError/Code/timedOut`` if the end is not reached within `timeout` (brokers down).
    public func readToEnd(
        topic: String, partition: Int32, from offset: Int64 = -2, timeout: Duration
    ) async throws -> [KafkaMessage] {
        let deadline = ContinuousClock.now + timeout
        return try await thread.run { [handle] () -> Result<[KafkaMessage], KafkaError> in
            let list = RDKafkaPartitionList([KafkaTopicPartitionOffset(topic: topic, partition: partition, offset: offset)])
            let assigned = rd_kafka_assign(handle.pointer, list.pointer)
            guard assigned == RD_KAFKA_RESP_ERR_NO_ERROR else {
                return .failure(KafkaError(assigned, context: "cannot read \(topic) [\(partition)]"))
            }
            defer { rd_kafka_assign(handle.pointer, nil) }
            var messages: [KafkaMessage] = []
            while ContinuousClock.now < deadline {
                guard let raw = rd_kafka_consumer_poll(handle.pointer, 100) else { continue }
                defer { rd_kafka_message_destroy(raw) }
                let error = raw.pointee.err
                if error == RD_KAFKA_RESP_ERR__PARTITION_EOF { return .success(messages) }
                if error == RD_KAFKA_RESP_ERR_NO_ERROR {
                    messages.append(RDKafkaMessage.decode(raw))
                    continue
                }
                // Brokers down or a leader moving: librdkafka retries; anything else is an answer.
                let kafkaError = KafkaError(error, context: "reading \(topic) [\(partition)]")
                if !kafkaError.isRetriable { return .failure(kafkaError) }
            }
            return .failure(KafkaError(
                code: .timedOut,
                message: "reading \(topic) [\(partition)] did not reach its end in \(timeout) (\(messages.count) records so far); are the brokers up?"))
        }.get()
    }
}
