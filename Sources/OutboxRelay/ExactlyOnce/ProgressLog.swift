import KafkaClient
import Logging

/// The exactly-once relay's progress topic: one partition per unit of ownership, each written only by that
/// unit's transactional producer, so that after the producer's init (which settles whatever an earlier owner
/// left open) the partition's end is the newest committed progress of the unit.
struct ProgressLog: Sendable {
    let topic: String
    /// One per unit: 1, or the relay's `--partitions`.
    let partitions: Int32
    let replicationFactor: Int32
    let kafka: KafkaConfiguration
    let readTimeout: Duration

    /// Creates the topic (compacted: only each unit's newest record matters) unless it exists.
    /// - Throws: ``KafkaError`` when it can be neither created nor found, or has too few partitions, with
    ///   what to do.
    func ensureTopic(logger: Logger) async throws {
        let admin = try KafkaAdmin(configuration: kafka, logger: logger)
        if let existing = try await admin.partitionCount(of: topic, timeout: readTimeout) {
            guard existing >= partitions else {
                throw KafkaError(
                    code: .invalidConfiguration,
                    message: "the relay's progress topic '\(topic)' has \(existing) partitions; \(partitions) are needed "
                        + "(one per relay partition): add partitions to it, or name another with --progress-topic")
            }
            return
        }
        do {
            try await admin.createTopic(
                topic, partitions: partitions, replicationFactor: replicationFactor,
                configs: ["cleanup.policy": "compact"], timeout: readTimeout)
        } catch let error as KafkaError {
            throw KafkaError(
                code: error.code,
                message: "cannot create the relay's progress topic '\(topic)' (\(partitions) partitions, compacted): "
                    + "\(error.message); create it yourself (cleanup.policy=compact, at least \(partitions) partitions) "
                    + "or let the relay's principal create topics")
        }
    }

    /// The record that ends a transaction of `unit`, or claims the unit for a new producer.
    func record(_ progress: RelayProgress, partition: Int32) -> KafkaOutgoingMessage {
        KafkaOutgoingMessage(
            topic: topic, key: Array((progress.claim == true ? RelayProgress.claimKey(progress.unit) : progress.unit).utf8),
            value: progress.encoded(),
            headers: [KafkaHeader(name: RelayProgress.transactionHeader, value: progress.transaction)], partition: partition)
    }

    /// The newest committed progress of `unit` that counts (`nil` if none), read `read_committed`; call it only
    /// after the unit's producer has initialized its transactions and committed its claim.
    func latest(unit: String, partition: Int32, logger: Logger) async throws -> RelayProgress? {
        let reader = try KafkaPartitionReader(configuration: kafka, logger: logger)
        let messages = try await reader.readToEnd(topic: topic, partition: partition, timeout: readTimeout)
        let ours = try messages.compactMap { message -> (key: String?, progress: RelayProgress)? in
            guard message.keyString == unit || message.keyString == RelayProgress.claimKey(unit) else { return nil }
            return (message.keyString, try RelayProgress.decode(message.value, at: "\(topic) [\(partition)] offset \(message.offset)"))
        }
        return RelayProgress.validLatest(ours, unit: unit)
    }
}
