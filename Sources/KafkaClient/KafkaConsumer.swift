import CRdKafka
import BlockingIO
import Logging

/// A partition of a topic.
public struct KafkaTopicPartition: Sendable, Hashable {
    public var topic: String
    public var partition: Int32

    public init(topic: String, partition: Int32) {
        self.topic = topic
        self.partition = partition
    }
}

/// A change in the partitions assigned to this consumer by its group.
public enum KafkaRebalanceEvent: Sendable, Equatable {
    case assigned([KafkaTopicPartition])
    case revoked([KafkaTopicPartition])
    case failed(String)
}

/// A consumer-group member over librdkafka, with manual offset commits.
///
/// Auto-commit is off by default: offsets move only when you call ``commit(_:)-(KafkaMessage)``, so a record
/// counts as consumed only after your own processing has finished. A new group starts at the earliest offset.
///
/// `rd_kafka_consumer_poll`, commit and close block; they run on the consumer's own thread
/// (`SerialThread`), never on Swift's cooperative pool. Rebalances are handled (assign/revoke) inside poll and announced on
/// ``rebalanceEvents``.
public final class KafkaConsumer: Sendable {
    public static let defaultProperties: [String: String] = [
        "enable.auto.commit": "false",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": "false",
        // librdkafka's default too, stated because it matters: records of aborted transactions (an exactly-once
        // relay's, after a crash or a fault) are never delivered. Java's default is read_uncommitted.
        "isolation.level": "read_committed",
        // librdkafka backs off up to 10 s between reconnects; after an outage that is up to 10 s more of
        // nothing once the brokers are back. 1 s is the Java client's ceiling too.
        "reconnect.backoff.max.ms": "1000",
    ]

    public let groupID: String
    /// Assignments and revocations, in the order they happened (the newest 256 are kept if nobody reads).
    public let rebalanceEvents: AsyncStream<KafkaRebalanceEvent>
    private let handle: RDKafkaHandle
    private let thread = SerialThread(name: "eventoutbox-kafka-consumer")
    private let logger: Logger

    /// Creates a consumer in group `groupID`.
    /// - Throws: ``KafkaError`` naming a rejected property.
    public init(
        configuration: KafkaConfiguration, groupID: String,
        logger: Logger = Logger(label: "eventoutbox.kafka.consumer")
    ) throws {
        var properties = configuration.merged(over: Self.defaultProperties)
        properties["group.id"] = groupID
        let conf = try RDKafkaConfig.make(properties)
        rd_kafka_conf_set_rebalance_cb(conf, rebalanceCallback)
        let (stream, sink) = AsyncStream.makeStream(of: KafkaRebalanceEvent.self, bufferingPolicy: .bufferingNewest(256))
        handle = try RDKafkaHandle(
            type: RD_KAFKA_CONSUMER, conf: conf, context: RDKafkaContext(logger: logger, rebalanceSink: sink))
        rd_kafka_poll_set_consumer(handle.pointer)  // one queue: messages, rebalances and errors all come from poll
        self.groupID = groupID
        self.rebalanceEvents = stream
        self.logger = logger
    }

    /// Joins the group for these topics (replaces any earlier subscription).
    public func subscribe(topics: [String]) throws {
        let list = RDKafkaPartitionList(topics.map { KafkaTopicPartitionOffset(topic: $0, partition: -1, offset: -1001) })
        let error = rd_kafka_subscribe(handle.pointer, list.pointer)
        guard error == RD_KAFKA_RESP_ERR_NO_ERROR else {
            throw KafkaError(error, context: "cannot subscribe group '\(groupID)' to \(topics)")
        }
    }

    /// Waits up to `timeout` for the next record. Returns `nil` if none arrived. Transient errors (a broker
    /// that is down) are logged and retried by librdkafka; only fatal errors are thrown.
    public func poll(timeout: Duration) async throws -> KafkaMessage? {
        try await poll(upTo: 1, timeout: timeout).first
    }

    /// Waits up to `timeout` for a record, then takes the records already fetched, up to `limit` in all, in one
    /// hop to the consumer's thread. Returns `[]` if none arrived. Errors as ``poll(timeout:)``; a fatal error
    /// drops the records taken with it (their offsets were not committed: they are delivered again).
    public func poll(upTo limit: Int, timeout: Duration) async throws -> [KafkaMessage] {
        let milliseconds = timeout.clampedMilliseconds
        let (messages, error) = await onQueue { [handle] () -> ([KafkaMessage], KafkaError?) in
            var messages: [KafkaMessage] = []
            while messages.count < limit {
                guard let raw = rd_kafka_consumer_poll(handle.pointer, messages.isEmpty ? milliseconds : 0) else { break }
                defer { rd_kafka_message_destroy(raw) }
                if raw.pointee.err != RD_KAFKA_RESP_ERR_NO_ERROR {
                    if raw.pointee.err == RD_KAFKA_RESP_ERR__FATAL {
                        // The underlying error and its reason, not just "Fatal error".
                        var text = [CChar](repeating: 0, count: 512)
                        let code = rd_kafka_fatal_error(handle.pointer, &text, text.count)
                        return ([], KafkaError(
                            code: KafkaError.Code(code), message: "fatal consumer error: \(RDKafkaConfig.string(text)); the consumer must be recreated",
                            isFatal: true))
                    }
                    return (messages, KafkaError(raw.pointee.err, context: "consumer poll"))
                }
                messages.append(RDKafkaMessage.decode(raw))
            }
            return (messages, nil)
        }
        if let error {
            if error.isFatal { throw error }
            logger.info("consumer error, librdkafka retries", metadata: ["kafka.error": "\(error)"])
        }
        return messages
    }

    /// Makes librdkafka raise a fatal error on this consumer (`rd_kafka_test_fatal_error`), as a fenced member
    /// would see one: the next ``poll(timeout:)`` throws it. For tests of what callers do then.
    /// librdkafka's name of this client, e.g. `rdkafka#consumer-3` (its log lines carry it).
    package var clientName: String { handle.name }

    @_spi(Testing) public func raiseFatalErrorForTesting(_ reason: String) {
        _ = rd_kafka_test_fatal_error(handle.pointer, RD_KAFKA_RESP_ERR__INVALID_ARG, reason)
    }

    /// Commits the position after `message` (its offset + 1), synchronously.
    public func commit(_ message: KafkaMessage) async throws {
        try await commit([KafkaTopicPartitionOffset(topic: message.topic, partition: message.partition, offset: message.offset + 1)])
    }

    /// Commits positions (each the offset of the next record to read), synchronously.
    public func commit(_ offsets: [KafkaTopicPartitionOffset]) async throws {
        guard !offsets.isEmpty else { return }
        let error = await onQueue { [handle] in
            let list = RDKafkaPartitionList(offsets)
            return rd_kafka_commit(handle.pointer, list.pointer, 0)
        }
        guard error == RD_KAFKA_RESP_ERR_NO_ERROR else {
            throw KafkaError(error, context: "commit of \(offsets.count) offsets for group '\(groupID)' failed")
        }
    }

    /// The group's committed positions for these partitions (`-1001`, librdkafka's "invalid", if none).
    public func committed(_ partitions: [KafkaTopicPartition], timeout: Duration = .seconds(10)) async throws
        -> [KafkaTopicPartitionOffset]
    {
        let milliseconds = timeout.clampedMilliseconds
        return try await onQueue { [handle, groupID] () -> Result<[KafkaTopicPartitionOffset], KafkaError> in
            let list = RDKafkaPartitionList(partitions.map { .init(topic: $0.topic, partition: $0.partition, offset: -1001) })
            let error = rd_kafka_committed(handle.pointer, list.pointer, milliseconds)
            guard error == RD_KAFKA_RESP_ERR_NO_ERROR else {
                return .failure(KafkaError(error, context: "cannot read committed offsets of group '\(groupID)'"))
            }
            return .success(list.entries)
        }.get()
    }

    /// The partitions currently assigned to this consumer.
    public func assignment() async throws -> [KafkaTopicPartition] {
        try await onQueue { [handle] () -> Result<[KafkaTopicPartition], KafkaError> in
            var raw: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?
            let error = rd_kafka_assignment(handle.pointer, &raw)
            guard error == RD_KAFKA_RESP_ERR_NO_ERROR, let raw else {
                return .failure(KafkaError(error, context: "cannot read assignment"))
            }
            return .success(RDKafkaPartitionList(taking: raw).entries.map { .init(topic: $0.topic, partition: $0.partition) })
        }.get()
    }

    /// Records not yet consumed per assigned partition: high watermark minus this consumer's position, from
    /// librdkafka's cached watermarks (no broker round trip). Partitions without a position yet are left out.
    public func lag() async -> [KafkaTopicPartition: Int64] {
        await onQueue { [handle] in
            var raw: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?
            guard rd_kafka_assignment(handle.pointer, &raw) == RD_KAFKA_RESP_ERR_NO_ERROR, let raw else { return [:] }
            let list = RDKafkaPartitionList(taking: raw)
            rd_kafka_position(handle.pointer, list.pointer)
            var result: [KafkaTopicPartition: Int64] = [:]
            for entry in list.entries where entry.offset >= 0 {
                var low: Int64 = -1
                var high: Int64 = -1
                if rd_kafka_get_watermark_offsets(handle.pointer, entry.topic, entry.partition, &low, &high)
                    == RD_KAFKA_RESP_ERR_NO_ERROR, high >= 0
                {
                    result[KafkaTopicPartition(topic: entry.topic, partition: entry.partition)] = max(0, high - entry.offset)
                }
            }
            return result
        }
    }

    /// Leaves the group (revoking partitions) and stops the consumer. Commit your offsets before.
    public func close() async {
        let error = await onQueue { [handle] in rd_kafka_consumer_close(handle.pointer) }
        if error != RD_KAFKA_RESP_ERR_NO_ERROR {
            logger.warning("consumer close reported an error", metadata: ["kafka.error": "\(KafkaError(error, context: "close"))"])
        }
        handle.context.finishRebalanceEvents()
    }

    deinit { thread.stop() }

    private func onQueue<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
        await thread.run(work)
    }
}

/// Called by librdkafka inside `rd_kafka_consumer_poll` when the group changes this member's partitions.
private let rebalanceCallback: @convention(c) (
    OpaquePointer?, rd_kafka_resp_err_t, UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?, UnsafeMutableRawPointer?
) -> Void = { client, error, partitions, _ in
    guard let client else { return }
    let context = RDKafkaHandle.context(of: client)
    let list = partitions.map { RDKafkaPartitionList.entries(of: $0).map { KafkaTopicPartition(topic: $0.topic, partition: $0.partition) } } ?? []
    let cooperative = String(cString: rd_kafka_rebalance_protocol(client)) == "COOPERATIVE"
    switch error {
    case RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS:
        if cooperative {
            if let failure = rd_kafka_incremental_assign(client, partitions) { rd_kafka_error_destroy(failure) }
        } else {
            rd_kafka_assign(client, partitions)
        }
        context?.publish(.assigned(list))
    case RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS:
        if cooperative {
            if let failure = rd_kafka_incremental_unassign(client, partitions) { rd_kafka_error_destroy(failure) }
        } else {
            rd_kafka_assign(client, nil)
        }
        context?.publish(.revoked(list))
    default:
        rd_kafka_assign(client, nil)
        context?.publish(.failed(String(cString: rd_kafka_err2str(error))))
    }
}
