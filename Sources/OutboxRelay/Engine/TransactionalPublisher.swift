import Coordination
import EventSourcing
import EventStore
import Foundation
import KafkaClient
import Logging
import Metrics
import OutboxRelayStore
import LibPQ
import Synchronization

/// Where an exactly-once relay takes its rows from: the outbox table, or the outbox's inserts in the WAL.
/// The engine (``TransactionalPublisher``) publishes whatever a source hands it, one Kafka transaction per
/// batch, and tells the source what Kafka committed.
protocol TransactionalSource {
    /// Brings the database in line with the newest progress Kafka committed for this unit (`nil`: none yet):
    /// marks those rows, or confirms the slot to that position. Called after every producer init and every
    /// abort, before anything is published.
    mutating func recover(from progress: RelayProgress?) async throws
    /// The next rows to publish, in order, with what their transaction covers; `nil` when none is waiting
    /// (after waiting up to a poll interval for some).
    mutating func nextBatch(limit: Int) async throws -> SourceBatch?
    /// The batch's transaction committed: record that in the database.
    mutating func committed(_ batch: SourceBatch, deliveries: [OutboxTable.Delivery]) async throws
    /// A row Kafka will never accept: set it aside in the database so that its stream waits behind it (the
    /// engine counts and logs it).
    mutating func deadLetter(_ row: OutboxRow, error: KafkaError) async throws
    /// Whether this relay still owns the unit (its lock or slot). Checked before a new producer fences
    /// whoever else uses the unit's `transactional.id`.
    mutating func stillOwned() async -> Bool
    /// Periodic gauges and retention.
    mutating func housekeeping() async throws
}

/// A batch from a source and what its transaction covers.
struct SourceBatch {
    var rows: [OutboxRow]
    /// Table: the ids; WAL: the end of the last whole PostgreSQL transaction in `rows`.
    var covers: Covers

    enum Covers: Equatable {
        case outboxIDs(IDRanges)
        case walPosition(PostgresLSN)
    }
}

/// One unit of ownership of an exactly-once relay: its `transactional.id` (also the key of its progress
/// records) and the progress partition only it writes.
struct PublishingUnit: Sendable {
    var transactionalID: String
    var progressPartition: Int32
    var name: String { transactionalID }
}

/// The exactly-once engine, shared by both sources: producer generations (init, which fences an earlier
/// owner; begin; abort; commit; replacement after fatal errors), the progress record at the end of every
/// transaction, recovery from it, dead letters, the shutdown deadline and the counters.
///
/// Each round: begin, send the batch's rows, wait until every one is acknowledged, send the progress record,
/// commit, then tell the source. A crash anywhere leaves either an aborted transaction (the rows are still
/// waiting, nothing is visible to read_committed consumers) or a committed one whose progress record the
/// next owner reads back before publishing: nothing is repeated, nothing is lost.
struct TransactionalPublisher {
    let relay: OutboxRelay
    let unit: PublishingUnit
    let progressLog: ProgressLog
    let wakeup: Wakeup
    /// Labels this process's transactions: unique per producer generation.
    private let instance = UUID().uuidString.lowercased().prefix(8)
    private var configuration: OutboxRelayConfiguration { relay.configuration }
    private var logger: Logger { relay.logger }

    init(relay: OutboxRelay, unit: PublishingUnit, progressLog: ProgressLog, wakeup: Wakeup) {
        self.relay = relay
        self.unit = unit
        self.progressLog = progressLog
        self.wakeup = wakeup
    }

    /// Publishes until `stop` (by default the relay's) is requested, or the source loses the unit. Kafka
    /// failures start a new producer (after the source confirms ownership); database failures are thrown.
    func run<Source: TransactionalSource>(_ source: inout Source, stop: StopRequest? = nil) async throws {
        let stop = stop ?? relay.stopRequest
        var backoff = Backoff(max: configuration.maxBackoff)
        var generation = 0
        var topicReady = false
        while !stop.isRequested {
            generation += 1
            if generation > 1 {
                guard await source.stillOwned() else {
                    logger.warning("this relay no longer owns the unit; it stops publishing it", metadata: ["outbox.unit": "\(unit.name)"])
                    return
                }
            }
            let inbox = ProducerInbox(wakeup: wakeup)
            let producer = try relay.makeProducer(inbox, transactionalID: unit.transactionalID)
            do {
                if !topicReady {
                    try await progressLog.ensureTopic(logger: logger)
                    topicReady = true
                }
                logger.debug("initializing transactions", metadata: ["kafka.transactional_id": "\(unit.transactionalID)"])
                try await producer.initTransactions(timeout: configuration.transactionTimeout)
                relay.producerSucceeded()
                var rounds = Rounds(label: "\(unit.transactionalID)/\(instance)-\(generation)")
                try await claim(producer, generation: rounds.label)
                try await resume(&source)
                backoff.reset()
                try await publish(producer, inbox, &source, &rounds, stop)
                await producer.close(timeout: .seconds(1))
                return
            } catch let error as KafkaError {
                producer.purge()
                await producer.close(timeout: .seconds(1))
                relay.recordProducerRestart()
                relay.producerFailed(error)
                if error.isFenced {
                    relay.metrics.fenced.increment()
                }
                let delay = backoff.next()
                logger.warning(
                    error.isFenced
                        ? "Kafka fenced this relay's producer: another owner took over its transactional.id"
                        : "Kafka producer failed; a new one resumes from the progress topic and the database",
                    metadata: ["kafka.error": "\(error)", "kafka.transactional_id": "\(unit.transactionalID)", "retry.in": "\(delay)"])
                await stop.sleep(for: delay)
            } catch {
                producer.purge()
                await producer.close(timeout: .seconds(1))
                throw error
            }
        }
    }

    /// Commits a claim record: where this producer's ownership of the unit begins in the progress partition.
    private func claim(_ producer: KafkaProducer, generation: String) async throws {
        var claim = RelayProgress(unit: unit.name, transaction: "\(generation).claim")
        claim.claim = true
        try producer.beginTransaction()
        let report = try await producer.enqueue(progressLog.record(claim, partition: unit.progressPartition)).report()
        if let error = report.error { throw error }
        try await producer.commitTransaction(timeout: configuration.transactionTimeout)
    }

    /// Reads the unit's newest committed progress and has the source apply it.
    private func resume<Source: TransactionalSource>(_ source: inout Source) async throws {
        let progress = try await progressLog.latest(unit: unit.name, partition: unit.progressPartition, logger: logger)
        logger.debug("read the newest committed progress", metadata: ["relay.progress": "\(progress.map { "\($0)" } ?? "none")"])
        try await source.recover(from: progress)
    }

    /// Names successive transactions of one producer.
    private struct Rounds {
        let label: String
        var count = 0
        mutating func next() -> String {
            count += 1
            return "\(label).\(count)"
        }
    }

    private func publish<Source: TransactionalSource>(
        _ producer: KafkaProducer, _ inbox: ProducerInbox, _ source: inout Source, _ rounds: inout Rounds,
        _ stop: StopRequest
    ) async throws {
        var housekeeping = HousekeepingClock(interval: configuration.housekeepingInterval)
        var nextMessageID: UInt64 = 1
        while !stop.isRequested {
            if housekeeping.isDue {
                try await source.housekeeping()
                housekeeping.ran()
            }
            guard let batch = try await source.nextBatch(limit: configuration.batchSize) else { continue }
            var round = TransactionRound(label: rounds.next())
            var spans = PublishSpans()
            try producer.beginTransaction()
            await producer.prepare(topics: Array(Set(batch.rows.map(\.topic))))
            for row in batch.rows {
                let message = row.kafkaMessage(format: configuration.format, transaction: round.label)
                switch try await producer.send(message, messageID: nextMessageID) {
                case .queued:
                    round.sent(row, messageID: nextMessageID)
                    spans.started(row, messageID: nextMessageID)
                    nextMessageID += 1
                case .refusedForGood(let error), .refused(let error):
                    round.refused(row, error)
                }
                if case .abort = round.next { break }
            }
            switch try await settle(&round, &spans, inbox) {
            case nil, .wait?:
                try? await producer.abortTransaction(timeout: configuration.shutdownTimeout)
                return
            case .abort(let deadLetters, let reason)?:
                try await abort(producer, reason, deadLetters: deadLetters, &source)
            case .sendProgress(let deliveries)?:
                try await commit(producer, batch, deliveries, round.label, &source)
            }
        }
    }

    /// Waits for every report of the round, or a failure; `nil` once the shutdown deadline passed.
    private func settle(
        _ round: inout TransactionRound, _ spans: inout PublishSpans, _ inbox: ProducerInbox
    ) async throws -> TransactionRound.Next? {
        var shutdownDeadline: ContinuousClock.Instant?
        while true {
            for report in inbox.take() {
                spans.finished(messageID: report.messageID, error: report.error)
                round.record(report)
            }
            if let fatal = inbox.fatalError { throw fatal }
            let next = round.next
            if !next.isWait { return next }
            if relay.stopRequest.isRequested {
                let deadline = shutdownDeadline ?? .now + configuration.shutdownTimeout
                shutdownDeadline = deadline
                if ContinuousClock.now >= deadline {
                    logger.warning("shutdown timeout: the open transaction is aborted; its rows stay waiting")
                    return nil
                }
            }
            await wakeup.wait(timeout: .milliseconds(50))
        }
    }

    private func commit<Source: TransactionalSource>(
        _ producer: KafkaProducer, _ batch: SourceBatch, _ deliveries: [OutboxTable.Delivery], _ label: String,
        _ source: inout Source
    ) async throws {
        var progress = RelayProgress(unit: unit.name, transaction: label)
        switch batch.covers {
        case .outboxIDs(let ids): progress.outboxIDs = ids
        case .walPosition(let lsn): progress.walPosition = lsn.description
        }
        do {
            let report = try await producer.enqueue(progressLog.record(progress, partition: unit.progressPartition)).report()
            if let error = report.error { throw error }
            try await producer.commitTransaction(timeout: configuration.transactionTimeout)
        } catch let error as KafkaError where TransactionFailureResponse(error) == .abortAndResume {
            try await abort(producer, error, deadLetters: [], &source)
            return
        }
        relay.recordPublished(deliveries.count)
        relay.counters.transactions.add(1, ordering: .relaxed)
        relay.metrics.transactionsCommitted.increment()
        try await source.committed(batch, deliveries: deliveries)
    }

    /// Aborts the open transaction, sets aside rows Kafka will never take, and resumes from the database.
    private func abort<Source: TransactionalSource>(
        _ producer: KafkaProducer, _ reason: KafkaError, deadLetters: [OutboxRow], _ source: inout Source
    ) async throws {
        // A producer that is fenced or failed fatally cannot abort: its replacement's init settles the transaction.
        guard !reason.isFatal && !reason.isFenced else { throw reason }
        try await producer.abortTransaction(timeout: configuration.transactionTimeout)
        relay.counters.aborted.add(1, ordering: .relaxed)
        relay.metrics.transactionsAborted.increment()
        if deadLetters.isEmpty { relay.recordFailedDelivery() }
        logger.warning("Kafka transaction aborted; its rows are published again", metadata: ["kafka.error": "\(reason)"])
        for row in deadLetters {
            try await source.deadLetter(row, error: reason)
            relay.recordDeadLetter(row, reason)
        }
        try await resume(&source)
    }
}

extension OutboxRow {
    /// The Kafka record of this row: key = stream id (its partition keeps the stream's order). As an envelope:
    /// value = the envelope, the row's headers sorted by name; as a CloudEvent: value = the payload, the `ce_`
    /// headers. Plus the Kafka transaction's label when there is one. An envelope that cannot be read (only a
    /// hand-written row could be one) goes out as it is, with `eventoutbox-format: envelope`: consumers read both.
    func kafkaMessage(format: RecordFormat = .envelope, transaction: String? = nil) -> KafkaOutgoingMessage {
        var headers: [KafkaHeader]
        var value = Array(envelope.utf8)
        switch format {
        case .cloudEvents(let source):
            if let event = try? OutboxEnvelope.recordedEvent(from: value) {
                headers = CloudEventsBinding.headers(for: event, source: source ?? "/eventoutbox/\(topic)")
                    .map { KafkaHeader(name: $0.name, value: $0.value) }
                value = Array(event.payload.utf8)
            } else {
                headers = [KafkaHeader(name: "eventoutbox-format", value: "envelope")]
                    + self.headers.sorted { $0.key < $1.key }.map { KafkaHeader(name: $0.key, value: $0.value) }
            }
        case .envelope:
            headers = self.headers.sorted { $0.key < $1.key }.map { KafkaHeader(name: $0.key, value: $0.value) }
        }
        if let transaction { headers.append(KafkaHeader(name: RelayProgress.transactionHeader, value: transaction)) }
        return KafkaOutgoingMessage(topic: topic, key: Array(key.utf8), value: value, headers: headers)
    }
}
