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
    /// Records counted as committed, partition by partition, each in offset order.
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

    /// Reads the progress topic, then every partition of `topic` to its end, and keeps what committed; repeats
    /// until every id in `ids` is among the committed records (a relay may still be writing) or `timeout` passes,
    /// then returns what it has for the caller's assertions.
    ///
    /// Reading every partition to its end matters: an id's first copy can sit in an aborted transaction (the
    /// mock keeps it) while its committed copy lies further on in another partition; a reader that stops once
    /// every id has appeared somewhere would miss that copy.
    public static func read(
        _ ids: [UUID], brokers: String, topic: String, progressTopic: String, progressPartitions: Int32 = 1,
        timeout: Duration = .seconds(120)
    ) async throws -> CommittedView {
        let configuration = KafkaConfiguration(bootstrapServers: brokers, properties: ["log_level": "3"])
        let reader = try KafkaPartitionReader(configuration: configuration)
        guard let partitions = try await KafkaAdmin(configuration: configuration).partitionCount(of: topic) else {
            throw KafkaError(code: .unknownTopicOrPartition, message: "topic \(topic) does not exist")
        }
        let wanted = Set(ids.map { $0.uuidString.lowercased() })
        let deadline = ContinuousClock.now + timeout
        while true {
            let committed = try await committedTransactions(
                reader, progressTopic: progressTopic, partitions: progressPartitions, timeout: timeout)
            var records: [KafkaMessage] = []
            for partition in 0..<partitions {
                records += try await reader.readToEnd(topic: topic, partition: partition, timeout: timeout)
            }
            let view = CommittedView(records, committed: committed)
            if Set(view.counts.keys).isSuperset(of: wanted) || ContinuousClock.now >= deadline { return view }
            try await Task.sleep(for: .milliseconds(200))
        }
    }

    /// Labels of the transactions that count: their progress record is stored before any newer producer
    /// generation of their unit claimed the unit (a real broker refuses an older producer's records after
    /// that; the mock does not).
    private static func committedTransactions(
        _ reader: KafkaPartitionReader, progressTopic: String, partitions: Int32, timeout: Duration
    ) async throws -> Set<String> {
        var committed: Set<String> = []
        for partition in 0..<partitions {
            var claimedBy: [String: Substring] = [:]
            for record in try await reader.readToEnd(topic: progressTopic, partition: partition, timeout: timeout) {
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
        return committed
    }

    private init(_ records: [KafkaMessage], committed: Set<String>) {
        var kept: [KafkaMessage] = []
        var aborted = 0
        for message in records {
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
        self.init(messages: kept, aborted: aborted, counts: counts)
    }

    private init(messages: [KafkaMessage], aborted: Int, counts: [String: Int]) {
        self.messages = messages
        self.aborted = aborted
        self.counts = counts
    }

    /// Every id exactly once, nothing else.
    public func isExactly(_ ids: [UUID]) -> Bool {
        Set(counts.keys) == Set(ids.map { $0.uuidString.lowercased() }) && duplicated.isEmpty
    }
}
