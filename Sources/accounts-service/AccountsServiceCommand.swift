import AccountsService
import ArgumentParser
import BankAccount
import CommandLineSupport
import EventStore
import Foundation
import Hummingbird
import Logging
import Observability
import PostgresClient
import ServiceLifecycle
import UnixSignals

@main
struct AccountsServiceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "accounts-service",
        abstract: "Serve the bank over HTTP: accounts, deposits and withdrawals as events with their outbox rows.",
        discussion: """
            Commits every command's events and outbox rows in one PostgreSQL transaction, as the bank CLI does; \
            run outbox-relay beside it to publish them. Errors are application/problem+json (RFC 9457). Every POST \
            honours an Idempotency-Key header: a retry with the same key gets the first answer and writes nothing.

              POST /accounts                     {"owner": "Kim", "initialDeposit": 100}   -> 201, Location
              POST /accounts/{id}/deposits       {"amount": 250, "description": "salary"}  -> 200
              POST /accounts/{id}/withdrawals    {"amount": 99}   -> 200, or 422 when refused (still recorded)
              GET  /accounts/{id}[?version=N | ?at=2026-11-25T12:00:00Z]
              GET  /accounts/{id}/history
              GET  /health/live, /health/ready

            The API is described in openapi.yaml. The tables come from `eventoutbox migrate`.

            Example:
              accounts-service --port 8080 --metrics-port 9466
              curl -s -X POST localhost:8080/accounts -H 'Idempotency-Key: k1' -d '{"owner": "Kim"}'
            """)

    @OptionGroup var database: DatabaseOption

    @Option(help: "Address to listen on.") var host = "127.0.0.1"
    @Option(help: "Port to listen on.") var port = 8080
    @Option(help: "PostgreSQL connections at most.") var maxConnections = 8
    @Option(help: "Serve Prometheus metrics at http://HOST:PORT/metrics.") var metricsPort: Int?
    @Option(help: "Address the metrics endpoint binds to.") var metricsHost = "127.0.0.1"
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
        try OptionCheck.port(port, "--port")
        try OptionCheck.port(metricsPort, "--metrics-port")
        try OptionCheck.integer(maxConnections, "--max-connections", in: 1...1000)
    }

    func run() async throws {
        let url = try database.url()
        let endpoint = Observability.bootstrap(
            logLevel: Logger.Level(rawValue: logLevel) ?? .info, metricsHost: metricsHost, metricsPort: metricsPort, databaseURL: url)
        let logger = Logger(label: "accounts-service")
        let pool = PostgresPool(url: url, maxConnections: maxConnections)
        try await reportingFailures {
            let migrated = try await pool.withConnection {
                try await $0.query("SELECT to_regclass('idempotency_keys') IS NOT NULL AS present").first!.decode(Bool.self, "present")
            }
            guard migrated else {
                throw ValidationError("the event store tables are missing or out of date: run `eventoutbox migrate` first")
            }
        }
        let api = AccountsAPI(bank: Bank(store: EventStore(pool: pool)), logger: logger)
        let app = Application(
            router: api.makeRouter(),
            configuration: .init(address: .hostname(host, port: port), serverName: "accounts-service"),
            logger: logger)
        logger.info("serving the bank over HTTP", metadata: ["address": "\(host):\(port)"])
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: app)] + (endpoint.map { [.init(service: $0)] } ?? []),
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
        await pool.close()
    }
}
