import EventStore
import Foundation
import KafkaClient
import Logging
import Metrics
import PostgresClient
import Synchronization

/// `--source wal`: the outbox's inserts read from a logical replication slot and published in commit order.
///
/// One generation = one replication stream + one producer. Any failure (a failed delivery, a fatal producer
/// error, the stream or database lost) ends the generation: the producer is purged, its reports settled, the
/// slot confirmed as far as everything is acknowledged, and the next generation resumes from there. Rows
/// delivered but not yet confirmed are published again (at-least-once; consumers dedupe by event id).
extension OutboxRelay {
    /// Checks the database once before streaming: a setup problem is a configuration error to report, not
    /// a failure to retry. An unreachable database is left to the retries.
    func checkReplicationSetup(_ wal: OutboxWAL) async throws {
        guard let connection = try? await PostgresConnection.connect(to: configuration.databaseURL) else { return }
        let status = try? await wal.status(on: connection)
        await connection.close()
        let problems = status.map(wal.problems(in:)) ?? []
        guard problems.isEmpty else { throw WALSetupError(problems: problems) }
    }

    /// Starts streaming the slot from `lsn` (or the slot's position, if later), with a connection for the relay's
    /// other statements: retries with backoff after failures, stands by while another relay streams it (55006).
    /// `nil` once the relay stops.
    func awaitReplication(
        _ wal: OutboxWAL, from lsn: PostgresLSN, _ backoff: inout Backoff, _ standingBy: inout Bool
    ) async -> (PostgresReplicationStream, PostgresConnection, OutboxWAL.Status)? {
        while !isStopping {
            var connection: PostgresConnection?
            do {
                let opened = try await PostgresConnection.connect(to: configuration.databaseURL)
                connection = opened
                let status = try await wal.status(on: opened)
                let problems = wal.problems(in: status)
                guard problems.isEmpty else { throw WALSetupError(problems: problems) }
                let stream = try await PostgresReplicationStream.start(
                    url: configuration.databaseURL, slot: wal.slot, publications: [wal.publication], startLSN: lsn)
                standingBy = false
                return (stream, opened, status)
            } catch let error as PostgresError where error.sqlState == SQLState.objectInUse {
                await connection?.close()
                if !standingBy {
                    logger.info("another relay is streaming the replication slot; standing by", metadata: ["wal.slot": "\(wal.slot)"])
                    standingBy = true
                }
                await sleepUnlessStopping(configuration.standbyRetryInterval)
            } catch {
                await connection?.close()
                let delay = backoff.next()
                logger.error(
                    "cannot stream the outbox from the WAL; retrying",
                    metadata: ["error": "\(error)", "wal.slot": "\(wal.slot)", "retry.in": "\(delay)"])
                await sleepUnlessStopping(delay)
            }
        }
        return nil
    }

    func superviseReplication(_ wal: OutboxWAL) async {
        var backoff = Backoff(max: configuration.maxBackoff)
        // What this process has confirmed; a new stream resumes there (or at the slot's position, if later).
        var confirmed = PostgresLSN.zero
        var standingBy = false
        while !isStopping {
            guard let (stream, connection, status) = await awaitReplication(wal, from: confirmed, &backoff, &standingBy) else { return }
            let schema = status.schema
            logger.info("this relay is streaming the outbox from the WAL", metadata: ["wal.slot": "\(wal.slot)", "wal.from": "\(confirmed)"])
            let inbox = ProducerInbox(wakeup: wakeup)
            var generation = ReplicationGeneration(
                relay: self, wal: wal, schema: schema, stream: stream, connection: connection, inbox: inbox, confirmed: confirmed)
            let end: ReplicationGeneration.End
            do {
                let producer = try makeProducer(inbox)
                end = await generation.run(producer)
                await producer.close(timeout: .seconds(1))
            } catch {
                end = .failed(error)
            }
            confirmed = generation.confirmed
            await stream.close()
            await connection.close()
            setActive(false)
            guard case .failed(let error) = end else { return }
            if generation.published > 0 { backoff.reset() }
            counters.producerRestarts.add(1, ordering: .relaxed)
            metrics.producerRestarts.increment()
            let delay = backoff.next()
            logger.warning(
                "WAL relay restarts from the last confirmed position",
                metadata: ["error": "\(error)", "wal.confirmed": "\(confirmed)", "retry.in": "\(delay)"])
            await sleepUnlessStopping(delay)
        }
    }
}

extension OutboxRelay {
    /// An insert read from the WAL that cannot be read as an outbox row goes to dead letters, if the row is still
    /// in the outbox.
    func deadLetterUnreadable(_ id: Int64, _ reason: String, on connection: PostgresConnection) async throws {
        let moved = try await table.moveToDeadLetters(id, error: reason, on: connection)
        metrics.deadLettered.increment()
        logger.error(
            moved
                ? "outbox row from the WAL cannot be read; moved to dead letters"
                : "outbox row from the WAL cannot be read and is no longer in the outbox; it is not published",
            metadata: ["outbox.id": "\(id)", "error": "\(reason)"])
    }

    /// For a row read from the WAL: whether it must wait behind a dead letter of its stream (then it is recorded
    /// as held behind it). A dead letter retried since (`eventoutbox dead-letters retry`) releases the stream.
    func holdsBack(_ row: OutboxRow, _ heldStreams: inout Set<String>, on connection: PostgresConnection) async throws -> Bool {
        guard heldStreams.contains(row.streamID) else { return false }
        guard let first = try await table.firstDeadLetter(ofStream: row.streamID, on: connection) else {
            heldStreams.remove(row.streamID)
            return false
        }
        guard first.streamVersion <= row.streamVersion else { return false }
        if first.outboxID != row.id {
            try await table.deadLetter(
                row, error: "held back behind dead letter \(first.outboxID) of its stream", heldBehind: first.outboxID, on: connection)
            logger.warning(
                "outbox row held back behind a dead letter of its stream",
                metadata: ["outbox.id": "\(row.id)", "stream.id": "\(row.streamID)", "dead_letter": "\(first.outboxID)"])
        }
        return true
    }
}

/// One replication stream and one producer, until either fails or the relay stops.
private struct ReplicationGeneration {
    enum End {
        case stopped
        case failed(any Error)
    }

    let relay: OutboxRelay
    let wal: OutboxWAL
    /// The schema whose `outbox` is published (the publication may name other tables).
    let schema: String
    let stream: PostgresReplicationStream
    /// For dead letters and housekeeping.
    let connection: PostgresConnection
    let inbox: ProducerInbox
    private var decoder: OutboxChangeDecoder
    /// The next batch, read and decoded while the current one goes to Kafka.
    private var prefetch: Task<(changes: [WALChange], decoder: OutboxChangeDecoder), any Error>?
    private var ledger: TransactionLedger
    private(set) var confirmed: PostgresLSN
    private(set) var published = 0
    private var inFlight: [UInt64: (transaction: UInt64, row: OutboxRow)] = [:]
    private var spans = PublishSpans()
    private var transaction: UInt64?
    private var nextMessageID: UInt64 = 1
    /// Streams with a dead letter: their later rows are held behind it (recorded as dead letters too).
    private var heldStreams: Set<String> = []
    private var failure: (any Error)?
    private var replyRequested = false
    private var lastConfirm = ContinuousClock.now
    /// How far this generation last told the server it had read (the decoder knows how far it has).
    private var reportedReceived = PostgresLSN.zero
    /// Whether the server has been asked where it stands since the last transaction settled: its keepalive
    /// lets an idle relay confirm the WAL after the last transaction (other tables' changes, vacuum), so the
    /// slot does not hold it.
    private var askedWhileIdle = false
    private var lastAsked = ContinuousClock.now

    init(
        relay: OutboxRelay, wal: OutboxWAL, schema: String, stream: PostgresReplicationStream, connection: PostgresConnection,
        inbox: ProducerInbox, confirmed: PostgresLSN
    ) {
        self.relay = relay
        self.wal = wal
        self.schema = schema
        self.stream = stream
        self.connection = connection
        self.inbox = inbox
        self.ledger = TransactionLedger(confirmed: confirmed)
        self.confirmed = confirmed
        self.decoder = OutboxChangeDecoder(schema: schema)
    }

    private var configuration: OutboxRelayConfiguration { relay.configuration }
    private var logger: Logger { relay.logger }

    mutating func run(_ producer: KafkaProducer) async -> End {
        var purged = false
        var shutdownDeadline: ContinuousClock.Instant?
        var housekeeping = HousekeepingClock(interval: configuration.housekeepingInterval)
        do {
            heldStreams = try await relay.table.streamsWithDeadLetters(on: connection)
        } catch {
            return .failed(error)
        }
        while true {
            do {
                try await settle(inbox.take())
                if let fatal = inbox.fatalError { failure = failure ?? fatal }
                if failure == nil { try await confirmIfDue() }
            } catch {
                failure = failure ?? error
            }
            if let failure {
                if !purged {
                    producer.purge()
                    purged = true
                }
                if inFlight.isEmpty {
                    await dropPrefetch()
                    try? await confirm()
                    return .failed(failure)
                }
                await relay.wakeup.wait(timeout: .milliseconds(100))
                continue
            }
            if relay.isStopping {
                let deadline = shutdownDeadline ?? ContinuousClock.now + configuration.shutdownTimeout
                shutdownDeadline = deadline
                if inFlight.isEmpty {
                    await dropPrefetch()
                    try? await confirm()
                    return .stopped
                }
                if ContinuousClock.now >= deadline && !purged {
                    logger.warning(
                        "shutdown timeout: rows without a delivery report go out again from the slot later",
                        metadata: ["outbox.in_flight": "\(inFlight.count)"])
                    producer.purge()
                    purged = true
                }
                await relay.wakeup.wait(timeout: .milliseconds(50))
                continue
            }
            do {
                if housekeeping.isDue {
                    try await self.housekeeping()
                    housekeeping.ran()
                }
                let room = configuration.maxInFlight - inFlight.count
                guard room > 0 else {
                    await relay.wakeup.wait(timeout: .milliseconds(20))
                    continue
                }
                // Short waits while deliveries are pending, so their reports are settled and confirmed promptly.
                let fetch = prefetch ?? startFetch(limit: min(configuration.batchSize, room), timeout: inFlight.isEmpty ? .milliseconds(100) : .milliseconds(10))
                prefetch = nil
                let (changes, next) = try await fetch.value
                decoder = next
                // While a batch streams in, read and decode the next one meanwhile.
                let roomAfter = room - changes.count(where: \.isRow)
                if !changes.isEmpty && roomAfter > 0 {
                    prefetch = startFetch(limit: min(configuration.batchSize, roomAfter), timeout: .milliseconds(10))
                }
                try await handle(changes, producer)
            } catch {
                failure = error
            }
        }
    }

    private func startFetch(limit: Int, timeout: Duration) -> Task<(changes: [WALChange], decoder: OutboxChangeDecoder), any Error> {
        let stream = stream
        var decoder = decoder
        return Task {
            let changes = try decoder.decode(try await stream.receive(limit: limit, timeout: timeout))
            return (changes, decoder)
        }
    }

    /// Waits for a read in progress and forgets it (nothing in it was handed to Kafka, so nothing is lost:
    /// the next stream starts at the confirmed position).
    private mutating func dropPrefetch() async {
        _ = try? await prefetch?.value
        prefetch = nil
    }

    private mutating func handle(_ changes: [WALChange], _ producer: KafkaProducer) async throws {
        var batch: [(transaction: UInt64, row: OutboxRow)] = []
        for change in changes {
            switch change {
            case .keepalive(let walEnd, let reply):
                ledger.caughtUp(to: walEnd)
                replyRequested = replyRequested || reply
            case .begin(let commitTime):
                transaction = ledger.begin(commitTime: commitTime)
            case .row(let row):
                guard let transaction else {
                    throw PostgresError(code: .decoding, message: "pgoutput sent outbox row \(row.id) outside a transaction")
                }
                batch.append((transaction, row))
            case .unreadable(let outboxID, let reason):
                try await relay.deadLetterUnreadable(outboxID, reason, on: connection)
            case .commit(let endLSN):
                // Rows are handed to the producer before their transaction counts as committed.
                try await enqueue(batch, producer)
                batch = []
                ledger.commit(endLSN: endLSN)
                transaction = nil
            case .other:
                break
            }
        }
        try await enqueue(batch, producer)
    }

    /// An insert that cannot be read as an outbox row goes to dead letters if the row is still in the outbox.
    private mutating func enqueue(_ rows: [(transaction: UInt64, row: OutboxRow)], _ producer: KafkaProducer) async throws {
        guard !rows.isEmpty else { return }
        await producer.prepare(topics: Array(Set(rows.map(\.row.topic))))
        for (transaction, row) in rows {
            if try await relay.holdsBack(row, &heldStreams, on: connection) { continue }
            let message = row.kafkaMessage(format: configuration.format)
            let id = nextMessageID
            while true {
                do {
                    try producer.enqueue(message, messageID: id)
                    nextMessageID += 1
                    inFlight[id] = (transaction, row)
                    spans.started(row, messageID: id)
                    ledger.sent(in: transaction)
                } catch let error as KafkaError where error.code == .queueFull {
                    try await Task.sleep(for: .milliseconds(1))
                    continue
                } catch let error as KafkaError where error.isPermanentForRecord {
                    try await deadLetter(row, error)
                }
                break
            }
        }
    }

    private mutating func deadLetter(_ row: OutboxRow, _ error: KafkaError) async throws {
        try await relay.table.deadLetter(row, error: "\(error)", on: connection)
        heldStreams.insert(row.streamID)
        relay.counters.failed.add(1, ordering: .relaxed)
        relay.metrics.deliveryErrors.increment()
        relay.metrics.deadLettered.increment()
        logger.error(
            "outbox row moved to dead letters; later events of its stream are held back until it is retried",
            metadata: [
                "outbox.id": "\(row.id)", "event.id": "\(row.eventID)", "stream.id": "\(row.streamID)",
                "stream.version": "\(row.streamVersion)", "kafka.error": "\(error)",
            ])
    }

    private mutating func settle(_ reports: [KafkaDeliveryReport]) async throws {
        for report in reports {
            guard let (transaction, row) = inFlight.removeValue(forKey: report.messageID) else { continue }
            spans.finished(messageID: report.messageID, error: report.error)
            guard let error = report.error else {
                ledger.settled(in: transaction)
                published += 1
                relay.counters.published.add(1, ordering: .relaxed)
                relay.metrics.published.increment()
                continue
            }
            if error.isPermanentForRecord && failure == nil {
                try await deadLetter(row, error)
                ledger.settled(in: transaction)
                // Later rows of its stream already with Kafka must not overtake it: start again from the slot.
                if inFlight.values.contains(where: { $0.row.streamID == row.streamID }) { failure = error }
            } else if !error.code.isPurge {
                relay.counters.failed.add(1, ordering: .relaxed)
                relay.metrics.deliveryErrors.increment()
                failure = failure ?? error
            }
        }
    }

    /// Sends a status update when the confirmable or received position moved (at most every 100 ms) or the
    /// server asked. Once everything received is settled, asks the server where it stands (again each second
    /// while idle).
    private mutating func confirmIfDue() async throws {
        let now = ContinuousClock.now
        if !ledger.isIdle || transaction != nil { askedWhileIdle = false }
        let ask = ledger.isIdle && transaction == nil && inFlight.isEmpty
            && (!askedWhileIdle ? now - lastConfirm >= .milliseconds(100) : now - lastAsked >= .seconds(1))
        let moved = ledger.confirmable > confirmed || decoder.received > reportedReceived
        guard replyRequested || ask || (moved && now - lastConfirm >= .milliseconds(100)) else { return }
        if ask {
            askedWhileIdle = true
            lastAsked = now
        }
        try await confirm(requestingReply: ask)
    }

    private mutating func confirm(requestingReply: Bool = false) async throws {
        try await stream.confirm(ledger.confirmable, received: decoder.received, requestingReply: requestingReply)
        confirmed = ledger.confirmable
        reportedReceived = decoder.received
        replyRequested = false
        lastConfirm = .now
        relay.metrics.walUnconfirmedAge.record(ledger.oldestUnsettledCommitTime.map { Date().timeIntervalSince($0) } ?? 0)
    }

    /// Gauges of the slot and the outbox, and retention (rows are never marked in WAL mode: any row older than
    /// the retention period is deleted, published or not, since the log holds its insert).
    private mutating func housekeeping() async throws {
        let status = try await wal.status(on: connection)
        relay.metrics.walRetainedBytes.record(status.slot?.retainedBytes ?? 0)
        relay.metrics.walUnconfirmedAge.record(ledger.oldestUnsettledCommitTime.map { Date().timeIntervalSince($0) } ?? 0)
        heldStreams = try await relay.table.streamsWithDeadLetters(on: connection)
        relay.metrics.deadLetters.record(try await relay.table.deadLetters(on: connection).count)
        for _ in 0..<10 {
            let deleted = try await relay.table.deleteRows(
                olderThan: configuration.retention, limit: configuration.retentionBatchSize, on: connection)
            if deleted < configuration.retentionBatchSize || relay.isStopping { break }
        }
    }
}
