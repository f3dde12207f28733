import EventStore
import KafkaClient
import OutboxRelayStore

/// What a relay has handed to one Kafka producer, and the rules that keep every stream in order.
///
/// Pure state, no I/O: ``TablePipelinedSource`` feeds it fetched rows and delivery reports and acts on what it answers.
///
/// Order per stream rests on three rules:
/// - A row is sent only if no earlier row of its stream is still waiting unsent. The pipeline remembers the
///   last row it sent of each stream: the next version needs no check; any other row (a stream not seen yet,
///   or versions that do not follow) is checked in the database first (``rangesToCheck(_:)``). A waiting row
///   in between is a hole (its transaction took a lower id and committed after the fetch cursor passed it):
///   the row is skipped and its stream held. The relay then fetches the waiting rows behind the cursor that
///   are not in flight (the late row first, in id order) and admits them by the same rules; with nothing in
///   flight it simply starts again from the first waiting row.
/// - After the first failed delivery nothing more is sent on this producer: the relay purges it, waits for
///   every report, and starts a new producer from the rows still waiting in the database.
/// - Within one producer, librdkafka's idempotent producer (gapless, no message timeout) never lets record
///   n+1 of a partition be stored once record n has failed. A delivery that contradicts that is counted in
///   ``orderViolations`` (it would come from a setting such as `message.timeout.ms` > 0).
struct PublishPipeline {
    /// The highest outbox id taken; the next fetch continues above it.
    private(set) var cursor: Int64 = 0
    /// Rows handed to the producer whose reports have not arrived, by outbox id (the Kafka message id).
    private(set) var inFlight: [Int64: OutboxRow] = [:]
    /// A row was passed over (a hole before it, or its stream was refused): rescan from the start once
    /// nothing is in flight.
    private(set) var needsRescan = false
    /// The first failed delivery of this producer; once set, ``admit(_:)`` admits nothing.
    private(set) var failure: KafkaError?
    /// Rows stored by Kafka after an earlier row of their stream failed on the same producer.
    private(set) var orderViolations = 0
    /// Streams with a failed delivery on this producer.
    private var failedStreams: Set<String> = []
    /// Streams whose row was refused before it was enqueued; their later rows wait for the rescan.
    private var blockedStreams: Set<String> = []

    var isIdle: Bool { inFlight.isEmpty }

    /// Whether skipped ids are tracked (off for a partitioned relay: other partitions' rows look like gaps).
    let tracksGaps: Bool
    /// Ids the cursor passed without a row, with when that was seen: a transaction that took the id had not
    /// committed yet (or rolled back). Each fetch looks at them again for ``gapLifetime``, so a late commit
    /// goes out at once instead of when its stream's next row reveals the hole. Rolled-back ids expire.
    private(set) var gaps: [Int64: ContinuousClock.Instant] = [:]
    static let gapLifetime: Duration = .seconds(10)
    /// A longer run of missing ids is rows published or dead-lettered before, not open transactions.
    static let maxGapRun: Int64 = 1000
    static let maxGaps = 10_000

    init(tracksGaps: Bool = true) { self.tracksGaps = tracksGaps }

    /// The skipped ids to look at again with the next fetch (expired ones dropped).
    mutating func gapsToRecheck(now: ContinuousClock.Instant = .now) -> [Int64] {
        gaps = gaps.filter { now - $0.value < Self.gapLifetime }
        return gaps.keys.sorted()
    }

    /// Records which ids a fetch above `previousCursor` skipped, and which looked-for ids turned up.
    mutating func noteFetched(_ rows: [OutboxRow], after previousCursor: Int64, now: ContinuousClock.Instant = .now) {
        guard tracksGaps else { return }
        var expected: Int64? = previousCursor > 0 ? previousCursor + 1 : nil
        for row in rows {
            gaps.removeValue(forKey: row.id)
            guard row.id > previousCursor else { continue }
            if let first = expected, row.id > first, row.id - first <= Self.maxGapRun, gaps.count < Self.maxGaps {
                for id in first..<row.id { gaps[id] = now }
            }
            expected = row.id + 1
        }
    }

    /// The ranges to look up (``OutboxTable/streamsWithWaitingRows(in:on:)``) before `rows` (a fetch result,
    /// id order) can be admitted: one per row whose predecessor this pipeline has not just sent.
    func rangesToCheck(_ rows: [OutboxRow]) -> [OutboxTable.StreamRange] {
        var latest: [String: SentRow] = [:]
        var ranges: [OutboxTable.StreamRange] = []
        for row in rows {
            let previous = latest[row.streamID] ?? lastSent[row.streamID]
            if !Self.follows(row, previous) {
                ranges.append(.init(streamID: row.streamID, afterID: previous?.id ?? 0, beforeID: row.id))
            }
            latest[row.streamID] = SentRow(id: row.id, version: row.streamVersion)
        }
        return ranges
    }

    /// Of `rows` (the same fetch result), the ones that may be sent now, in order, given the streams the
    /// database found holes in. Moves the cursor past all of them.
    mutating func admit(_ rows: [OutboxRow], holes: Set<String>) -> [OutboxRow] {
        if lastSent.count > Self.rememberedStreams { lastSent.removeAll() }  // bounded; forgetting only costs checks
        var admitted: [OutboxRow] = []
        for row in rows {
            cursor = max(cursor, row.id)
            guard failure == nil, !blockedStreams.contains(row.streamID) else {
                needsRescan = true
                continue
            }
            if !Self.follows(row, lastSent[row.streamID]) && holes.contains(row.streamID) {
                blockedStreams.insert(row.streamID)
                needsRescan = true
                continue
            }
            admitted.append(row)
            lastSent[row.streamID] = SentRow(id: row.id, version: row.streamVersion)
        }
        return admitted
    }

    private struct SentRow {
        var id: Int64
        var version: Int64
    }
    /// Per stream, the last row handed to this producer.
    private var lastSent: [String: SentRow] = [:]
    private static let rememberedStreams = 100_000

    /// Whether `row` is the version right after `previous` (or a stream's first version): nothing can be
    /// waiting between them.
    private static func follows(_ row: OutboxRow, _ previous: SentRow?) -> Bool {
        guard let previous else { return row.streamVersion == 1 }
        return row.streamVersion == previous.version + 1
    }

    /// The producer accepted `row`.
    mutating func sent(_ row: OutboxRow) {
        inFlight[row.id] = row
    }

    /// The producer refused `row` before enqueueing it: its stream sends nothing more until the rescan.
    mutating func refused(_ row: OutboxRow) {
        blockedStreams.insert(row.streamID)
        needsRescan = true
    }

    /// Whether a row of this stream may still be enqueued in the current pass.
    func mayEnqueue(_ row: OutboxRow) -> Bool { failure == nil && !blockedStreams.contains(row.streamID) }

    /// What a delivery report means for the outbox.
    enum ReportOutcome {
        /// Stored by Kafka: mark the row.
        case delivered(OutboxTable.Delivery)
        /// The first failure of its stream on this producer, and one that sending again cannot fix.
        case deadLetter(OutboxRow, KafkaError)
        /// Failed; the row stays waiting and goes out again on the next producer.
        case retry(OutboxRow)
        /// Not a row of this pipeline (a report after the pipeline was reset).
        case unknown
    }

    mutating func record(_ report: KafkaDeliveryReport) -> ReportOutcome {
        guard let row = inFlight.removeValue(forKey: Int64(report.messageID)) else { return .unknown }
        guard let error = report.error else {
            if failedStreams.contains(row.streamID) { orderViolations += 1 }
            return .delivered(.init(id: row.id, partition: report.partition, offset: report.offset ?? -1))
        }
        if failure == nil { failure = error }
        let firstOfStream = failedStreams.insert(row.streamID).inserted
        return firstOfStream && error.isPermanentForRecord ? .deadLetter(row, error) : .retry(row)
    }

    /// Gives up on this producer without a failed report (a fatal error, a refused enqueue): nothing more is
    /// admitted.
    mutating func abandon(_ error: KafkaError) {
        if failure == nil { failure = error }
    }

    /// Before fetching the rows behind the cursor (``OutboxTable/waitingRows(through:excluding:limit:partitions:on:)``,
    /// excluding the rows in flight): the streams held back in this pass may go again, in id order, from
    /// those rows. Lets a busy relay deal with late commits without waiting for the pipeline to empty.
    mutating func beginCatchUp() {
        needsRescan = false
        blockedStreams = []
    }

    /// Asks for another look behind the cursor (the last one was cut off by its limit).
    mutating func requestRescan() { needsRescan = true }

    /// Starts the next pass from the first waiting row. Only when nothing is in flight (and every delivery
    /// is marked), so that a row found now cannot overtake an earlier row of its stream.
    mutating func rescan() {
        precondition(inFlight.isEmpty, "rescan with rows in flight")
        cursor = 0
        gaps = [:]
        needsRescan = false
        blockedStreams = []
    }
}

extension KafkaError.Code {
    /// Failures that a relay causes itself when it gives up on a producer (purge), not the broker's verdict.
    var isPurge: Bool { self == .purgedQueue || self == .purgedInFlight }
}
