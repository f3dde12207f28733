import ArgumentParser
import CommandLineSupport
import EventStore
import EventSourcing
import Foundation
import KafkaClient
import Logging
import Observability
import OutboxRelay
import OutboxRelayStore
import ServiceLifecycle
import UnixSignals

@main
struct OutboxRelayCommand: AsyncParsableCommand {
    static func main() async { await mainReadingEnvironment() }

    static let configuration = CommandConfiguration(
        commandName: "outbox-relay",
        abstract: "Publish a service's committed outbox rows to Kafka, in order per stream, losing nothing.",
        discussion: """
            Run it next to each service (a sidecar). It wakes on the NOTIFY that every append sends and also \
            polls. Several replicas may run against one database: one is active (PostgreSQL advisory lock), the \
            others stand by and take over within seconds if it dies. With --partitions N (the same N for all), \
            the streams are split into N partitions by a hash of the stream id and every replica publishes a \
            share; when one dies, the others take over its share.

            Publishing is pipelined: up to --max-in-flight rows are with Kafka at once, and each stream stays in \
            order (idempotent producer with the gapless guarantee, no message timeout; any failed delivery or \
            fatal producer error restarts the producer from the rows still waiting). Rows are marked published \
            (or deleted, with --delete-published) only after Kafka acknowledges them. A broker that is down \
            means waiting; nothing is dropped. A row Kafka can never accept goes to the dead-letter table (see \
            `eventoutbox dead-letters`) and holds back its stream.

            With --delivery exactly-once, each batch is one Kafka transaction that also carries a progress record \
            of the relay (a compacted topic, --progress-topic); on start and after any failure the relay reads it \
            back and brings the database in line before publishing, so read_committed consumers see every event \
            exactly once, whatever crashes (Java consumers: isolation.level=read_committed). A relay that lost its \
            lock or slot is fenced by the new owner's transactional.id and commits nothing more. Slower than \
            at-least-once today (the Measurements article, EventStore.docc).

            With --source wal, the relay reads the outbox's inserts from the write-ahead log through a logical \
            replication slot instead: no UPDATE per row, no NOTIFY needed by appends, transactions in commit \
            order. The slot is confirmed only past transactions Kafka fully acknowledged. Set it up once with \
            `eventoutbox migrate --wal` (wal_level = logical, a role with REPLICATION); watch it with \
            `eventoutbox wal status`.

            SIGTERM/SIGINT: stop taking rows, wait up to --shutdown-timeout for in-flight deliveries, mark them, \
            exit 0. Rows still unacknowledged stay in the outbox for the next run.

            Example:
              outbox-relay --database-url postgresql:///app --brokers 127.0.0.1:9092 --metrics-port 9464
            """ + "\n\n" + TraceExport.help + "\n\n" + EnvironmentOptions.help("outbox-relay", example: "batch-size", "500"),
        version: EventOutboxVersion.current
    )

    @OptionGroup var database: DatabaseOption

    @OptionGroup var kafka: KafkaBrokersOption

    @Option(help: ArgumentHelp(
        "Where new rows are found: 'table' (poll the outbox, woken by NOTIFY; rows marked when published) or 'wal' (read the outbox's inserts from a logical replication slot; see `eventoutbox migrate --wal`).",
        valueName: "table|wal"))
    var source: String = "table"

    @Option(help: ArgumentHelp(
        "What consumers see after a crash or a Kafka failure. 'exactly-once': rows go out in Kafka transactions that also carry the relay's progress; read_committed consumers see every event once (Java consumers: set isolation.level=read_committed). 'at-least-once': an idempotent producer, pipelined; after a crash a few events go out again (consumers dedupe by event id).",
        valueName: "exactly-once|at-least-once"))
    var delivery: String = DeliveryGuarantee.atLeastOnce.rawValue

    @Option(help: ArgumentHelp(
        "With --delivery exactly-once: the prefix of the relay's transactional.id (one per outbox and Kafka cluster; replicas of one relay share it). Default: eventoutbox-relay.DATABASE.SCHEMA.",
        valueName: "id"))
    var transactionalId: String?

    @Option(help: ArgumentHelp(
        "With --delivery exactly-once: the compacted topic of the relay's progress records, created if missing. Default: TRANSACTIONAL_ID.progress.",
        valueName: "topic"))
    var progressTopic: String?

    @Option(help: "With --delivery exactly-once: seconds a Kafka transaction may stay open (transaction.timeout.ms).")
    var transactionTimeout: Double = 60

    @Option(help: ArgumentHelp(
        "How each event is written: 'envelope' (the value is EventOutbox's JSON envelope) or 'cloudevents' (a CloudEvent in the Kafka binding's binary mode: the value is the payload, the attributes are ce_ headers). This toolkit's consumers read both.",
        valueName: "envelope|cloudevents"))
    var format: String = "envelope"

    @Option(help: ArgumentHelp(
        "With --format cloudevents: the events' ce_source (a URI reference naming the producing context). Default: /eventoutbox/TOPIC.",
        valueName: "uri"))
    var cloudeventsSource: String?

    @Option(help: "With --source wal: the publication of the outbox's inserts.")
    var publication: String = OutboxWAL.defaultName

    @Option(help: "With --source wal: the logical replication slot (one relay streams it at a time; others stand by).")
    var slot: String = OutboxWAL.defaultName

    @Option(help: "Rows fetched per statement.")
    var batchSize: Int = 1000

    @Option(help: "Most rows with Kafka and not yet acknowledged (bounds memory while brokers are slow or down).")
    var maxInFlight: Int = 10_000

    @Option(help: "Seconds to wait for in-flight deliveries on SIGTERM/SIGINT before leaving them for the next run.")
    var shutdownTimeout: Double = 10

    @Option(help: "Seconds between refreshes of the outbox gauges and retention runs.")
    var housekeepingInterval: Double = 5

    @Flag(help: "Delete rows as soon as Kafka has them, instead of marking them and deleting them after --retention.")
    var deletePublished = false

    @Option(help: "Seconds between looks at the outbox when no NOTIFY arrives.")
    var pollInterval: Double = 1

    @Option(help: "Seconds between a standby's attempts to become active.")
    var standbyInterval: Double = 1

    @Option(help: ArgumentHelp(
        "Split the streams into N partitions so that every running relay publishes a share (1: one active relay, the others stand by). Use the same N for all relays of a database.",
        valueName: "N"))
    var partitions: Int = 1

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

    @OptionGroup var operations: OperationsOptions

    func validate() throws {
        try OptionCheck.integer(batchSize, "--batch-size", in: 1...100_000)
        try OptionCheck.integer(maxInFlight, "--max-in-flight", in: 1...1_000_000)
        try OptionCheck.integer(partitions, "--partitions", in: 1...4096)
        try OptionCheck.seconds(pollInterval, "--poll-interval", in: 0.001...3600)
        try OptionCheck.seconds(standbyInterval, "--standby-interval", in: 0.001...3600)
        try OptionCheck.seconds(housekeepingInterval, "--housekeeping-interval", in: 0.001...86_400)
        try OptionCheck.seconds(shutdownTimeout, "--shutdown-timeout", in: 0...3600)
        try OptionCheck.seconds(retention, "--retention", in: 0...315_360_000)
        // The relays' keys run from K-1 to K+N-1 (see AdvisoryLockClass).
        try OptionCheck.integer(lockKey, "--lock-key", in: (Int64.min + 1)...(Int64.max - Int64(partitions)))
        guard let guarantee = DeliveryGuarantee(rawValue: delivery) else {
            throw ValidationError("--delivery is 'exactly-once' or 'at-least-once', not '\(delivery)'")
        }
        if guarantee == .exactlyOnce {
            // The broker's transaction.max.timeout.ms is 900 s by default.
            try OptionCheck.seconds(transactionTimeout, "--transaction-timeout", in: 1...900)
            if let transactionalId, transactionalId.isEmpty || transactionalId.count > 200 {
                throw ValidationError("--transactional-id must be 1 to 200 characters")
            }
            if let progressTopic, progressTopic.isEmpty || progressTopic.count > 249
                || !progressTopic.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }) {
                throw ValidationError("--progress-topic must be 1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-'")
            }
        } else if transactionalId != nil || progressTopic != nil {
            throw ValidationError("--transactional-id and --progress-topic apply to --delivery exactly-once")
        }
        guard format == "envelope" || format == "cloudevents" else {
            throw ValidationError("--format is 'envelope' or 'cloudevents', not '\(format)'")
        }
        if let cloudeventsSource {
            guard format == "cloudevents" else { throw ValidationError("--cloudevents-source applies to --format cloudevents") }
            guard !cloudeventsSource.isEmpty, cloudeventsSource.unicodeScalars.allSatisfy({ $0.value > 0x20 && $0.value < 0x7F }) else {
                throw ValidationError("--cloudevents-source must be a non-empty URI reference (printable ASCII, no spaces)")
            }
        }
        guard source == "table" || source == "wal" else { throw ValidationError("--source is 'table' or 'wal', not '\(source)'") }
        if source == "wal" {
            guard partitions == 1 else {
                throw ValidationError("--partitions applies to --source table; a replication slot streams to one relay at a time")
            }
            guard !deletePublished else {
                throw ValidationError("--delete-published applies to --source table; with --source wal, rows are never marked and --retention deletes them")
            }
            do { _ = try OutboxWAL(publication: publication, slot: slot) } catch { throw ValidationError("\(error)") }
        }
    }

    func run() async throws {
        let url = try database.url()
        let brokers = try kafka.bootstrapServers()
        var processOperations = try operations.bootstrap(serviceName: "outbox-relay", databaseURL: url)
        let logger = Logger(label: "outbox-relay")

        var configuration = OutboxRelayConfiguration(
            databaseURL: url,
            kafka: KafkaConfiguration(bootstrapServers: brokers, properties: try kafka.fileProperties().merging(KafkaConfiguration.parseProperties(kafkaProperties)) { $1 }))
        if source == "wal" { configuration.source = .wal(try OutboxWAL(publication: publication, slot: slot)) }
        configuration.delivery = DeliveryGuarantee(rawValue: delivery) ?? .atLeastOnce
        if format == "cloudevents" { configuration.format = .cloudEvents(source: cloudeventsSource) }
        configuration.transactionalID = transactionalId
        configuration.progressTopic = progressTopic
        configuration.transactionTimeout = OptionCheck.duration(transactionTimeout)
        configuration.batchSize = batchSize
        configuration.maxInFlight = maxInFlight
        configuration.partitions = partitions
        configuration.shutdownTimeout = OptionCheck.duration(shutdownTimeout)
        configuration.housekeepingInterval = OptionCheck.duration(housekeepingInterval)
        configuration.publishedRows = deletePublished ? .delete : .mark
        configuration.pollInterval = OptionCheck.duration(pollInterval)
        configuration.standbyRetryInterval = OptionCheck.duration(standbyInterval)
        configuration.leaderLockKey = lockKey
        configuration.retention = OptionCheck.duration(retention)

        let relay = OutboxRelay(configuration: configuration, logger: logger)
        processOperations.endpoint?.readinessProblem = { relay.readinessProblem }
        let group = processOperations.serviceGroup([relay], logger: logger)
        try await group.run()
    }
}
