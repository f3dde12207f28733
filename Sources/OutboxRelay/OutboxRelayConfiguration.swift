import EventStore
import KafkaClient

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

    /// librdkafka defaults of the relay, under the caller's properties. See README, "Design notes": the
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

    public init(databaseURL: String, kafka: KafkaConfiguration) {
        self.databaseURL = databaseURL
        self.kafka = kafka
    }
}

/// Where a relay finds the rows to publish.
public enum OutboxSource: Sendable, Hashable {
    /// Polls the `outbox` table (woken by `NOTIFY`) and marks (or deletes) each row Kafka acknowledged. Works
    /// on any PostgreSQL, managed ones without logical replication included. Supports ``OutboxRelayConfiguration/partitions``.
    case table
    /// Reads the outbox's inserts from the write-ahead log through a logical replication slot (`pgoutput`):
    /// rows are never updated, appends need no `NOTIFY`, transactions arrive in commit order. Needs
    /// `wal_level = logical`, a role with `REPLICATION`, and ``OutboxWAL/setUp(on:)`` (`eventoutbox migrate --wal`).
    /// One relay streams the slot at a time; others stand by.
    case wal(OutboxWAL)
}
