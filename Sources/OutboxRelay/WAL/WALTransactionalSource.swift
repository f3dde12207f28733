import Coordination
import EventStore
import Foundation
import KafkaClient
import Logging
import Metrics
import OutboxRelayStore
import LibPQ

/// `--source wal` for the exactly-once engine: whole PostgreSQL transactions read from the replication slot, as
/// many as fit a batch, one Kafka transaction per batch; its progress record holds the commit end of the last
/// one, and the slot is confirmed there once Kafka committed.
///
/// On (re)start the newest progress record and the slot's confirmed position are compared: transactions ending
/// at or before the later of the two are in Kafka already and are skipped.
struct WALTransactionalSource: TransactionalSource {
    let relay: OutboxRelay
    let wal: OutboxWAL
    let stream: PostgresReplicationStream
    /// For dead letters and housekeeping.
    let connection: PQConnection
    private var decoder: OutboxChangeDecoder
    /// Transactions ending at or before this are in Kafka (and confirmed, or about to be).
    private(set) var published: PostgresLSN
    /// Whole transactions read and not yet handed out, oldest first.
    private var complete: [(rows: [OutboxRow], endLSN: PostgresLSN)] = []
    /// The rows of the transaction being read (between `begin` and `commit`).
    private var open: [OutboxRow]?
    /// The batch handed out and not yet committed: handed out again after an abort unless the progress covers it.
    private var handedOut: SourceBatch?
    /// Streams with a dead letter: their later rows are held behind it (recorded as dead letters too).
    private var heldStreams: Set<String> = []
    private var replyRequested = false
    /// The server's position from its last keepalive: with nothing pending, the slot may be confirmed there.
    private var serverEnd = PostgresLSN.zero
    private var lastConfirm = ContinuousClock.now

    init(relay: OutboxRelay, wal: OutboxWAL, schema: String, stream: PostgresReplicationStream, connection: PQConnection, confirmed: PostgresLSN) {
        self.relay = relay
        self.wal = wal
        self.stream = stream
        self.connection = connection
        self.decoder = OutboxChangeDecoder(schema: schema)
        self.published = confirmed
    }

    private var logger: Logger { relay.logger }

    mutating func recover(from progress: RelayProgress?) async throws {
        if let lsn = progress?.walLSN, lsn > published {
            logger.info(
                "Kafka had committed WAL transactions the slot did not know of; confirming the slot there",
                metadata: ["wal.slot": "\(wal.slot)", "wal.from": "\(published)", "wal.to": "\(lsn)"])
            published = lsn
        }
        if let batch = handedOut, case .walPosition(let end) = batch.covers, end <= published { handedOut = nil }
        complete.removeAll { $0.endLSN <= published }
        heldStreams = try await relay.table.streamsWithDeadLetters(on: connection)
        try await confirm()
    }

    mutating func nextBatch(limit: Int) async throws -> SourceBatch? {
        if var batch = handedOut {
            batch.rows = try await withoutHeld(batch.rows)
            handedOut = batch
            return batch
        }
        let deadline = ContinuousClock.now + relay.configuration.pollInterval
        while complete.isEmpty || (open != nil && complete.map(\.rows.count).reduce(0, +) < limit) {
            let messages = try await stream.receive(limit: limit, timeout: complete.isEmpty ? .milliseconds(100) : .milliseconds(5))
            try await read(decoder.decode(messages))
            if replyRequested || ContinuousClock.now - lastConfirm >= .seconds(1) { try await confirm() }
            // The server may send something (keepalives, other tables' transactions) every round: a stop or the poll
            // interval must end the wait all the same. A transaction half read stays in `open` for the next call.
            if (messages.isEmpty && !complete.isEmpty) || ContinuousClock.now >= deadline || relay.stopRequest.isRequested { break }
        }
        guard !complete.isEmpty else { return nil }
        var rows: [OutboxRow] = []
        var end = published
        while let first = complete.first, rows.isEmpty || rows.count + first.rows.count <= limit {
            rows += first.rows
            end = first.endLSN
            complete.removeFirst()
        }
        rows = try await withoutHeld(rows)
        guard !rows.isEmpty else {
            // Transactions of other tables, or only rows held behind dead letters: nothing for Kafka.
            published = end
            try await confirm()
            return nil
        }
        let batch = SourceBatch(rows: rows, covers: .walPosition(end))
        handedOut = batch
        return batch
    }

    private mutating func read(_ changes: [WALChange]) async throws {
        for change in changes {
            switch change {
            case .keepalive(let walEnd, let reply):
                serverEnd = max(serverEnd, walEnd)
                replyRequested = replyRequested || reply
            case .begin:
                open = []
            case .row(let row):
                guard open != nil else {
                    throw PQError(code: .decoding, message: "pgoutput sent outbox row \(row.id) outside a transaction")
                }
                open!.append(row)
            case .unreadable(let outboxID, let reason):
                try await relay.deadLetterUnreadable(outboxID, reason, on: connection)
            case .commit(let endLSN):
                if let rows = open, endLSN > published { complete.append((rows, endLSN)) }
                open = nil
            case .other:
                break
            }
        }
    }

    /// Drops rows of streams held behind a dead letter (recording each as held).
    private mutating func withoutHeld(_ rows: [OutboxRow]) async throws -> [OutboxRow] {
        guard !heldStreams.isEmpty else { return rows }
        var kept: [OutboxRow] = []
        for row in rows where try await !relay.holdsBack(row, &heldStreams, on: connection) { kept.append(row) }
        return kept
    }

    mutating func committed(_ batch: SourceBatch, deliveries: [OutboxTable.Delivery]) async throws {
        handedOut = nil
        if case .walPosition(let end) = batch.covers { published = max(published, end) }
        try await confirm()
    }

    mutating func deadLetter(_ row: OutboxRow, error: KafkaError) async throws {
        try await relay.table.deadLetter(row, error: "\(error)", on: connection)
        heldStreams.insert(row.streamID)
    }

    /// Confirms the slot to what Kafka holds; with nothing read and pending, to the server's position (so an idle
    /// relay does not make the slot keep the WAL of other tables' changes).
    private mutating func confirm() async throws {
        if handedOut == nil && complete.isEmpty && open == nil && serverEnd > published { published = serverEnd }
        try await stream.confirm(published, received: max(decoder.received, published), requestingReply: false)
        replyRequested = false
        lastConfirm = .now
    }

    mutating func stillOwned() async -> Bool {
        // While this stream lives, the slot streams to nobody else.
        (try? await confirm()) != nil
    }

    mutating func housekeeping() async throws {
        heldStreams = try await relay.walHousekeeping(wal, on: connection)
    }
}

extension OutboxRelay {
    /// `--source wal --delivery exactly-once`: the unit is the slot; streaming it is owning it.
    func superviseReplicationExactlyOnce(_ wal: OutboxWAL) async {
        var backoff = Backoff(max: configuration.maxBackoff)
        var confirmed = PostgresLSN.zero
        var standingBy = false
        while !stopRequest.isRequested {
            guard let (stream, connection, status) = await awaitReplication(wal, from: confirmed, &backoff, &standingBy) else { return }
            setActive(true)
            let slotConfirmed = status.slot?.confirmedFlushLSN.flatMap(PostgresLSN.init) ?? .zero
            var source = WALTransactionalSource(
                relay: self, wal: wal, schema: status.schema, stream: stream, connection: connection,
                confirmed: max(confirmed, slotConfirmed))
            do {
                let names = try await exactlyOnceNames(connection)
                logger.info(
                    "this relay is streaming the outbox from the WAL (exactly-once)",
                    metadata: ["wal.slot": "\(wal.slot)", "kafka.transactional_id": "\(names.prefix).wal.\(wal.slot)",
                               "relay.progress_topic": "\(names.topic)"])
                let engine = TransactionalPublisher(
                    relay: self,
                    unit: PublishingUnit(transactionalID: "\(names.prefix).wal.\(wal.slot)", progressPartition: 0),
                    progressLog: progressLog(topic: names.topic, partitions: 1), wakeup: wakeup)
                backoff.reset()
                try await engine.run(&source)
            } catch {
                let delay = backoff.next()
                logger.warning(
                    "WAL relay restarts from the last committed position",
                    metadata: ["error": "\(error)", "wal.confirmed": "\(source.published)", "retry.in": "\(delay)"])
                await stopRequest.sleep(for: delay)
            }
            confirmed = source.published
            await stream.close()
            await connection.close()
            setActive(false)
        }
    }
}
