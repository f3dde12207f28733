import Coordination
import EventSourcing
import EventStore
import Foundation
@_spi(Testing) import KafkaClient
import Logging
import Metrics
import LibPQ
import ServiceLifecycle
import Synchronization
import Tracing

/// Settings of a ``ProjectionConsumer``.
public struct ProjectionConsumerConfiguration: Sendable {
    public var databaseURL: String
    /// The connections to apply with: the service's own pool, if it hands one over; `nil`: a small pool of the
    /// consumer's own on ``databaseURL``.
    public var pool: PQPool?
    public var kafka: KafkaConfiguration
    /// Kafka consumer group; members of one group share the partitions.
    public var groupID: String
    public var topics: [String]
    /// Offsets are committed (after the database commit) at least this often while records flow. Default: 500 ms.
    public var commitInterval: Duration = .milliseconds(500)
    /// Upper bound of the wait between retries of a record after a database failure. Default: 5 s.
    public var maxBackoff: Duration = .seconds(5)
    /// Records already received are applied together, up to this many per transaction. Default: 200.
    public var maxBatch: Int = 200
    /// A record whose handler keeps failing for a reason retrying cannot fix (an error of its own, SQL that
    /// does not fit the schema) is dead-lettered after this many attempts, and its partition goes on.
    /// Transient database failures (connection lost, serialization failure, deadlock) are retried without
    /// limit. Default: 5.
    public var maxHandlerAttempts: Int = 5 {
        didSet { precondition(maxHandlerAttempts >= 1, "maxHandlerAttempts must be at least 1") }
    }

    /// A consumer applying through the service's own pool (its URL serves the consumer's side connections, such as
    /// the lock that lets projectors take turns preparing).
    public init(pool: PQPool, kafka: KafkaConfiguration, groupID: String, topics: [String]) {
        self.init(databaseURL: pool.configuration.url, kafka: kafka, groupID: groupID, topics: topics)
        self.pool = pool
    }

    public init(databaseURL: String, kafka: KafkaConfiguration, groupID: String, topics: [String]) {
        self.databaseURL = databaseURL
        self.pool = nil
        self.kafka = kafka
        self.groupID = groupID
        self.topics = topics
    }
}

/// Builds projections from Kafka, applying every event's effect once although Kafka delivers at least once.
///
/// Records that have arrived (up to ``ProjectionConsumerConfiguration/maxBatch``) are decoded and applied in one
/// PostgreSQL transaction: per projection, the handler gets the events new to it and the stream versions it
/// reached are recorded (see ``ProjectionApplier``); a second delivery of an event is skipped and counted.
/// Offsets are committed to Kafka only after that transaction committed. A record that
/// cannot be decoded or has an unknown type goes to `projection_dead_letters` with its raw bytes and the
/// reason, and the consumer goes on; so does a record a projection's handler refuses for good, for that
/// projection only (the consumer's other projections apply it). Database failures are retried (with backoff) on the same record.
///
/// On first start, projections whose tables do not exist are back-filled from the event store
/// (see ``ProjectionRebuilder``) before consuming.
public final class ProjectionConsumer: Service, Sendable {
    public let configuration: ProjectionConsumerConfiguration
    public let applier: ProjectionApplier
    private let logger: Logger
    /// Graceful stop: the loop finishes its batch and commits; a retry's back-off ends at once.
    private let stopRequest = StopRequest()
    private let counts = ConsumerCounts()
    private let metrics = ConsumerMetrics()
    /// Where records are applied: ``ProjectionConsumerConfiguration/pool``, or one of the consumer's own.
    private let pool: PQPool
    private let ownsPool: Bool

    public init(configuration: ProjectionConsumerConfiguration, applier: ProjectionApplier, logger: Logger = Logger(label: "eventoutbox.projections")) {
        self.configuration = configuration
        self.applier = applier
        self.logger = logger
        pool = configuration.pool ?? PQPool(url: configuration.databaseURL, maxConnections: 2)
        ownsPool = configuration.pool == nil
    }

    public var appliedCount: Int { counts.applied.load(ordering: .relaxed) }
    public var duplicateCount: Int { counts.duplicates.load(ordering: .relaxed) }
    public var deadLetterCount: Int { counts.deadLettered.load(ordering: .relaxed) }

    /// Asks the consumer to finish: the current batch is applied (or its retry given up), offsets are committed.
    public func stop() { stopRequest.request() }
    /// The running Kafka consumer, for the test hook.
    private let current = Mutex<KafkaConsumer?>(nil)

    /// Creates the dead-letter table and back-fills projections that have never been built. Projectors that
    /// start together take turns (an advisory lock): concurrent `CREATE TABLE IF NOT EXISTS` can fail in
    /// PostgreSQL's catalog, and one back-fill per projection is enough.
    public func prepare() async throws {
        // One lock per schema (the projections' tables live there); released when this session closes.
        let lock = try await PQConnection.connect(to: pool.configuration.url)
        do {
            try await lock.query(
                "SELECT pg_advisory_lock($1, hashtext(current_schema()))", [.int32(AdvisoryLockClass.projectorPrepare.rawValue)],
                statement: "projections: prepare lock")
        } catch {
            await lock.close()
            throw error
        }
        do {
            try await SchemaMigrator([ProjectionSchema.module]).migrate(pool)
            for projection in applier.projections {
                let exists = try await pool.withConnection { try await ProjectionSchema.exists(projection, on: $0) }
                if exists {
                    try await pool.withConnection { try await ProjectionSchema.upgrade(projection, on: $0) }
                } else {
                    logger.info("back-filling a new projection from the event store", metadata: ["projection": "\(projection.name)"])
                    try await ProjectionRebuilder(pool: pool, registry: applier.registry, logger: logger).rebuild(projection)
                }
            }
        } catch {
            await lock.close()
            throw error
        }
        await lock.close()
    }

    /// Consumes until graceful shutdown: then it finishes the current record, commits offsets, leaves the group.
    /// - Throws: a fatal Kafka error (the consumer can no longer consume; after committing what was applied), so
    ///   that a process ends with the reason instead of looking finished.
    public func run() async throws {
        let consumer: KafkaConsumer
        do {
            // The client first: properties librdkafka refuses end the projector before it touches the database.
            consumer = try KafkaConsumer(configuration: configuration.kafka, groupID: configuration.groupID, logger: logger)
        } catch {
            if ownsPool { await pool.close() }
            throw error
        }
        do {
            try await prepare()
            try consumer.subscribe(topics: configuration.topics)
        } catch {
            await consumer.close()
            if ownsPool { await pool.close() }
            throw error
        }
        current.withLock { $0 = consumer }
        let (fatal, last) = await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                await self.consume(consumer)
            } onCancel: {
                self.stop()
            }
        } onGracefulShutdown: {
            self.stop()
        }
        current.withLock { $0 = nil }
        await last.close()
        if ownsPool { await pool.close() }
        if let fatal {
            logger.error("projection consumer stopped by a fatal Kafka error", metadata: ["kafka.error": "\(fatal)"])
            throw fatal
        }
        logger.info(
            "projection consumer stopped",
            metadata: ["applied": "\(appliedCount)", "duplicates": "\(duplicateCount)", "dead.lettered": "\(deadLetterCount)"])
    }

    /// Raises a fatal error in the running consumer (see ``KafkaConsumer/raiseFatalErrorForTesting(_:)``).
    @_spi(Testing) public func raiseFatalKafkaErrorForTesting(_ reason: String) {
        current.withLock { $0 }?.raiseFatalErrorForTesting(reason)
    }

    /// Offset commits refused this many times in a row with ILLEGAL_GENERATION (the group moved on without this
    /// member) make the consumer rejoin as a new member; one refusal with UNKNOWN_MEMBER_ID does.
    static let rejoinAfterFencedCommits = 3

    /// Consumes until asked to stop; returns the fatal Kafka error that ended it, if one did, and the consumer in
    /// use at the end (a fenced one is replaced on the way).
    private func consume(_ first: KafkaConsumer) async -> (fatal: (any Error)?, consumer: KafkaConsumer) {
        var consumer = first
        var fatal: (any Error)?
        var fencedCommits = 0
        var pending: [KafkaTopicPartition: Int64] = [:]
        var pendingCount = 0
        var lastCommit = ContinuousClock.now
        var lastLag = ContinuousClock.now
        var backoff: Duration = .milliseconds(100)
        var attempts = 0

        func commitPending() async {
            guard !pending.isEmpty else { return }
            let offsets = pending.map { KafkaTopicPartitionOffset(topic: $0.key.topic, partition: $0.key.partition, offset: $0.value) }
            do {
                try await consumer.commit(offsets)
                pending.removeAll()
                pendingCount = 0
                fencedCommits = 0
            } catch {
                // Not fatal: the records are applied; at worst they are delivered again and skipped.
                logger.warning("offset commit failed; will retry", metadata: ["kafka.error": "\(error)"])
                // ILLEGAL_GENERATION also comes in passing, right after an ordinary rebalance; UNKNOWN_MEMBER_ID
                // means the coordinator has dropped this member (its session timed out, as in a full outage).
                switch (error as? KafkaError)?.code {
                case .illegalGeneration?: fencedCommits += 1
                case .unknownMemberID?: fencedCommits = Self.rejoinAfterFencedCommits
                default: break
                }
            }
            lastCommit = .now
        }

        /// The group went on without this member and it is not finding its way back (seen with a member of the
        /// group SIGKILLed): leave, and join again as a new member. The records applied since the last commit are
        /// delivered again and skipped as duplicates.
        func rejoin() async -> Bool {
            logger.warning(
                "the group no longer accepts this member's offsets; rejoining as a new member",
                metadata: ["uncommitted.records": "\(pendingCount)", "group": "\(configuration.groupID)"])
            await consumer.close()
            do {
                let fresh = try KafkaConsumer(configuration: configuration.kafka, groupID: configuration.groupID, logger: logger)
                try fresh.subscribe(topics: configuration.topics)
                consumer = fresh
                current.withLock { $0 = fresh }
                logger.info("rejoined the group as a new member; its partitions follow the group's rebalance", metadata: ["group": "\(configuration.groupID)"])
            } catch {
                fatal = error
                return false
            }
            pending.removeAll()
            pendingCount = 0
            fencedCommits = 0
            return true
        }

        while !stopRequest.isRequested {
            // Whatever has arrived, up to maxBatch records, is applied in one transaction.
            let batch: [KafkaMessage]
            do {
                batch = try await consumer.poll(upTo: configuration.maxBatch, timeout: .milliseconds(100))
            } catch {
                fatal = error
                break
            }
            if !batch.isEmpty {
                while !stopRequest.isRequested {
                    do {
                        let giveUp = attempts + 1 >= configuration.maxHandlerAttempts
                        // A broken connection goes back to the pool, which drops it; the retry gets a fresh one.
                        try await pool.withConnection { try await self.handle(batch, giveUp: giveUp, on: $0) }
                        backoff = .milliseconds(100)
                        attempts = 0
                        for message in batch {
                            pending[KafkaTopicPartition(topic: message.topic, partition: message.partition)] = message.offset + 1
                        }
                        pendingCount += batch.count
                        break
                    } catch {
                        if !Self.isTransient(error) { attempts += 1 }
                        logger.warning(
                            "failure while applying records; retrying",
                            metadata: [
                                "error": "\(error)", "kafka.offset": "\(batch[0].offset)", "retry.in": "\(backoff)",
                                "attempt": "\(attempts)",
                            ])
                        await stopRequest.sleep(for: backoff)
                        backoff = min(backoff * 2, configuration.maxBackoff)
                    }
                }
            }
            if pendingCount >= 500 || ContinuousClock.now - lastCommit >= configuration.commitInterval {
                await commitPending()
                if fencedCommits >= Self.rejoinAfterFencedCommits, !(await rejoin()) { break }
            }
            if ContinuousClock.now - lastLag >= .seconds(1) {
                for (partition, lag) in await consumer.lag() {
                    Gauge(label: "eventoutbox_projection_consumer_lag", dimensions: [("topic", partition.topic), ("partition", String(partition.partition))])
                        .record(lag)
                }
                lastLag = .now
            }
        }
        await commitPending()
        return (fatal, consumer)
    }

    /// Applies a batch of records in one transaction. A batch holding a record that does not decode, or whose
    /// handler fails for a reason other than the database being unavailable, is applied record by record
    /// instead, so that only the bad record is dead-lettered. Throws only for failures worth retrying.
    private func handle(_ batch: [KafkaMessage], giveUp: Bool, on connection: PQConnection) async throws {
        guard batch.count > 1 else { return try await handle(batch[0], giveUp: giveUp, on: connection) }
        var events: [ProjectedEvent] = []
        events.reserveCapacity(batch.count)
        for message in batch {
            guard let recorded = try? Self.recordedEvent(message),
                let event = try? applier.registry.decode(recorded)
            else { break }
            events.append(ProjectedEvent(event: event, recorded: recorded, topic: message.topic))
        }
        if events.count == batch.count {
            let started = ContinuousClock.now
            let traceStart = DefaultTracerClock.now
            let events = events
            do {
                let outcome = try await connection.withTransaction { tx in try await self.applier.apply(events, on: tx) }
                count(outcome, events: events.count, since: started)
                Self.trace(events.map(\.recorded), since: traceStart)
                return
            } catch where Self.isTransient(error) {
                throw error
            } catch {
                logger.info("a batch failed; applying its records one by one", metadata: ["error": "\(error)"])
            }
        }
        for message in batch { try await handle(message, giveUp: giveUp, on: connection) }
    }

    /// The stored event a record describes, in either format the relay writes: a CloudEvent in binary mode
    /// (a `ce_specversion` header), or the JSON envelope.
    /// - Throws: ``EnvelopeError`` saying which format the record was taken for and what is wrong.
    static func recordedEvent(_ message: KafkaMessage) throws -> RecordedEvent {
        try recordedEvent(headers: message.stringHeaders, value: message.value)
    }

    static func recordedEvent(headers: [String: String], value: [UInt8]?) throws -> RecordedEvent {
        guard let value else { throw EnvelopeError("the record has no value") }
        if headers[CloudEventsBinding.specVersionHeader] != nil {
            do {
                return try CloudEventsBinding.recordedEvent(headers: headers, value: value)
            } catch {
                throw EnvelopeError("not an EventOutbox CloudEvent: \(error)", underlying: error)
            }
        }
        do {
            return try OutboxEnvelope.recordedEvent(from: value)
        } catch {
            throw EnvelopeError("not an EventOutbox envelope: \(error)", underlying: error)
        }
    }

    /// Failures that a later attempt can get past: the database unreachable or restarting, serialization
    /// failures, deadlocks, and another consumer applying a new stream at the same moment.
    static func isTransient(_ error: any Error) -> Bool {
        (error as? PQError)?.isRetriable ?? (error is ConcurrentProjectionUpdate)
    }

    /// Applies one record to every projection in one transaction; if a projection refuses it, to each projection
    /// in its own transaction, so that one projection refusing it does not keep it from the others, and
    /// dead-letters it for a projection that refuses it for good (or for all, when it does not decode). Throws for failures worth retrying: transient ones, and (until `giveUp`) those of a
    /// handler that a fix (a migration, a restart) might cure. Projections that applied it before a retry skip
    /// it then as a duplicate.
    private func handle(_ message: KafkaMessage, giveUp: Bool, on connection: PQConnection) async throws {
        var logger = self.logger
        if let traceparent = (message.header("traceparent") ?? message.header("ce_traceparent"))?.stringValue {
            logger[metadataKey: "traceparent"] = "\(traceparent)"
        }
        let event: ProjectedEvent
        do {
            let recorded = try Self.recordedEvent(message)
            event = ProjectedEvent(event: try applier.registry.decode(recorded), recorded: recorded, topic: message.topic)
        } catch {
            try await deadLetter(message, projection: nil, reason: "\(error)", on: connection, logger: logger)
            return
        }
        let started = ContinuousClock.now
        let traceStart = DefaultTracerClock.now
        // All projections in one transaction, as a batch is: the read models move together. Only if that fails
        // for a reason other than the database does each projection get its own, so that one refusing the event
        // does not keep it from the others.
        do {
            let outcome = try await connection.withTransaction { tx in try await self.applier.apply([event], on: tx) }
            count(outcome, events: 1, since: started)
            Self.trace([event.recorded], since: traceStart)
            logger.trace("applied", metadata: ["event.id": "\(event.recorded.eventID)", "duplicates": "\(outcome.duplicates)"])
            return
        } catch where Self.isTransient(error) {
            throw error
        } catch {
            logger.info("a projection refused a record; applying it to each projection on its own", metadata: ["error": "\(error)"])
        }
        var outcome = ProjectionApplier.Outcome()
        for projection in applier.projections {
            do {
                let applied = try await connection.withTransaction { tx in
                    try await self.applier.only(projection).apply([event], on: tx)
                }
                outcome.applied += applied.applied
                outcome.duplicates += applied.duplicates
            } catch let error as PQError where !error.isRetriable && error.code == .server && error.sqlState?.hasPrefix(SQLState.syntaxErrorOrAccessRuleViolationClass) != true {
                // A deterministic failure of the handler's SQL (constraint, bad value): retrying cannot help.
                try await deadLetter(message, projection: projection.name, reason: "handler failed: \(error)", on: connection, logger: logger)
            } catch where giveUp && !Self.isTransient(error) {
                try await deadLetter(
                    message, projection: projection.name,
                    reason: "handler failed \(configuration.maxHandlerAttempts) times: \(error)", on: connection, logger: logger)
            }
        }
        count(outcome, events: 1, since: started)
        Self.trace([event.recorded], since: traceStart)
        logger.trace("applied", metadata: ["event.id": "\(event.recorded.eventID)", "duplicates": "\(outcome.duplicates)"])
    }

    private func count(_ outcome: ProjectionApplier.Outcome, events: Int, since started: ContinuousClock.Instant) {
        counts.applied.add(outcome.applied, ordering: .relaxed)
        counts.duplicates.add(outcome.duplicates, ordering: .relaxed)
        metrics.applied.increment(by: outcome.applied)
        metrics.duplicates.increment(by: outcome.duplicates)
        let elapsed = (ContinuousClock.now - started).components
        let perEvent = (elapsed.seconds * 1_000_000_000 + elapsed.attoseconds / 1_000_000_000) / Int64(events)
        for _ in 0..<events { metrics.applyLatency.recordNanoseconds(perEvent) }
    }

    /// A span per applied event that carries a trace (its `traceparent`), continuing it: from the start of the
    /// transaction that applied it to its commit.
    static func trace(_ events: [RecordedEvent], since start: DefaultTracerClock.Instant) {
        for event in events {
            guard let traceparent = event.metadata.traceparent else { continue }
            let span = InstrumentationSystem.tracer.startSpan(
                "eventoutbox.apply", context: TraceContext.context(continuing: traceparent), ofKind: .consumer, at: start)
            span.attributes["eventoutbox.event_id"] = event.eventID.uuidString.lowercased()
            span.attributes["eventoutbox.event_type"] = event.eventType
            span.attributes["eventoutbox.stream_id"] = event.streamID
            span.end()
        }
    }

    private func deadLetter(
        _ message: KafkaMessage, projection: String?, reason: String, on connection: PQConnection, logger: Logger
    ) async throws {
        try await ProjectionDeadLetters.record(
            consumer: configuration.groupID, projection: projection, topic: message.topic, partition: message.partition,
            offset: message.offset, key: message.key, value: message.value, headers: message.stringHeaders, reason: reason,
            on: connection)
        counts.deadLettered.add(1, ordering: .relaxed)
        metrics.deadLettered.increment()
        logger.error(
            "record moved to projection_dead_letters; consuming goes on",
            metadata: [
                "kafka.topic": "\(message.topic)", "kafka.partition": "\(message.partition)", "kafka.offset": "\(message.offset)",
                "projection": "\(projection ?? "all")", "reason": "\(reason)",
            ])
    }
}

struct EnvelopeError: Error, CustomStringConvertible {
    var description: String
    /// The parser's own error, kept for whoever looks into it.
    var underlying: (any Error)?
    init(_ description: String, underlying: (any Error)? = nil) {
        self.description = description
        self.underlying = underlying
    }
}

private final class ConsumerCounts: Sendable {
    let applied = Atomic<Int>(0)
    let duplicates = Atomic<Int>(0)
    let deadLettered = Atomic<Int>(0)
}

private struct ConsumerMetrics: Sendable {
    let applied = Counter(label: "eventoutbox_projection_applied_total")
    let duplicates = Counter(label: "eventoutbox_projection_duplicates_skipped_total")
    let deadLettered = Counter(label: "eventoutbox_projection_dead_lettered_total")
    let applyLatency = Metrics.Timer(label: "eventoutbox_projection_apply_duration_seconds")
}

extension KafkaMessage {
    /// The headers that have a UTF-8 value, by name (the last one wins).
    var stringHeaders: [String: String] {
        var result: [String: String] = [:]
        for header in headers { if let value = header.stringValue { result[header.name] = value } }
        return result
    }
}
