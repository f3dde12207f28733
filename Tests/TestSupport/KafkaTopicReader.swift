import Foundation
import KafkaClient

/// Reads a topic from the beginning with a fresh consumer group and keeps everything it received.
public final class KafkaTopicReader {
    public let consumer: KafkaConsumer
    public private(set) var messages: [KafkaMessage] = []
    /// Distinct `event-id` header values received (kept as messages arrive; conditions read it often).
    public private(set) var eventIDs: Set<String> = []

    public init(brokers: String, topic: String) throws {
        consumer = try KafkaConsumer(
            configuration: KafkaConfiguration(
                bootstrapServers: brokers,
                // A short session bounds the mock's rebalance waits (the session timeout less 1 s) on a busy machine.
                properties: ["allow.auto.create.topics": "true", "log_level": "3", "session.timeout.ms": "6000", "heartbeat.interval.ms": "500"]),
            groupID: uniqueName("reader"))
        try consumer.subscribe(topics: [topic])
    }

    /// Polls until `condition` holds over everything received so far; throws after `timeout`.
    public func read(
        until what: String, timeout: Duration = .seconds(60), _ condition: ([KafkaMessage]) -> Bool
    ) async throws {
        let deadline = ContinuousClock.now + timeout
        while !condition(messages) {
            guard ContinuousClock.now < deadline else {
                throw DeadlineExceeded(what: "\(what) (received \(messages.count) messages)", timeout: timeout)
            }
            // Everything already fetched, in one hop to the consumer's thread. Taking one record per hop, a reader
            // once had 1,435 of 10,000 records after 120 s, connected all along, while the whole suite ran on two
            // busy cores (every record the relay had sent was stored).
            for message in try await consumer.poll(upTo: 1000, timeout: .milliseconds(100)) {
                messages.append(message)
                if let id = message.header("event-id")?.stringValue { eventIDs.insert(id) }
            }
        }
    }

    /// For each key, the `stream-version` headers in arrival order.
    public var versionsByKey: [String: [Int64]] {
        var result: [String: [Int64]] = [:]
        for message in messages {
            guard let key = message.keyString, let version = message.header("stream-version")?.stringValue.flatMap({ Int64($0) })
            else { continue }
            result[key, default: []].append(version)
        }
        return result
    }

    /// Keys whose stream a consumer that skips event ids it has seen would get out of order: each version's
    /// first arrival must come right after the previous version's (1, 2, 3, ...), no gap, no overtaking.
    /// Replays of versions already seen (at-least-once after a crash or a producer restart) are allowed.
    public var keysOutOfOrder: [String] {
        versionsByKey.filter { _, versions in
            var next: Int64 = 1
            for version in versions where version >= next {
                guard version == next else { return true }
                next += 1
            }
            return false
        }.keys.sorted()
    }

    public func close() async { await consumer.close() }
}

extension KafkaTopicReader {
    /// Reads `topic` from the start until every id in `ids` has arrived; returns the reader for assertions
    /// (closed already).
    public static func readAll(
        _ ids: [UUID], brokers: String, topic: String, timeout: Duration = .seconds(120)
    ) async throws -> KafkaTopicReader {
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        let wanted = Set(ids.map { $0.uuidString.lowercased() })
        try await reader.read(until: "every event id", timeout: timeout) { _ in reader.eventIDs.isSuperset(of: wanted) }
        await reader.close()
        return reader
    }
}
