import Coordination
import EventStore
import KafkaClient
import Logging
import OutboxRelayStore

/// Where an at-least-once relay takes its rows from: the outbox table, or the outbox's inserts in the WAL.
/// The engine (``PipelinedPublisher``) sends whatever a source hands it, keeps up to
/// ``OutboxRelayConfiguration/maxInFlight`` rows in flight, and tells the source what each report means for it.
protocol PipelinedSource {
    /// A new producer starts (the first, or one after a failure): what the last one had in flight is still
    /// waiting and goes out again from here. `false` when the relay stopped meanwhile.
    mutating func startGeneration() async throws -> Bool
    /// The next rows to send, in order, at most `room`; also the source's periodic work (housekeeping,
    /// rebalancing, rescans), and any waiting it does before it has rows. `waitAfter`: nothing more is ready,
    /// so the engine waits (up to a poll interval, or for a report or a NOTIFY) before asking again.
    mutating func nextRows(room: Int, idle: Bool) async throws -> (rows: [OutboxRow], waitAfter: Bool)
    /// Whether `row` may go now: no earlier row of its stream was refused, failed or set aside in this pass.
    mutating func mayEnqueue(_ row: OutboxRow) async throws -> Bool
    /// The producer took `row`.
    mutating func sent(_ row: OutboxRow)
    /// The producer refused `row` at once. One it never will take (``KafkaError/isPermanentForRecord``) the
    /// engine dead-letters; any other refusal ends the producer.
    mutating func refused(_ row: OutboxRow, _ error: KafkaError)
    /// What the delivery report of `row` (one in flight) means. `failing`: a delivery of this producer has
    /// failed already.
    mutating func record(_ row: OutboxRow, _ report: KafkaDeliveryReport, failing: Bool) -> ReportVerdict
    /// Sets aside, in the database, a row Kafka will never accept (the engine counts and logs it).
    mutating func deadLetter(_ row: OutboxRow, error: KafkaError) async throws
    /// After each round of reports (none, possibly): record what was delivered, when due (marks, the slot's
    /// confirmed position). `idle`: nothing is in flight.
    mutating func settled(_ deliveries: [OutboxTable.Delivery], idle: Bool) async throws
    /// Nothing is in flight and the producer is done: record everything delivered.
    mutating func finish() async throws
}

/// What a delivery report means for a pipelined source.
enum ReportVerdict: Equatable {
    /// Stored by Kafka.
    case delivered(OutboxTable.Delivery)
    /// Kafka will never take the row: it becomes a dead letter and its stream waits behind it. `restart`: later
    /// rows of the stream may be with this producer already, so it is replaced and they go out again after it.
    case deadLetter(OutboxRow, KafkaError, restart: Bool)
    /// Failed, and a new attempt may succeed: the producer is replaced and the row goes out again.
    case retry(KafkaError)
}

/// The at-least-once engine, shared by both sources: producer generations (a new producer after any failed
/// delivery or fatal error, with backoff), back-pressure (the in-flight bound and librdkafka's queue), dead
/// letters, the shutdown deadline, purges, spans and the counters.
///
/// One generation: send what the source hands out; on the first failure send nothing more, purge the
/// producer, wait for every report (the source records what Kafka did store), and start a new producer from
/// the rows still waiting. Within one producer, the idempotent producer never stores record n+1 of a
/// partition once record n failed, so no stream is reordered; rows delivered and not yet recorded go out
/// again after a crash (consumers dedupe by event id).
struct PipelinedPublisher {
    let relay: OutboxRelay
    private var configuration: OutboxRelayConfiguration { relay.configuration }
    private var logger: Logger { relay.logger }

    /// Publishes with one producer after another until the relay stops. A failure of the source (the database,
    /// the replication stream) ends the producer once its reports are in, and is thrown for the caller to
    /// recover from.
    func run<Source: PipelinedSource>(_ source: inout Source) async throws {
        var backoff = Backoff(max: configuration.maxBackoff)
        while !relay.stopRequest.isRequested {
            guard try await source.startGeneration() else { return }
            let inbox = ProducerInbox(wakeup: relay.wakeup)
            let producer = try relay.makeProducer(inbox)
            var generation = PipelinedGeneration(maxInFlight: configuration.maxInFlight)
            let end: PipelinedGeneration.End
            do {
                end = try await publish(producer, inbox, &generation, &source)
            } catch {
                producer.purge()
                await producer.close(timeout: .seconds(1))
                throw error
            }
            await producer.close(timeout: .seconds(1))
            guard case .failed(let failure, let waits) = end else { return }
            if waits { relay.producerFailed(failure) }
            if generation.published > 0 { backoff.reset() }
            let delay = waits ? backoff.next() : .zero
            relay.recordProducerRestart()
            logger.warning(
                "Kafka producer failed; starting a new one from the rows still waiting",
                metadata: ["kafka.error": "\(failure)", "retry.in": "\(delay)"])
            await relay.stopRequest.sleep(for: delay)
        }
    }

    /// Runs one producer until it fails or the relay stops, and every report is in.
    private func publish<Source: PipelinedSource>(
        _ producer: KafkaProducer, _ inbox: ProducerInbox, _ generation: inout PipelinedGeneration, _ source: inout Source
    ) async throws -> PipelinedGeneration.End {
        var sourceFailure: (any Error)?
        var spans = PublishSpans()
        while true {
            do {
                try await settle(inbox.take(), &generation, &spans, &source)
            } catch {
                sourceFailure = sourceFailure ?? error
                generation.sourceFailed(error)
            }
            if let fatal = inbox.fatalError { generation.failedFatally(fatal) }
            switch generation.next(stopping: relay.stopRequest.isRequested, shutdownTimeout: configuration.shutdownTimeout) {
            case .end(.sourceFailed):
                try? await source.finish()
                throw sourceFailure!
            case .end(let end):
                try await source.finish()
                return end
            case .drain(let purge):
                if purge {
                    if generation.maySend {
                        logger.warning(
                            "shutdown timeout: rows without a delivery report stay waiting and go out again later",
                            metadata: ["outbox.in_flight": "\(generation.inFlight.count)"])
                    }
                    producer.purge()
                }
                await relay.wakeup.wait(timeout: .milliseconds(50))
            case .waitForReports:
                await relay.wakeup.wait(timeout: configuration.pollInterval)
            case .send(let room):
                do {
                    let next = try await source.nextRows(room: room, idle: generation.inFlight.isEmpty)
                    try await enqueue(next.rows, producer, &generation, &spans, &source)
                    if next.waitAfter { await relay.wakeup.wait(timeout: configuration.pollInterval) }
                } catch {
                    sourceFailure = sourceFailure ?? error
                    generation.sourceFailed(error)
                }
            }
        }
    }

    /// Hands rows to the producer in order, as long as nothing failed. A row refused for good is dead-lettered
    /// (its stream's later rows wait); any other refusal ends the producer.
    private func enqueue<Source: PipelinedSource>(
        _ rows: [OutboxRow], _ producer: KafkaProducer, _ generation: inout PipelinedGeneration, _ spans: inout PublishSpans,
        _ source: inout Source
    ) async throws {
        guard !rows.isEmpty else { return }
        await producer.prepare(topics: Array(Set(rows.map(\.topic))))
        for row in rows {
            guard generation.maySend else { return }
            guard try await source.mayEnqueue(row) else { continue }
            let messageID = UInt64(row.id)
            switch try await producer.send(row.kafkaMessage(format: configuration.format), messageID: messageID) {
            case .queued:
                generation.queued(row, messageID: messageID)
                spans.started(row, messageID: messageID)
                source.sent(row)
            case .refusedForGood(let error):
                source.refused(row, error)
                try await deadLetter(row, error, &source)
            case .refused(let error):
                source.refused(row, error)
                generation.refused(error)
            }
        }
    }

    /// Applies delivery reports: the source records what Kafka stored; rows it never will take become dead
    /// letters; any other failure ends the producer.
    private func settle<Source: PipelinedSource>(
        _ reports: [KafkaDeliveryReport], _ generation: inout PipelinedGeneration, _ spans: inout PublishSpans,
        _ source: inout Source
    ) async throws {
        var deliveries: [OutboxTable.Delivery] = []
        var deadLetters: [(OutboxRow, KafkaError)] = []
        for report in reports {
            guard let row = generation.report(messageID: report.messageID) else { continue }
            spans.finished(messageID: report.messageID, error: report.error)
            let verdict = source.record(row, report, failing: !generation.maySend)
            if case .delivered(let delivery) = verdict { deliveries.append(delivery) }
            if case .retry(let error) = verdict, !error.code.isPurge { relay.recordFailedDelivery() }
            if let deadLetter = generation.apply(verdict) { deadLetters.append(deadLetter) }
        }
        relay.recordPublished(deliveries.count)
        for (row, error) in deadLetters { try await deadLetter(row, error, &source) }
        try await source.settled(deliveries, idle: generation.inFlight.isEmpty)
    }

    private func deadLetter<Source: PipelinedSource>(_ row: OutboxRow, _ error: KafkaError, _ source: inout Source) async throws {
        try await source.deadLetter(row, error: error)
        relay.recordDeadLetter(row, error)
    }
}
