import EventStore
import KafkaClient
import OutboxRelayStore

/// One producer of the at-least-once engine: what it has in flight, how it failed, and what the engine does
/// next. Pure: ``PipelinedPublisher`` does the I/O and feeds it what happened.
///
/// The rules: at most `maxInFlight` rows unacknowledged; after the first failure (a retriable delivery error,
/// a refused enqueue, a fatal producer error, a dead letter whose stream has later rows in flight, or a
/// failure of the source) nothing more is sent, the producer is purged once, and it ends when every report is
/// in. A stop sends nothing more and waits for the reports up to the shutdown deadline, then purges.
struct PipelinedGeneration {
    /// What the engine does next.
    enum Next: Equatable {
        /// Ask the source for up to `room` rows and send them.
        case send(room: Int)
        /// The pipeline is full: wait for reports.
        case waitForReports
        /// Send nothing more; purge the producer first if `purge`, then wait for the remaining reports.
        case drain(purge: Bool)
        /// Every report is in: the producer is done.
        case end(End)
    }

    enum End: Equatable {
        /// The relay is stopping.
        case stopped
        /// Kafka failed: a new producer goes on from the rows still waiting. `backoff`: wait before it (not
        /// when the only failures were rows now dead-lettered).
        case failed(KafkaError, backoff: Bool)
        /// The source failed: the engine throws its error.
        case sourceFailed
    }

    let maxInFlight: Int
    /// Rows with the producer whose reports are not in yet, by Kafka message id.
    private(set) var inFlight: [UInt64: OutboxRow] = [:]
    /// The first Kafka failure.
    private(set) var failure: KafkaError?
    private(set) var sourceFailed = false
    /// Failures a new attempt may fix (not dead letters, not purges).
    private(set) var retriableFailures = 0
    private(set) var published = 0
    /// The producer itself failed (fatal error, refused enqueue): the next one waits a backoff.
    private var producerFailed = false
    private var purged = false
    private var shutdownDeadline: ContinuousClock.Instant?

    init(maxInFlight: Int) { self.maxInFlight = maxInFlight }

    /// Whether more rows may be handed to the producer.
    var maySend: Bool { failure == nil && !sourceFailed }

    mutating func queued(_ row: OutboxRow, messageID: UInt64) { inFlight[messageID] = row }

    /// The producer refused a row for a reason other than the row itself: it sends nothing more.
    mutating func refused(_ error: KafkaError) {
        producerFailed = true
        failure = failure ?? error
    }

    /// The producer failed as a whole.
    mutating func failedFatally(_ error: KafkaError) {
        producerFailed = true
        failure = failure ?? error
    }

    /// The source failed (the database, the replication stream).
    mutating func sourceFailed(_: any Error) { sourceFailed = true }

    /// The row a report is about, no longer in flight; `nil` for a report of no row of this producer.
    mutating func report(messageID: UInt64) -> OutboxRow? { inFlight.removeValue(forKey: messageID) }

    /// Applies the source's reading of a report. Returns the row to dead-letter, if any.
    mutating func apply(_ verdict: ReportVerdict) -> (OutboxRow, KafkaError)? {
        switch verdict {
        case .delivered:
            published += 1
            return nil
        case .deadLetter(let row, let error, let restart):
            if restart { failure = failure ?? error }
            return (row, error)
        case .retry(let error):
            // A purge is the consequence of a failure (or of the shutdown deadline), not one of its own.
            guard !error.code.isPurge else { return nil }
            retriableFailures += 1
            failure = failure ?? error
            return nil
        }
    }

    mutating func next(stopping: Bool, shutdownTimeout: Duration, now: ContinuousClock.Instant = .now) -> Next {
        if !maySend {
            if inFlight.isEmpty {
                if sourceFailed { return .end(.sourceFailed) }
                return .end(.failed(failure!, backoff: retriableFailures > 0 || producerFailed))
            }
            return .drain(purge: purgeOnce())
        }
        if stopping {
            if inFlight.isEmpty { return .end(.stopped) }
            let deadline = shutdownDeadline ?? now + shutdownTimeout
            shutdownDeadline = deadline
            return .drain(purge: now >= deadline && purgeOnce())
        }
        let room = maxInFlight - inFlight.count
        return room > 0 ? .send(room: room) : .waitForReports
    }

    private mutating func purgeOnce() -> Bool {
        defer { purged = true }
        return !purged
    }
}
