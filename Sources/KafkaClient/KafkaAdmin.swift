import CRdKafka
import BlockingIO
import Logging

/// Administrative operations (topic creation) over librdkafka's Admin API.
public final class KafkaAdmin: Sendable {
    private let handle: RDKafkaHandle
    private let thread = SerialThread(name: "eventoutbox-kafka-admin")

    deinit { thread.stop() }

    public init(configuration: KafkaConfiguration, logger: Logger = Logger(label: "eventoutbox.kafka.admin")) throws {
        // Looking a topic up must not create it (brokers with auto.create.topics.enable).
        let conf = try RDKafkaConfig.make(configuration.merged(over: ["allow.auto.create.topics": "false"]))
        handle = try RDKafkaHandle(type: RD_KAFKA_PRODUCER, conf: conf, context: RDKafkaContext(logger: logger))
    }

    /// Creates a topic. With `ifNotExists` (the default), an existing topic is not an error.
    /// - Parameters:
    ///   - name: the topic.
    ///   - partitions: its partition count.
    ///   - replicationFactor: copies of each partition.
    ///   - configs: topic configuration, e.g. `["cleanup.policy": "compact"]`.
    ///   - ifNotExists: whether an existing topic is fine.
    ///   - timeout: the longest wait for the broker's answer.
    /// - Throws: ``KafkaError`` from the broker (e.g. invalid replication factor) or ``KafkaError/Code/timedOut``.
    public func createTopic(
        _ name: String, partitions: Int32, replicationFactor: Int32 = 1, configs: [String: String] = [:],
        ifNotExists: Bool = true, timeout: Duration = .seconds(10)
    ) async throws {
        let milliseconds = timeout.clampedMilliseconds
        let result: KafkaError? = await thread.run { [handle] in
            Self.create(handle.pointer, name, partitions, replicationFactor, configs, milliseconds)
        }
        if let result, !(ifNotExists && result.code == .topicAlreadyExists) { throw result }
    }

    /// The number of partitions of `topic`, or `nil` if the brokers do not know it.
    /// - Throws: ``KafkaError`` when the brokers cannot be asked (down, timed out, not authorized).
    public func partitionCount(of topic: String, timeout: Duration = .seconds(10)) async throws -> Int32? {
        let milliseconds = timeout.clampedMilliseconds
        return try await thread.run { [handle] () -> Result<Int32?, KafkaError> in
            guard let topicHandle = rd_kafka_topic_new(handle.pointer, topic, nil) else {
                return .failure(KafkaError(code: .invalidArgument, message: "'\(topic)' is not a valid topic name"))
            }
            defer { rd_kafka_topic_destroy(topicHandle) }
            var metadata: UnsafePointer<rd_kafka_metadata>?
            let error = rd_kafka_metadata(handle.pointer, 0, topicHandle, &metadata, milliseconds)
            guard error == RD_KAFKA_RESP_ERR_NO_ERROR, let metadata else {
                return .failure(KafkaError(error, context: "cannot look up topic '\(topic)'"))
            }
            defer { rd_kafka_metadata_destroy(metadata) }
            guard metadata.pointee.topic_cnt > 0 else { return .success(nil) }
            let entry = metadata.pointee.topics[0]
            if entry.err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART || entry.partition_cnt == 0 { return .success(nil) }
            guard entry.err == RD_KAFKA_RESP_ERR_NO_ERROR else {
                return .failure(KafkaError(entry.err, context: "cannot look up topic '\(topic)'"))
            }
            return .success(entry.partition_cnt)
        }.get()
    }

    private static func create(
        _ client: OpaquePointer, _ name: String, _ partitions: Int32, _ replication: Int32,
        _ configs: [String: String], _ milliseconds: Int32
    ) -> KafkaError? {
        var errorText = [CChar](repeating: 0, count: 512)
        guard let topic = rd_kafka_NewTopic_new(name, partitions, replication, &errorText, errorText.count) else {
            return KafkaError(code: .invalidArgument, message: "cannot create topic '\(name)': \(RDKafkaConfig.string(errorText))")
        }
        defer { rd_kafka_NewTopic_destroy(topic) }
        for (key, value) in configs.sorted(by: { $0.key < $1.key }) {
            let error = rd_kafka_NewTopic_set_config(topic, key, value)
            guard error == RD_KAFKA_RESP_ERR_NO_ERROR else {
                return KafkaError(error, context: "cannot set \(key)=\(value) on new topic '\(name)'")
            }
        }
        let resultQueue = rd_kafka_queue_new(client)
        defer { rd_kafka_queue_destroy(resultQueue) }
        var topics: [OpaquePointer?] = [topic]
        rd_kafka_CreateTopics(client, &topics, 1, nil, resultQueue)
        guard let event = rd_kafka_queue_poll(resultQueue, milliseconds) else {
            return KafkaError(code: .timedOut, message: "creating topic '\(name)' got no answer in \(milliseconds) ms")
        }
        defer { rd_kafka_event_destroy(event) }
        if rd_kafka_event_error(event) != RD_KAFKA_RESP_ERR_NO_ERROR {
            return KafkaError(rd_kafka_event_error(event), context: "creating topic '\(name)' failed")
        }
        guard let result = rd_kafka_event_CreateTopics_result(event) else { return nil }
        var count = 0
        guard let results = rd_kafka_CreateTopics_result_topics(result, &count), count > 0, let first = results[0] else {
            return nil
        }
        let error = rd_kafka_topic_result_error(first)
        guard error != RD_KAFKA_RESP_ERR_NO_ERROR else { return nil }
        let detail = rd_kafka_topic_result_error_string(first).map { String(cString: $0) } ?? ""
        return KafkaError(code: .init(error), message: "creating topic '\(name)' failed: \(detail)")
    }
}
