import ArgumentParser
import BankAccount
import BankProjections
import CommandLineSupport
import EventSourcing
import Foundation
import KafkaClient
import Logging
import Observability
import LibPQ
import Projections
import ServiceLifecycle
import UnixSignals

@main
struct AccountProjectorCommand: AsyncParsableCommand {
    static func main() async { await mainReadingEnvironment() }

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

            Records it could not apply (undecodable, an unknown type, a handler that keeps failing) are kept in \
            projection_dead_letters, per projection: one projection refusing an event does not keep it from \
            the others, and a back-fill or rebuild sets such events aside the same way and goes on. \
            --dead-letters lists them, --show-dead-letter ID prints one with its raw \
            bytes, --retry-dead-letter ID applies it to the projection that refused it (once the cause is fixed) \
            and deletes it, in one transaction.

            Examples:
              account-projector --metrics-port 9465
              account-projector --rebuild daily_volume
              account-projector --dead-letters
              account-projector --retry-dead-letter 7
            """ + "\n\n" + TraceExport.help + "\n\n" + EnvironmentOptions.help("account-projector", example: "commit-interval", "0.5"),
        version: EventOutboxVersion.current
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

    @Flag(help: "List the records this group dead-lettered (id, topic/partition@offset, size, time, reason), then exit.")
    var deadLetters = false

    @Option(help: ArgumentHelp("Print one dead letter with its key and value (text, or hex if not UTF-8), then exit.", valueName: "id"))
    var showDeadLetter: Int64?

    @Option(help: ArgumentHelp("Apply one dead letter to the projections and delete it (fix the cause first), then exit.", valueName: "id"))
    var retryDeadLetter: Int64?

    @Option(help: "Seconds between Kafka offset commits while records flow (they follow the database commits).")
    var commitInterval: Double = 0.5

    @OptionGroup var operations: OperationsOptions

    func validate() throws {
        if let rebuild, !AccountProjections.all.contains(where: { $0.name == rebuild }) {
            throw ValidationError("unknown projection '\(rebuild)'; known: \(AccountProjections.all.map(\.name).joined(separator: ", "))")
        }
        try OptionCheck.seconds(commitInterval, "--commit-interval", in: 0.001...3600)
    }

    func run() async throws {
        if deadLetters || showDeadLetter != nil || retryDeadLetter != nil {
            return try await reportingFailures { try await administerDeadLetters() }
        }
        let url = try database.url()
        let processOperations = try operations.bootstrap(serviceName: "account-projector", databaseURL: url, asService: rebuild == nil)
        let logger = Logger(label: "account-projector")

        if let name = rebuild, let projection = AccountProjections.all.first(where: { $0.name == name }) {
            let pool = PQPool(url: url, maxConnections: 2)
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
            kafka: KafkaConfiguration(bootstrapServers: brokers, properties: try kafka.fileProperties().merging(KafkaConfiguration.parseProperties(kafkaProperties)) { $1 }),
            groupID: group, topics: [topic])
        configuration.commitInterval = OptionCheck.duration(commitInterval)
        let consumer = ProjectionConsumer(
            configuration: configuration,
            applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry),
            logger: logger)
        let group = processOperations.serviceGroup([consumer], logger: logger)
        try await group.run()
    }

    private func administerDeadLetters() async throws {
        let connection = try await PQConnection.connect(to: try database.url())
        do {
            try await administerDeadLetters(on: connection)
        } catch {
            await connection.close()
            throw error
        }
        await connection.close()
    }

    private func administerDeadLetters(on connection: PQConnection) async throws {
        if deadLetters {
            let letters = try await ProjectionDeadLetters.list(consumer: group, on: connection)
            if letters.isEmpty { print("no dead letters for group '\(group)'") }
            for letter in letters {
                print("\(letter.id)\t\(letter.origin)\t\(letter.projection ?? "all projections")\t\(letter.value?.count ?? 0) bytes\t"
                    + "\(ISOTimestamp.format(letter.receivedAt))\t\(letter.reason)")
            }
        } else if let id = showDeadLetter {
            guard let letter = try await ProjectionDeadLetters.find(id, on: connection) else {
                throw ValidationError("no dead letter with id \(id); see `account-projector --dead-letters`")
            }
            func bytes(_ value: [UInt8]?) -> String {
                guard let value else { return "(none)" }
                if let text = String(validating: value, as: UTF8.self) { return text }
                return "hex " + value.map { String(format: "%02x", $0) }.joined()
            }
            print("id:         \(letter.id)\ngroup:      \(letter.consumer)\nprojection: \(letter.projection ?? "all projections")")
            print("record:     \(letter.origin)")
            print("received:   \(ISOTimestamp.format(letter.receivedAt))\nreason:     \(letter.reason)")
            print("key:        \(bytes(letter.key))\nvalue:      \(bytes(letter.value))")
        } else if let id = retryDeadLetter {
            let applier = ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry)
            guard let outcome = try await ProjectionDeadLetters.retry(id, with: applier, on: connection) else {
                throw ValidationError("no dead letter with id \(id); see `account-projector --dead-letters`")
            }
            print("dead letter \(id) applied to \(outcome.applied) projection(s) and removed")
        }
    }
}
