import Coordination
import EventStore
import Foundation
import KafkaClient
import Logging
import Metrics
import OutboxRelayStore
import LibPQ
import Synchronization

/// `--source wal`: the outbox's inserts read from a logical replication slot and published in commit order.
/// What both WAL sources (``WALPipelinedSource``, ``WALTransactionalSource``) share: the setup check, starting a
/// stream (standing by while another relay streams the slot), and the dead letters of rows read from the WAL.
extension OutboxRelay {
    /// Checks the database once before streaming: a setup problem is a configuration error to report, not
    /// a failure to retry. An unreachable database is left to the retries.
    func checkReplicationSetup(_ wal: OutboxWAL) async throws {
        guard let connection = try? await PQConnection.connect(to: configuration.databaseURL) else { return }
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
    ) async -> (PostgresReplicationStream, PQConnection, OutboxWAL.Status)? {
        while !stopRequest.isRequested {
            var connection: PQConnection?
            do {
                let opened = try await PQConnection.connect(to: configuration.databaseURL)
                connection = opened
                let status = try await wal.status(on: opened)
                let problems = wal.problems(in: status)
                guard problems.isEmpty else { throw WALSetupError(problems: problems) }
                let stream = try await PostgresReplicationStream.start(
                    url: configuration.databaseURL, slot: wal.slot, publications: [wal.publication], startLSN: lsn)
                standingBy = false
                return (stream, opened, status)
            } catch let error as PQError where error.sqlState == SQLState.objectInUse {
                await connection?.close()
                if !standingBy {
                    logger.info("another relay is streaming the replication slot; standing by", metadata: ["wal.slot": "\(wal.slot)"])
                    standingBy = true
                }
                await stopRequest.sleep(for: configuration.standbyRetryInterval)
            } catch {
                await connection?.close()
                let delay = backoff.next()
                logger.error(
                    "cannot stream the outbox from the WAL; retrying",
                    metadata: ["error": "\(error)", "wal.slot": "\(wal.slot)", "retry.in": "\(delay)"])
                await stopRequest.sleep(for: delay)
            }
        }
        return nil
    }

    /// `--source wal --delivery at-least-once`: the at-least-once engine over the replication slot. A failure
    /// of the stream or the database starts again from the last confirmed position, after a backoff.
    func superviseReplication(_ wal: OutboxWAL) async {
        var backoff = Backoff(max: configuration.maxBackoff)
        var source = WALPipelinedSource(relay: self, wal: wal)
        var confirmedAtLastFailure = PostgresLSN.zero
        while !stopRequest.isRequested {
            do {
                try await PipelinedPublisher(relay: self).run(&source)
            } catch {
                if source.confirmed > confirmedAtLastFailure { backoff.reset() }
                confirmedAtLastFailure = source.confirmed
                let delay = backoff.next()
                logger.warning(
                    "WAL relay restarts from the last confirmed position",
                    metadata: ["error": "\(error)", "wal.confirmed": "\(source.confirmed)", "retry.in": "\(delay)"])
                await source.close()
                await stopRequest.sleep(for: delay)
            }
        }
        await source.close()
    }
}

extension OutboxRelay {
    /// Gauges of the slot and the outbox, and retention (rows are never marked in WAL mode: any row older than
    /// the retention period is deleted, published or not, since the log holds its insert). Returns the streams
    /// that have a dead letter now.
    func walHousekeeping(_ wal: OutboxWAL, on connection: PQConnection) async throws -> Set<String> {
        let status = try await wal.status(on: connection)
        metrics.walRetainedBytes.record(status.slot?.retainedBytes ?? 0)
        metrics.deadLetters.record(try await table.deadLetters(on: connection).count)
        for _ in 0..<10 {
            let deleted = try await table.deleteRows(
                olderThan: configuration.retention, limit: configuration.retentionBatchSize, on: connection)
            if deleted < configuration.retentionBatchSize || stopRequest.isRequested { break }
        }
        return try await table.streamsWithDeadLetters(on: connection)
    }

    /// For a row read from the WAL: whether it must wait behind a dead letter of its stream (then it is recorded
    /// as held behind it). A dead letter retried since (`eventoutbox dead-letters retry`) releases the stream.
    func holdsBack(_ row: OutboxRow, _ heldStreams: inout Set<String>, on connection: PQConnection) async throws -> Bool {
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
