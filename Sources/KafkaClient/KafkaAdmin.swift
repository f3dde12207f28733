import CRdKafka
import BlockingIO
import Logging

/// Administrative operations (topic creation) over librdkafka's Admin API.
public final class KafkaAdmin: Sendable {
    private let handle: RDKafkaHandle
    private let thread = SerialThread(name: "eventoutbox-kafka-admin")

    deinit { thread.stop() }

    public init(configuration: KafkaConfiguration, logger: Logger = Logger(label: "eventoutbox.kafka.admin")) throws {
        let conf = try RDKafkaConfig.make(configuration.merged(over: [:]))
        handle = try RDKafkaHandle(type: RD_KAFKA_PRODUCER, conf: conf, context: RDKafkaContext(logger: logger))
    }

    /// Creates a topic. With `ifNotExists` (the default), an existing topic is not an error.
    /// - Throws: ``KafkaError`` from the broker (e.g. invalid replication factor) or ``KafkaError/Code/timedOut``.
    public func createTopic(
        _ name: String, partitions: Int32, replicationFactor: Int32 = 1, ifNotExists: Bool = true,
        timeout: Duration = .seconds(10)
    ) async throws {
        let milliseconds = Int32(timeout.components.seconds * 1000)
        let result: KafkaError? = await thread.run { [handle] in
            Self.create(handle.pointer, name, partitions, replicationFactor, milliseconds)
        }
        if let result, !(ifNotExists && result.code == .topicAlreadyExists) { throw result }
    }

    private static func create(
        _ client: OpaquePointer, _ name: String, _ partitions: Int32, _ replication: Int32, _ milliseconds: Int32
    ) -> KafkaError? {
        var errorText = [CChar](repeating: 0, count: 512)
        guard let topic = rd_kafka_NewTopic_new(name, partitions, replication, &errorText, errorText.count) else {
            return KafkaError(code: .invalidArgument, message: "cannot create topic '\(name)': \(RDKafkaConfig.string(errorText))")
        }
        defer { rd_kafka_NewTopic_destroy(topic) }
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
