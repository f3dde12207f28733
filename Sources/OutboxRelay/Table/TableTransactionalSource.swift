import Coordination
import EventStore
import KafkaClient
import Logging
import Metrics
import OutboxRelayStore
import LibPQ
import Synchronization

/// `--source table` for the exactly-once engine: the waiting rows of the outbox (of the partitions this unit
/// owns), oldest first, one batch per Kafka transaction; marked (or deleted) once their transaction committed.
///
/// No cursor is needed: a batch's rows are marked before the next batch is fetched, so every fetch starts at
/// the oldest waiting row, and a row whose transaction committed late is simply found by the next fetch. A
/// stream's rows are committed in version order (the append's version check), so a later version is never
/// waiting while an earlier one is not yet visible.
struct TableTransactionalSource: TransactionalSource {
    let relay: OutboxRelay
    /// Holds `lockKey`, the unit's advisory lock.
    let connection: PQConnection
    let lockKey: Int64
    let partitions: OutboxPartitions
    let wakeup: Wakeup
    private let table = OutboxTable()

    init(relay: OutboxRelay, connection: PQConnection, lockKey: Int64, partitions: OutboxPartitions, wakeup: Wakeup) {
        self.relay = relay
        self.connection = connection
        self.lockKey = lockKey
        self.partitions = partitions
        self.wakeup = wakeup
    }

    private var deletes: Bool { relay.configuration.publishedRows.deletesAtOnce }

    func recover(from progress: RelayProgress?) async throws {
        guard let ids = progress?.outboxIDs?.ids, !ids.isEmpty else { return }
        let changed: Int
        if deletes {
            changed = try await table.deletePublishedIDs(ids, on: connection)
        } else {
            changed = try await table.markPublished(ids: ids, on: connection)
        }
        if changed > 0 {
            relay.logger.info(
                "Kafka had committed rows the database did not know of; marked them from the progress topic",
                metadata: ["outbox.rows": "\(changed)", "kafka.transaction": "\(progress!.transaction)"])
        }
    }

    func nextBatch(limit: Int) async throws -> SourceBatch? {
        let rows: [OutboxRow]
        do {
            rows = try await table.waitingRows(after: 0, limit: limit, partitions: partitions, on: connection)
        } catch let error as OutboxRowError {
            // An unreadable row must not stall the outbox: its stream waits behind it in the dead letters.
            try await relay.deadLetterUnreadable(error.outboxID, "\(error)", on: connection)
            return nil
        }
        guard !rows.isEmpty else {
            await wakeup.wait(timeout: relay.configuration.pollInterval)
            return nil
        }
        return SourceBatch(rows: rows, covers: .outboxIDs(IDRanges(rows.map(\.id))))
    }

    func committed(_ batch: SourceBatch, deliveries: [OutboxTable.Delivery]) async throws {
        if deletes {
            try await table.deletePublished(deliveries, on: connection)
        } else {
            try await table.markPublished(deliveries, on: connection)
        }
    }

    func deadLetter(_ row: OutboxRow, error: KafkaError) async throws {
        try await table.moveToDeadLetters(row.id, error: "\(error)", on: connection)
    }

    func stillOwned() async -> Bool {
        (try? await AdvisoryLocks.holds(lockKey, on: connection)) ?? false
    }

    func housekeeping() async throws {
        try await relay.housekeeping(connection)
    }
}

/// Session advisory locks of a relay connection.
enum AdvisoryLocks {
    /// Whether this session holds the exclusive advisory lock `key` (taken with `pg_try_advisory_lock`).
    static func holds(_ key: Int64, on connection: PQConnection) async throws -> Bool {
        try await connection.queryOne(
            """
            SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                AND mode = 'ExclusiveLock' AND objsubid = 1
                AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid) AS held
            """, [.int64(key)], statement: "relay: still holds its lock"
        ).decode(Bool.self, "held")
    }

    /// Takes the exclusive advisory lock `key` if it is free.
    static func tryLock(_ key: Int64, on connection: PQConnection) async throws -> Bool {
        try await connection.queryOne(
            "SELECT pg_try_advisory_lock($1) AS acquired", [.int64(key)], statement: "relay: try lock"
        ).decode(Bool.self, "acquired")
    }
}

extension OutboxRelay {
    /// The names of this relay's exactly-once units: the `transactional.id` prefix and the progress topic.
    func exactlyOnceNames(_ connection: PQConnection) async throws -> (prefix: String, topic: String) {
        var prefix = configuration.transactionalID ?? ""
        if prefix.isEmpty {
            let row = try await connection.queryOne(
                "SELECT current_database() AS db, current_schema() AS schema", statement: "relay: name its transactional ids"
            )
            prefix = "eventoutbox-relay.\(try row.decode(String.self, "db")).\(try row.decode(String.self, "schema"))"
        }
        // Kafka topic names allow [a-zA-Z0-9._-] only.
        let topic = configuration.progressTopic ?? String(
            "\(prefix).progress".map { $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) ? $0 : "_" }.prefix(249))
        return (prefix, topic)
    }

    func progressLog(topic: String, partitions: Int) -> ProgressLog {
        ProgressLog(
            topic: topic, partitions: Int32(partitions), replicationFactor: configuration.progressTopicReplicationFactor,
            kafka: configuration.kafka, readTimeout: configuration.transactionTimeout)
    }

    /// `--source table --delivery exactly-once`: one unit while holding the relay's lock, or with
    /// `--partitions N` one unit per partition this relay holds.
    func leadExactlyOnce(_ connection: PQConnection, backoff: inout Backoff) async throws {
        let names = try await exactlyOnceNames(connection)
        let log = progressLog(topic: names.topic, partitions: configuration.partitions)
        if configuration.partitions > 1 {
            backoff.reset()
            try await leadPartitionsExactlyOnce(connection, prefix: names.prefix, log: log)
            return
        }
        guard try await becomeActive(connection) else { return }
        setActive(true)
        backoff.reset()
        logger.info(
            "this relay is now the active one (exactly-once)",
            metadata: ["outbox.lock": "\(configuration.leaderLockKey)", "kafka.transactional_id": "\(names.prefix)",
                       "relay.progress_topic": "\(names.topic)"])
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await self.listenForAppends() }
            defer { group.cancelAll() }
            var source = TableTransactionalSource(
                relay: self, connection: connection, lockKey: configuration.leaderLockKey, partitions: .all, wakeup: wakeup)
            let engine = TransactionalPublisher(
                relay: self, unit: PublishingUnit(transactionalID: names.prefix, progressPartition: 0),
                progressLog: log, wakeup: wakeup)
            try await engine.run(&source)
        }
    }

    /// Partitioned exactly-once: every partition this relay wins is a unit of its own (its lock on a
    /// connection of its own, its `transactional.id`, its progress partition), published by its own engine.
    /// Ownership follows ``PartitionOwnership``'s share; a partition given back stops its engine first (and a
    /// new owner's init would fence it anyway).
    private func leadPartitionsExactlyOnce(_ connection: PQConnection, prefix: String, log: ProgressLog) async throws {
        let ownership = PartitionOwnership(count: configuration.partitions, baseKey: configuration.leaderLockKey)
        try await ownership.join(on: connection)
        let running = PartitionEngines()
        defer {
            for partition in running.withLock({ Array($0.keys) }) { stopEngine(partition, running) }
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await self.listenForAppends() }
            defer { group.cancelAll() }
            // Tries partition locks; once one is won, this connection goes to its engine and a new one is made.
            var spare: PQConnection?
            defer { if let spare { Task { await spare.close() } } }
            while !stopRequest.isRequested {
                let members = try await ownership.members(on: connection)
                let target = PartitionOwnership.target(partitions: configuration.partitions, members: members)
                let owned = running.withLock { Set($0.keys) }
                if owned.count > target {
                    for partition in owned.sorted().suffix(owned.count - target) {
                        stopEngine(partition, running)
                    }
                } else if owned.count < target {
                    let start = Int.random(in: 0..<configuration.partitions)
                    var taken = owned.count
                    for offset in 0..<configuration.partitions where taken < target {
                        let partition = (start + offset) % configuration.partitions
                        guard !owned.contains(partition) else { continue }
                        let key = configuration.leaderLockKey &+ Int64(partition)
                        let unitConnection: PQConnection
                        if let spare { unitConnection = spare } else {
                            unitConnection = try await PQConnection.connect(to: configuration.databaseURL)
                        }
                        spare = unitConnection
                        guard try await AdvisoryLocks.tryLock(key, on: unitConnection) else { continue }
                        spare = nil
                        taken += 1
                        let stop = StopRequest(parent: stopRequest)
                        running.withLock { $0[partition] = stop }
                        group.addTask {
                            await self.publishPartition(partition, unitConnection, key: key, prefix: prefix, log: log, stop: stop)
                            running.withLock { _ = $0.removeValue(forKey: partition) }
                        }
                    }
                }
                let now = running.withLock { $0.keys.sorted() }
                setActive(!now.isEmpty)
                metrics.partitionsOwned.record(now.count)
                await stopRequest.sleep(for: configuration.standbyRetryInterval)
            }
        }
    }

    /// Asks a partition's engine to stop, and wakes it: it finishes its transaction round and returns.
    private func stopEngine(_ partition: Int, _ running: PartitionEngines) {
        running.withLock { $0[partition] }?.request()
        partitionWakeups.withLock { $0[partition] }?.signal()
    }

    private func publishPartition(
        _ partition: Int, _ connection: PQConnection, key: Int64, prefix: String, log: ProgressLog, stop: StopRequest
    ) async {
        let wakeup = Wakeup()
        partitionWakeups.withLock { $0[partition] = wakeup }
        defer { partitionWakeups.withLock { _ = $0.removeValue(forKey: partition) } }
        logger.info("publishing outbox partition (exactly-once)", metadata: [
            "outbox.partition": "\(partition)", "outbox.partition_count": "\(configuration.partitions)"])
        var source = TableTransactionalSource(
            relay: self, connection: connection, lockKey: key,
            partitions: OutboxPartitions(count: configuration.partitions, owned: [partition]), wakeup: wakeup)
        let engine = TransactionalPublisher(
            relay: self,
            unit: PublishingUnit(transactionalID: "\(prefix).p\(partition)", progressPartition: Int32(partition)),
            progressLog: log, wakeup: wakeup)
        do {
            try await engine.run(&source, stop: stop)
        } catch {
            logger.warning(
                "publishing of an outbox partition failed; it is free to be taken again",
                metadata: ["outbox.partition": "\(partition)", "error": "\(error)"])
        }
        // Closing the session gives the partition's lock back.
        await connection.close()
    }
}

/// The partitions a relay publishes exactly-once, each with its engine's stop request.
final class PartitionEngines: Sendable {
    private let engines = Mutex<[Int: StopRequest]>([:])
    func withLock<T>(_ body: (inout [Int: StopRequest]) -> T) -> T { engines.withLock { body(&$0) } }
}
