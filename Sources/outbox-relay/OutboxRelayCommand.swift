import ArgumentParser
import CommandLineSupport
import Foundation
import KafkaClient
import Logging
import Observability
import OutboxRelay
import ServiceLifecycle
import UnixSignals

@main
struct OutboxRelayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "outbox-relay",
        abstract: "Publish a service's committed outbox rows to Kafka, in order per stream, losing nothing.",
        discussion: """
            Run it next to each service (a sidecar). It wakes on the NOTIFY that every append sends and also \
            polls. Several replicas may run against one database: one is active (PostgreSQL advisory lock), the \
            others stand by and take over within seconds if it dies.

            Rows are marked published only after Kafka acknowledges them (idempotent producer, acks=all). A \
            broker that is down means retries with backoff; nothing is dropped. A row Kafka can never accept \
            goes to the dead-letter table (see `eventoutbox dead-letters`) and holds back its stream.

            SIGTERM/SIGINT: stop taking rows, wait for in-flight deliveries, mark them, exit 0.

            Example:
              outbox-relay --database-url postgresql:///app --brokers 127.0.0.1:9092 --metrics-port 9464
            """
    )

    @OptionGroup var database: DatabaseOption

    @OptionGroup var kafka: KafkaBrokersOption

    @Option(help: "Rows fetched per batch.")
    var batchSize: Int = 500

    @Option(help: "Seconds between looks at the outbox when no NOTIFY arrives.")
    var pollInterval: Double = 1

    @Option(help: "Seconds between a standby's attempts to become active.")
    var standbyInterval: Double = 1

    @Option(help: "Advisory lock key shared by the relays of one database.")
    var lockKey: Int64 = 7_240_511_002

    @Option(help: "Seconds to keep published rows before deleting them.")
    var retention: Double = 3600

    @Option(
        name: .customLong("kafka-property"),
        help: ArgumentHelp(
            "A librdkafka property, key=value, as named in librdkafka's CONFIGURATION.md (repeatable); e.g. linger.ms=5.",
            valueName: "key=value"))
    var kafkaProperties: [String] = []

    @Option(help: "Serve Prometheus metrics at http://HOST:PORT/metrics.")
    var metricsPort: Int?

    @Option(help: "Address the metrics endpoint binds to.")
    var metricsHost: String = "127.0.0.1"

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func validate() throws {
        guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1") }
        guard pollInterval > 0, standbyInterval > 0 else { throw ValidationError("intervals must be positive") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
    }

    func run() async throws {
        let url = try database.url()
        let brokers = try kafka.bootstrapServers()
        let metricsServer = try Observability.bootstrap(
            logLevel: Logger.Level(rawValue: logLevel) ?? .info, metricsHost: metricsHost, metricsPort: metricsPort)
        defer { metricsServer?.stop() }
        let logger = Logger(label: "outbox-relay")
        if let metricsServer { logger.info("metrics at http://\(metricsHost):\(metricsServer.port)/metrics") }

        var configuration = OutboxRelayConfiguration(
            databaseURL: url,
            kafka: KafkaConfiguration(bootstrapServers: brokers, properties: try KafkaConfiguration.parseProperties(kafkaProperties)))
        configuration.batchSize = batchSize
        configuration.pollInterval = .milliseconds(Int(pollInterval * 1000))
        configuration.standbyRetryInterval = .milliseconds(Int(standbyInterval * 1000))
        configuration.leaderLockKey = lockKey
        configuration.retention = .seconds(retention)

        let relay = OutboxRelay(configuration: configuration, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: relay)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
