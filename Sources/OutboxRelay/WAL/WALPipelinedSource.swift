import EventStore
import Foundation
import KafkaClient
import Logging
import Metrics
import OutboxRelayStore
import LibPQ

/// `--source wal` for the at-least-once engine: the outbox's inserts read from the logical replication slot in
/// commit order, the slot confirmed past a transaction once Kafka acknowledged all of its rows
/// (``TransactionLedger``).
///
/// Every producer gets a replication stream of its own, started at the confirmed position: after a failed
/// delivery the rows Kafka did not store are read again from the slot. Rows delivered but not yet confirmed go
/// out again too (at-least-once; consumers dedupe by event id).
struct WALPipelinedSource: PipelinedSource {
    let relay: OutboxRelay
    let wal: OutboxWAL
    private var replication: Replication?
    /// What this relay has confirmed; a new stream resumes there (or at the slot's position, if later).
    private(set) var confirmed = PostgresLSN.zero
    private var connectBackoff: Backoff
    private var standingBy = false

    private var decoder = OutboxChangeDecoder(schema: "public")
    /// The next batch, read and decoded while the current one goes to Kafka.
    private var prefetch: Task<(changes: [WALChange], decoder: OutboxChangeDecoder), any Error>?
    private var ledger = TransactionLedger(confirmed: .zero)
    /// The transaction being read (between `begin` and `commit`).
    private var transaction: UInt64?
    /// Rows handed to the engine, by outbox id: their transaction and stream. Each counts in the ledger until
    /// Kafka stores it or it becomes a dead letter.
    private var handedOut: [Int64: (transaction: UInt64, streamID: String)] = [:]
    /// Streams with a dead letter: their later rows are held behind it (recorded as dead letters too).
    private var heldStreams: Set<String> = []
    private var housekeeping: HousekeepingClock
    private var replyRequested = false
    private var lastConfirm = ContinuousClock.now
    /// How far this stream last told the server it had read (the decoder knows how far it has).
    private var reportedReceived = PostgresLSN.zero
    /// Whether the server has been asked where it stands since the last transaction settled: its keepalive
    /// lets an idle relay confirm the WAL after the last transaction (other tables' changes, vacuum), so the
    /// slot does not hold it.
    private var askedWhileIdle = false
    private var lastAsked = ContinuousClock.now

    private struct Replication {
        let stream: PostgresReplicationStream
        /// For dead letters and housekeeping.
        let connection: PQConnection
    }

    init(relay: OutboxRelay, wal: OutboxWAL) {
        self.relay = relay
        self.wal = wal
        self.connectBackoff = Backoff(max: relay.configuration.maxBackoff)
        self.housekeeping = HousekeepingClock(interval: relay.configuration.housekeepingInterval)
    }

    private var configuration: OutboxRelayConfiguration { relay.configuration }
    private var logger: Logger { relay.logger }

    mutating func startGeneration() async throws -> Bool {
        await close()
        guard let (stream, connection, status) = await relay.awaitReplication(wal, from: confirmed, &connectBackoff, &standingBy)
        else { return false }
        replication = Replication(stream: stream, connection: connection)
        relay.setActive(true)
        logger.info("this relay is streaming the outbox from the WAL", metadata: ["wal.slot": "\(wal.slot)", "wal.from": "\(confirmed)"])
        decoder = OutboxChangeDecoder(schema: status.schema)
        ledger = TransactionLedger(confirmed: confirmed)
        transaction = nil
        handedOut = [:]
        reportedReceived = .zero
        heldStreams = try await relay.table.streamsWithDeadLetters(on: connection)
        return true
    }

    /// Ends the stream and its connection (the slot is free for another relay).
    mutating func close() async {
        await dropPrefetch()
        if let replication {
            await replication.stream.close()
            await replication.connection.close()
            relay.setActive(false)
        }
        replication = nil
    }

    private var stream: PostgresReplicationStream { replication!.stream }
    private var connection: PQConnection { replication!.connection }

    mutating func nextRows(room: Int, idle: Bool) async throws -> (rows: [OutboxRow], waitAfter: Bool) {
        if housekeeping.isDue {
            try await runHousekeeping()
            housekeeping.ran()
        }
        // Short waits while deliveries are pending, so their reports are settled and confirmed promptly.
        let fetch = prefetch ?? startFetch(limit: min(configuration.batchSize, room), timeout: idle ? .milliseconds(100) : .milliseconds(10))
        prefetch = nil
        let (changes, next) = try await fetch.value
        decoder = next
        // While a batch goes to Kafka, read and decode the next one.
        let roomAfter = room - changes.count(where: \.isRow)
        if !changes.isEmpty && roomAfter > 0 {
            prefetch = startFetch(limit: min(configuration.batchSize, roomAfter), timeout: .milliseconds(10))
        }
        return (try await read(changes), false)
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

    /// The rows of `changes`, each counted in the ledger against its transaction before that transaction's
    /// commit is recorded: a transaction becomes confirmable only once all of its rows are settled.
    private mutating func read(_ changes: [WALChange]) async throws -> [OutboxRow] {
        var rows: [OutboxRow] = []
        for change in changes {
            switch change {
            case .keepalive(let walEnd, let reply):
                ledger.caughtUp(to: walEnd)
                replyRequested = replyRequested || reply
            case .begin(let commitTime):
                transaction = ledger.begin(commitTime: commitTime)
            case .row(let row):
                guard let transaction else {
                    throw PQError(code: .decoding, message: "pgoutput sent outbox row \(row.id) outside a transaction")
                }
                ledger.sent(in: transaction)
                handedOut[row.id] = (transaction, row.streamID)
                rows.append(row)
            case .unreadable(let outboxID, let reason):
                try await relay.deadLetterUnreadable(outboxID, reason, on: connection)
            case .commit(let endLSN):
                ledger.commit(endLSN: endLSN)
                transaction = nil
            case .other:
                break
            }
        }
        return rows
    }

    mutating func mayEnqueue(_ row: OutboxRow) async throws -> Bool {
        guard try await relay.holdsBack(row, &heldStreams, on: connection) else { return true }
        settle(row)
        return false
    }

    func sent(_ row: OutboxRow) {}

    /// A refused row stays counted in the ledger: one that becomes a dead letter is settled then; any other
    /// ends this stream, and its transaction is read again by the next.
    func refused(_ row: OutboxRow, _ error: KafkaError) {}

    mutating func record(_ row: OutboxRow, _ report: KafkaDeliveryReport, failing: Bool) -> ReportVerdict {
        guard let error = report.error else {
            settle(row)
            return .delivered(.init(id: row.id, partition: report.partition, offset: report.offset ?? -1))
        }
        guard error.isPermanentForRecord && !failing else { return .retry(error) }
        // Later rows of its stream already with Kafka must not overtake it: start again from the slot.
        let laterInFlight = handedOut.contains { $0.key != row.id && $0.value.streamID == row.streamID }
        return .deadLetter(row, error, restart: laterInFlight)
    }

    /// The row is in Kafka or a dead letter: its transaction has one row less outstanding.
    private mutating func settle(_ row: OutboxRow) {
        guard let (transaction, _) = handedOut.removeValue(forKey: row.id) else { return }
        ledger.settled(in: transaction)
    }

    mutating func deadLetter(_ row: OutboxRow, error: KafkaError) async throws {
        try await relay.table.deadLetter(row, error: "\(error)", on: connection)
        heldStreams.insert(row.streamID)
        settle(row)
    }

    mutating func settled(_ deliveries: [OutboxTable.Delivery], idle: Bool) async throws {
        try await confirmIfDue(idle: idle)
    }

    mutating func finish() async throws {
        await dropPrefetch()
        try await confirm()
    }

    /// Sends a status update when the confirmable or received position moved (at most every 100 ms) or the
    /// server asked. Once everything received is settled, asks the server where it stands (again each second
    /// while idle).
    private mutating func confirmIfDue(idle: Bool) async throws {
        let now = ContinuousClock.now
        if !ledger.isIdle || transaction != nil { askedWhileIdle = false }
        let ask = ledger.isIdle && transaction == nil && idle
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
        guard replication != nil else { return }
        try await stream.confirm(ledger.confirmable, received: decoder.received, requestingReply: requestingReply)
        confirmed = ledger.confirmable
        reportedReceived = decoder.received
        replyRequested = false
        lastConfirm = .now
        relay.metrics.walUnconfirmedAge.record(ledger.oldestUnsettledCommitTime.map { Date().timeIntervalSince($0) } ?? 0)
    }

    private mutating func runHousekeeping() async throws {
        relay.metrics.walUnconfirmedAge.record(ledger.oldestUnsettledCommitTime.map { Date().timeIntervalSince($0) } ?? 0)
        heldStreams = try await relay.walHousekeeping(wal, on: connection)
    }
}
