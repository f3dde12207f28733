import EventStore
import KafkaClient
import OutboxRelayStore

/// Settings of an ``OutboxRelay``.
public struct OutboxRelayConfiguration: Sendable {
    /// The service's PostgreSQL (the one holding `outbox`).
    public var databaseURL: String
    /// Brokers and librdkafka properties of the producer.
    public var kafka: KafkaConfiguration
    /// Where the relay finds new outbox rows. Default: ``OutboxSource/table``.
    public var source: OutboxSource = .table
    /// Rows fetched per statement. Default: 1000.
    public var batchSize: Int = 1000 {
        didSet { precondition(batchSize >= 1, "batchSize must be at least 1") }
    }
    /// Most rows handed to Kafka and not yet acknowledged. Bounds the relay's memory while brokers are slow or
    /// down (the rest waits in the outbox). Default: 10,000.
    public var maxInFlight: Int = 10_000 {
        didSet { precondition(maxInFlight >= 1, "maxInFlight must be at least 1") }
    }
    /// Longest wait between looks at the outbox when no NOTIFY arrives; also how often a relay under load
    /// looks behind its cursor for rows of transactions that committed late (skipped ids are rechecked on
    /// every fetch besides). Default: 1 s.
    public var pollInterval: Duration = .seconds(1)
    /// How often the outbox gauges are refreshed and retention runs, backlog or not. Default: 5 s.
    public var housekeepingInterval: Duration = .seconds(5)
    /// How often a standby replica tries to become the active one. Default: 1 s.
    public var standbyRetryInterval: Duration = .seconds(1)
    /// The PostgreSQL advisory lock that elects the one active relay of a database. Relays that should
    /// take turns share it. Default: 7240511002.
    public var leaderLockKey: Int64 = 7_240_511_002
    /// How many partitions the outbox's streams are split into, by a stable hash of the stream id. 1: one
    /// relay of the database is active, the others stand by. N > 1: every running relay publishes a share of
    /// the partitions (advisory locks `leaderLockKey ..< leaderLockKey + N`, plus `leaderLockKey - 1` to count
    /// peers) and the survivors take over a dead relay's share. All relays of one database must use the same N
    /// and lock key. Default: 1.
    public var partitions: Int = 1 {
        didSet { precondition(partitions >= 1, "partitions must be at least 1") }
    }
    /// What a consumer sees after a crash or a Kafka failure. Default: ``DeliveryGuarantee/atLeastOnce``.
    public var delivery: DeliveryGuarantee = .atLeastOnce
    /// How each event is written as a Kafka record. Default: ``RecordFormat/envelope``.
    public var format: RecordFormat = .envelope
    /// Exactly-once: the prefix of the relay's `transactional.id`s (one per unit of ownership: `PREFIX` for a
    /// single active relay, `PREFIX.pN` for partition N, `PREFIX.wal` for a slot). Every deployment that
    /// publishes a different outbox to the same Kafka cluster needs its own. `nil`: derived from the database
    /// (`eventoutbox-relay.DATABASE.SCHEMA`).
    public var transactionalID: String?
    /// Exactly-once: the compacted topic of the relay's progress records. `nil`: `TRANSACTIONAL_ID.progress`.
    public var progressTopic: String?
    /// Exactly-once: replication factor of the progress topic when the relay creates it (-1: the brokers'
    /// `default.replication.factor`). Default: -1.
    public var progressTopicReplicationFactor: Int32 = -1
    /// Exactly-once: the longest a transaction may stay open (`transaction.timeout.ms`), and the longest wait for
    /// a transactional call (init, commit, abort) or for the progress topic. Default: 60 s.
    public var transactionTimeout: Duration = .seconds(60)

    /// What happens to a row once Kafka has it: marked (and deleted after ``retention``) or deleted at once.
    /// Default: ``PublishedRows/mark``.
    public var publishedRows: PublishedRows = .mark
    /// Published rows are kept this long, then deleted in batches. Default: 1 hour.
    public var retention: Duration = .seconds(3600)
    /// Rows deleted per retention statement. Default: 1000.
    public var retentionBatchSize: Int = 1000
    /// Upper bound of the wait between retries after Kafka or PostgreSQL failures. Default: 10 s.
    public var maxBackoff: Duration = .seconds(10)
    /// On shutdown, the longest wait for in-flight deliveries; rows not acknowledged by then stay waiting and
    /// are published again by the next relay. Default: 10 s.
    public var shutdownTimeout: Duration = .seconds(10)

    /// What the relay does to an outbox row once Kafka has acknowledged it.
    public struct PublishedRows: Sendable, Hashable {
        fileprivate let delete: Bool
        /// Set `published_at`, partition and offset; retention deletes the row later. Keeps a record of where
        /// each event went (`eventoutbox outbox status`, audits).
        public static let mark = PublishedRows(delete: false)
        /// Delete the row at once: less write traffic and nothing to vacuum later, no record kept.
        public static let delete = PublishedRows(delete: true)
        public var deletesAtOnce: Bool { delete }
    }

    /// librdkafka defaults of the relay, under the caller's properties. See the Design notes article (EventStore.docc): the
    /// idempotent producer with the gapless guarantee and no message timeout is what keeps each stream in
    /// order with many messages in flight; a broker that is down means waiting, not failing.
    public static let producerDefaults: [String: String] = [
        "enable.idempotence": "true",
        "enable.gapless.guarantee": "true",
        "acks": "all",
        "message.timeout.ms": "0",
        "linger.ms": "2",
        "batch.num.messages": "10000",
        // librdkafka refuses records above 1,000,000 bytes before the broker sees them; a 1 MB event would be
        // dead-lettered for a client-side limit. The topic's max.message.bytes (broker default ~1 MiB) decides.
        "message.max.bytes": "16777216",
    ]

    /// librdkafka defaults of the exactly-once relay: the transactional producer checks sequences itself and
    /// a transaction is all or nothing, so neither the gapless guarantee nor an infinite message timeout (which
    /// librdkafka refuses with transactions) is needed; messages time out with the transaction.
    static let transactionalProducerDefaults: [String: String] = producerDefaults.filter {
        $0.key != "enable.gapless.guarantee" && $0.key != "message.timeout.ms"
    }

    public init(databaseURL: String, kafka: KafkaConfiguration) {
        self.databaseURL = databaseURL
        self.kafka = kafka
    }
}

/// What consumers see after a crash of the relay or a failure in Kafka.
public enum DeliveryGuarantee: String, Sendable, Hashable, CaseIterable {
    /// Every committed event reaches Kafka; after a crash or a producer restart, a suffix of some streams is
    /// published again (consumers dedupe by event id). An idempotent producer, pipelined.
    case atLeastOnce = "at-least-once"
    /// Every committed event reaches Kafka exactly once for `read_committed` consumers: rows go out in Kafka
    /// transactions that also carry the relay's progress, which a restarted relay reads back before publishing.
    /// A relay that lost its lock or slot is fenced and can commit nothing more.
    case exactlyOnce = "exactly-once"
}

/// Where a relay finds the rows to publish.
public enum OutboxSource: Sendable, Hashable {
    /// Polls the `outbox` table (woken by `NOTIFY`) and marks (or deletes) each row Kafka acknowledged. Works
    /// on any PostgreSQL, managed ones without logical replication included. Supports ``OutboxRelayConfiguration/partitions``.
    case table
    /// Reads the outbox's inserts from the write-ahead log through a logical replication slot (`pgoutput`):
    /// rows are never updated, appends need no `NOTIFY`, transactions arrive in commit order. Needs
    /// `wal_level = logical`, a role with `REPLICATION`, and `OutboxWAL.setUp(on:)` (`eventoutbox migrate --wal`).
    /// One relay streams the slot at a time; others stand by.
    case wal(OutboxWAL)
}

/// How the relay writes each event as a Kafka record.
public enum RecordFormat: Sendable, Equatable {
    /// The value is the JSON envelope (`OutboxEnvelope`: id, stream, version, type, time, payload, metadata);
    /// headers `event-id`, `event-type`, `stream-version`, `traceparent`.
    case envelope
    /// A CloudEvent in the Kafka binding's binary mode: the value is the payload, the attributes are `ce_`
    /// headers (`CloudEventsBinding`). `ce_source` is `source`, or `/eventoutbox/TOPIC` when `nil`. Read by any
    /// CloudEvents SDK, and by this toolkit's consumers as well as the envelope.
    case cloudEvents(source: String?)
}
