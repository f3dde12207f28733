import Foundation
import LibPQ

/// What one Kafka transaction of an exactly-once relay covered, written as the last record of that same
/// transaction to the relay's progress topic (keyed by ``unit``).
///
/// Kafka commits it with the rows or not at all, so the newest committed progress record says exactly what
/// Kafka holds beyond what the database may know: a relay (re)starting reads it back and brings the database in
/// line (marks those rows, or confirms its slot to that position) before it publishes anything.
struct RelayProgress: Sendable, Hashable, Codable {
    /// The unit of ownership, named by its `transactional.id` (the relay's lock, one partition, or one slot); the
    /// record's key.
    var unit: String
    /// Names the Kafka transaction: every record of it carries this in the ``transactionHeader`` header.
    var transaction: String
    /// Table source: the outbox ids the transaction published.
    var outboxIDs: IDRanges?
    /// WAL source: the commit end of the last PostgreSQL transaction it published, whole.
    var walPosition: String?
    /// A claim: written by a new producer right after its init, before it reads the progress back. It covers
    /// nothing; it marks where that producer's ownership begins (see ``validLatest(_:unit:)``).
    var claim: Bool?

    /// The header naming the Kafka transaction a record was published in.
    static let transactionHeader = "eventoutbox-transaction"

    var walLSN: PostgresLSN? { walPosition.flatMap(PostgresLSN.init) }

    enum CodingKeys: String, CodingKey {
        case unit, transaction
        case outboxIDs = "outbox_ids"
        case walPosition = "wal_position"
        case claim
    }

    /// The producer generation that wrote this record: the transaction label without its last part.
    var generation: Substring {
        transaction.lastIndex(of: ".").map { transaction[..<$0] } ?? transaction[...]
    }

    /// The key of a unit's claims, apart from its progress records so that compaction keeps the newest of each.
    static func claimKey(_ unit: String) -> String { unit + "#claim" }

    /// The newest progress record of `unit` that counts, from its partition's records in order: a record
    /// counts unless a newer producer generation had claimed the unit before it was stored. A real broker
    /// never stores such a record (the older producer is fenced), but a test broker that does not check
    /// producer epochs on Produce (librdkafka's mock) does: this keeps the relay right there too.
    static func validLatest(_ records: [(key: String?, progress: RelayProgress)], unit: String) -> RelayProgress? {
        var claimedBy: Substring?
        var latest: RelayProgress?
        for (key, progress) in records {
            if key == claimKey(unit), progress.claim == true {
                claimedBy = progress.generation
            } else if key == unit, claimedBy == nil || progress.generation == claimedBy {
                latest = progress
            }
        }
        return latest
    }

    func encoded() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        // Encoding a struct of strings cannot fail.
        return Array(try! encoder.encode(self))
    }

    /// Reads a progress record's value.
    /// - Throws: ``RelayProgressError`` naming the record, when it is not one this relay wrote.
    static func decode(_ value: [UInt8]?, at location: String) throws -> RelayProgress {
        guard let value, let progress = try? JSONDecoder().decode(RelayProgress.self, from: Data(value)),
            progress.walPosition.map({ PostgresLSN($0) != nil }) ?? true
        else {
            let text = value.map { String(decoding: $0.prefix(200), as: UTF8.self) } ?? "(null)"
            throw RelayProgressError(
                message: "progress record at \(location) is not a relay progress record: \(text); "
                    + "the progress topic must be written only by outbox-relay")
        }
        return progress
    }
}

struct RelayProgressError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// A set of outbox ids written as ranges (`"1-40,42,50-51"`): a batch's ids are mostly consecutive, so a
/// progress record stays small whatever the batch size.
struct IDRanges: Sendable, Hashable, Codable, CustomStringConvertible {
    private(set) var ranges: [ClosedRange<Int64>]

    init<S: Sequence<Int64>>(_ ids: S) {
        var ranges: [ClosedRange<Int64>] = []
        for id in ids.sorted() {
            if let last = ranges.last, id <= last.upperBound &+ 1 {
                if id > last.upperBound { ranges[ranges.count - 1] = last.lowerBound...id }
            } else {
                ranges.append(id...id)
            }
        }
        self.ranges = ranges
    }

    var ids: [Int64] { ranges.flatMap { Array($0) } }
    var count: Int { ranges.reduce(0) { $0 + $1.count } }
    func contains(_ id: Int64) -> Bool { ranges.contains { $0.contains(id) } }

    var description: String {
        ranges.map { $0.lowerBound == $0.upperBound ? "\($0.lowerBound)" : "\($0.lowerBound)-\($0.upperBound)" }
            .joined(separator: ",")
    }

    /// Parses ``description``'s form; `nil` if `text` is not one.
    init?(parsing text: String) {
        var ranges: [ClosedRange<Int64>] = []
        if text.isEmpty {
            self.ranges = []
            return
        }
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            // A leading '-' would be a negative id: outbox ids are positive.
            let bounds = part.split(separator: "-", omittingEmptySubsequences: false)
            guard (1...2).contains(bounds.count), let low = Int64(bounds[0]), let high = Int64(bounds.last!), low > 0,
                low <= high, ranges.last.map({ $0.upperBound < low }) ?? true
            else { return nil }
            ranges.append(low...high)
        }
        self.ranges = ranges
    }

    init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let parsed = IDRanges(parsing: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not id ranges: \(text.prefix(100))"))
        }
        self = parsed
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
