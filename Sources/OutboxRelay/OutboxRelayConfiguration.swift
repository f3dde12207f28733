import KafkaClient

/// Settings of an ``OutboxRelay``.
public struct OutboxRelayConfiguration: Sendable {
    /// The service's PostgreSQL (the one holding `outbox`).
    public var databaseURL: String
    /// Brokers and librdkafka properties of the producer.
    public var kafka: KafkaConfiguration
    /// Rows fetched per batch. Default: 500.
    public var batchSize: Int = 500
    /// Longest wait between looks at the outbox when no NOTIFY arrives. Default: 1 s.
    public var pollInterval: Duration = .seconds(1)
    /// How often a standby replica tries to become the active one. Default: 1 s.
    public var standbyRetryInterval: Duration = .seconds(1)
    /// The PostgreSQL advisory lock that elects the one active relay of a database. Relays that should
    /// take turns share it. Default: 7240511002.
    public var leaderLockKey: Int64 = 7_240_511_002
    /// Published rows are kept this long, then deleted in batches. Default: 1 hour.
    public var retention: Duration = .seconds(3600)
    /// Rows deleted per retention statement. Default: 1000.
    public var retentionBatchSize: Int = 1000
    /// Upper bound of the wait between retries after Kafka or PostgreSQL failures. Default: 10 s.
    public var maxBackoff: Duration = .seconds(10)
    /// On shutdown, how long to wait for in-flight deliveries before giving up on them (they stay unmarked
    /// and are published again by the next relay). Default: 10 s.
    public var shutdownTimeout: Duration = .seconds(10)

    /// librdkafka defaults of the relay, under the caller's properties: idempotent, acks=all, and a bounded
    /// delivery timeout so that a dead broker is noticed and retried from the outbox.
    public static let producerDefaults: [String: String] = [
        "enable.idempotence": "true",
        "acks": "all",
        "linger.ms": "2",
        "message.timeout.ms": "30000",
    ]

    public init(databaseURL: String, kafka: KafkaConfiguration) {
        self.databaseURL = databaseURL
        self.kafka = kafka
    }
}
