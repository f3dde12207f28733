import Foundation
import KafkaClient

/// What a `read_committed` consumer sees of a topic written by the exactly-once relay.
///
/// librdkafka's mock cluster writes no transaction markers: its Fetch answers with the log end as last stable
/// offset and no aborted transactions, and its EndTxn ignores commit or abort (rdkafka_mock_handlers.c); nor does
/// it refuse a fenced producer's Produce requests. So on the mock every consumer also sees records of aborted
/// transactions. This view rebuilds what a real broker would show: a record counts only if its transaction
/// (header `eventoutbox-transaction`) ended with a progress record in the relay's progress topic, stored before
/// any newer producer of the same unit claimed it. That is the rule the relay itself applies on restart, so on
/// the mock the view and the relay agree as a real broker and the relay agree on a real cluster.
public struct CommittedView {
    /// Records counted as committed, in the order read.
    public let messages: [KafkaMessage]
    /// Records of transactions without a progress record: what a real broker hides from read_committed readers.
    public let aborted: Int
    /// How often each event id appears among committed records.
    public let counts: [String: Int]

    /// Ids appearing more than once among committed records.
    public var duplicated: [String] { counts.filter { $0.value > 1 }.keys.sorted() }

    /// Keys whose versions are not exactly 1, 2, 3, ... in arrival order (a gap, a repeat, or a reordering).
    public var keysNotExactlyOnceInOrder: [String] {
        var versions: [String: [Int64]] = [:]
        for message in messages {
            guard let key = message.keyString,
                let version = message.header("stream-version")?.stringValue.flatMap({ Int64($0) })
            else { continue }
            versions[key, default: []].append(version)
        }
        return versions.filter { _, list in list != Array(1...Int64(list.count)) }.keys.sorted()
    }

    /// Reads `topic` until every id in `ids` arrived, then the whole progress topic, and keeps what committed.
    public static func read(
        _ ids: [UUID], brokers: String, topic: String, progressTopic: String, progressPartitions: Int32 = 1,
        timeout: Duration = .seconds(120)
    ) async throws -> CommittedView {
        let reader = try await KafkaTopicReader.readAll(ids, brokers: brokers, topic: topic, timeout: timeout)
        let progress = try KafkaPartitionReader(
            configuration: KafkaConfiguration(bootstrapServers: brokers, properties: ["log_level": "3"]))
        // A transaction counts if its progress record is stored before any newer producer generation of its unit
        // claimed the unit (a real broker refuses an older producer's records after that; the mock does not).
        var committed: Set<String> = []
        for partition in 0..<progressPartitions {
            var claimedBy: [String: Substring] = [:]
            for record in try await progress.readToEnd(topic: progressTopic, partition: partition, timeout: timeout) {
                guard let label = record.header("eventoutbox-transaction")?.stringValue, let key = record.keyString,
                    let dot = label.lastIndex(of: ".")
                else { continue }
                let generation = label[..<dot]
                if key.hasSuffix("#claim") {
                    claimedBy[String(key.dropLast("#claim".count))] = generation
                } else if claimedBy[key].map({ $0 == generation }) ?? true {
                    committed.insert(label)
                }
            }
        }
        var kept: [KafkaMessage] = []
        var aborted = 0
        for message in reader.messages {
            if let label = message.header("eventoutbox-transaction")?.stringValue, committed.contains(label) {
                kept.append(message)
            } else {
                aborted += 1
            }
        }
        var counts: [String: Int] = [:]
        for message in kept {
            if let id = message.header("event-id")?.stringValue { counts[id, default: 0] += 1 }
        }
        return CommittedView(messages: kept, aborted: aborted, counts: counts)
    }

    /// Every id exactly once, nothing else.
    public func isExactly(_ ids: [UUID]) -> Bool {
        Set(counts.keys) == Set(ids.map { $0.uuidString.lowercased() }) && duplicated.isEmpty
    }
}
