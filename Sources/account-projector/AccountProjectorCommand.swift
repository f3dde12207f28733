import ArgumentParser
import CommandLineSupport
import BankAccount
import Foundation
import KafkaClient
import Logging
import Observability
import PostgresClient
import Projections
import ServiceLifecycle
import UnixSignals

@main
struct AccountProjectorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "account-projector",
        abstract: "Build the bank's read models (account_balances, daily_volume) from Kafka, idempotently.",
        discussion: """
            Consumes the bank.accounts topic as a consumer group and applies every event once per projection: \
            the projection's writes and "event X applied" commit in one transaction, and Kafka offsets are \
            committed only after it. Records that cannot be decoded go to projection_dead_letters. \
            On first start, projections are back-filled from the event store.

            --rebuild NAME replays the event store into fresh tables through the same code, swaps them in \
            atomically, and exits; a running projector goes on without double counting.

            Examples:
              account-projector --metrics-port 9465
              account-projector --rebuild daily_volume
            """
    )

    @OptionGroup var database: DatabaseOption

    @OptionGroup var kafka: KafkaBrokersOption

    @Option(help: "Kafka consumer group.")
    var group: String = "account-projector"

    @Option(help: "Topic to consume.")
    var topic: String = BankEvents.topic

    @Option(
        name: .customLong("kafka-property"),
        help: ArgumentHelp("A librdkafka consumer property, key=value (repeatable).", valueName: "key=value"))
    var kafkaProperties: [String] = []

    @Option(help: "Rebuild one projection (\(AccountProjections.all.map(\.name).joined(separator: ", "))) from the event store, then exit.")
    var rebuild: String?

    @Option(help: "Seconds between Kafka offset commits while records flow (they follow the database commits).")
    var commitInterval: Double = 0.5

    @Option(help: "Serve Prometheus metrics at http://HOST:PORT/metrics.")
    var metricsPort: Int?

    @Option(help: "Address the metrics endpoint binds to.")
    var metricsHost: String = "127.0.0.1"

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func validate() throws {
        if let rebuild, !AccountProjections.all.contains(where: { $0.name == rebuild }) {
            throw ValidationError("unknown projection '\(rebuild)'; known: \(AccountProjections.all.map(\.name).joined(separator: ", "))")
        }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
    }

    func run() async throws {
        let url = try database.url()
        let metricsServer = try Observability.bootstrap(
            logLevel: Logger.Level(rawValue: logLevel) ?? .info, metricsHost: metricsHost,
            metricsPort: rebuild == nil ? metricsPort : nil)
        defer { metricsServer?.stop() }
        let logger = Logger(label: "account-projector")

        if let name = rebuild, let projection = AccountProjections.all.first(where: { $0.name == name }) {
            let pool = PostgresPool(url: url, maxConnections: 2)
            let count = try await ProjectionRebuilder(pool: pool, registry: BankEvents.registry, logger: logger).rebuild(projection) { progress in
                FileHandle.standardError.write(Data(
                    "\r\(progress.projection): \(progress.done)/\(progress.total) events, \(Int(progress.eventsPerSecond)) events/s".utf8))
            }
            FileHandle.standardError.write(Data("\n".utf8))
            print("rebuilt \(name) from \(count) events")
            await pool.close()
            return
        }

        let brokers = try kafka.bootstrapServers()
        var configuration = ProjectionConsumerConfiguration(
            databaseURL: url,
            kafka: KafkaConfiguration(bootstrapServers: brokers, properties: try KafkaConfiguration.parseProperties(kafkaProperties)),
            groupID: group, topics: [topic])
        configuration.commitInterval = .milliseconds(Int(commitInterval * 1000))
        let consumer = ProjectionConsumer(
            configuration: configuration,
            applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry),
            logger: logger)
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: consumer)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
