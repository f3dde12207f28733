import AccountsService
import ArgumentParser
import BankAccount
import CommandLineSupport
import EventStore
import EventSourcing
import Foundation
import Hummingbird
import Logging
import Observability
import OutboxRelayStore
import LibPQ
import ServiceLifecycle
import UnixSignals

@main
struct AccountsServiceCommand: AsyncParsableCommand {
    static func main() async { await mainReadingEnvironment() }

    static let configuration = CommandConfiguration(
        commandName: "accounts-service",
        abstract: "Serve the bank over HTTP: accounts, deposits and withdrawals as events with their outbox rows.",
        discussion: """
            Commits every command's events and outbox rows in one PostgreSQL transaction, as the bank CLI does; \
            run outbox-relay beside it to publish them. Errors are application/problem+json (RFC 9457). Every POST \
            honours an Idempotency-Key header: a retry with the same key gets the first answer and writes nothing \
            (keys are the caller's own and live --idempotency-key-lifetime).

            Callers authenticate with a bearer token (Authorization: Bearer <JWT>, HS256, signed with the secret \
            in --jwt-secret-file): its sub owns the accounts it opens and is recorded as the actor of every event \
            it causes; the scope accounts:admin acts on any account. A missing, expired or forged token gets 401; \
            another caller's account is 404. --insecure-no-auth serves without checks (local experiments).

              POST /accounts                     {"owner": "Kim", "initialDeposit": 100}   -> 201, Location
              POST /accounts/{id}/deposits       {"amount": 250, "description": "salary"}  -> 200
              POST /accounts/{id}/withdrawals    {"amount": 99}   -> 200, or 422 when refused (still recorded)
              GET  /accounts/{id}[?version=N | ?at=2026-11-25T12:00:00Z]
              GET  /accounts/{id}/history
              GET  /health/live, /health/ready

            The API is described in openapi.yaml. The event store's tables come from `eventoutbox migrate`; the
            service applies its own (idempotency_keys) when it starts.

            Example:
              head -c 48 /dev/urandom | base64 > jwt.secret
              accounts-service --jwt-secret-file jwt.secret --port 8080 --metrics-port 9466
              TOKEN=$(accounts-service --jwt-secret-file jwt.secret --mint-token kim)
              curl -s -X POST localhost:8080/accounts -H "Authorization: Bearer $TOKEN" \\
                -H 'Content-Type: application/json' -H 'Idempotency-Key: k1' -d '{"owner": "Kim"}'
            """ + "\n\n" + TraceExport.help + "\n\n" + EnvironmentOptions.help("accounts-service", example: "port", "8080"),
        version: EventOutboxVersion.current)

    @OptionGroup var database: DatabaseOption

    @Option(help: "Address to listen on.") var host = "127.0.0.1"
    @Option(help: "Port to listen on.") var port = 8080
    @Option(help: "PostgreSQL connections at most.") var maxConnections = 8
    @Option(help: "Requests that may wait for a free PostgreSQL connection at once; more get 503 with Retry-After at once.")
    var maxWaiting = 64
    @Option(help: "Seconds a request waits for a free PostgreSQL connection before it gets 503 with Retry-After.")
    var poolTimeout: Double = 5
    @Option(help: "Seconds a statement may run (statement_timeout) before it is cancelled and the request gets 503.")
    var statementTimeout: Double = 10
    @Option(help: "Seconds a connection may send nothing before it is closed (slow and idle clients included).")
    var idleTimeout: Double = 30
    @Option(help: "HTTP connections open at once; one more is closed as soon as it is accepted.")
    var maxOpenConnections = 1024
    @OptionGroup var operations: OperationsOptions

    @Option(help: ArgumentHelp(
        "Require bearer tokens (HS256 JWTs) signed with the secret in this file (at least 32 bytes): a caller (the token's sub) acts on the accounts it opened, or on any with the scope accounts:admin, and is the actor of its events.",
        valueName: "path"))
    var jwtSecretFile: String?

    @Flag(help: "Serve without authentication: every caller may act on every account (local experiments only; logged as a warning).")
    var insecureNoAuth = false

    @Option(help: ArgumentHelp(
        "Print a token for this subject, signed with --jwt-secret-file, and exit (for development).", valueName: "sub"))
    var mintToken: String?

    @Option(help: ArgumentHelp("With --mint-token: the token's scope, e.g. accounts:admin.", valueName: "scope"))
    var tokenScope: String?

    @Option(help: "With --mint-token: seconds until the token expires.")
    var tokenLifetime: Double = 3600

    @Option(help: "Seconds an Idempotency-Key's answer is replayed to its caller.")
    var idempotencyKeyLifetime: Double = 86_400

    @Option(help: ArgumentHelp(
        "Accounts whose latest state is kept in memory, so that a command on one is decided without loading it (the append's version check catches a state that another replica changed; the command is then decided again on the stored state). 0: load the account for every command.",
        valueName: "accounts"))
    var aggregateCacheSize = 10_000

    func validate() throws {
        if mintToken != nil, jwtSecretFile == nil { throw ValidationError("--mint-token needs --jwt-secret-file") }
        if let mintToken, mintToken.isEmpty || mintToken.utf8.count > 200 { throw ValidationError("--mint-token takes a subject of 1 to 200 bytes") }
        try OptionCheck.seconds(tokenLifetime, "--token-lifetime", in: 1...31_622_400)
        try OptionCheck.seconds(idempotencyKeyLifetime, "--idempotency-key-lifetime", in: 1...31_622_400)
        try OptionCheck.port(port, "--port")
        try OptionCheck.integer(maxConnections, "--max-connections", in: 1...1000)
        try OptionCheck.integer(maxWaiting, "--max-waiting", in: 0...100_000)
        try OptionCheck.seconds(poolTimeout, "--pool-timeout", in: 0.001...3600)
        try OptionCheck.seconds(statementTimeout, "--statement-timeout", in: 0.001...86_400)
        try OptionCheck.seconds(idleTimeout, "--idle-timeout", in: 0.001...86_400)
        try OptionCheck.integer(maxOpenConnections, "--max-open-connections", in: 1...1_000_000)
        guard aggregateCacheSize == 0 || (2...100_000_000).contains(aggregateCacheSize) else {
            throw ValidationError("--aggregate-cache-size must be 0 (no cache) or from 2 to 100000000, not \(aggregateCacheSize)")
        }
        guard (jwtSecretFile != nil) != insecureNoAuth else {
            throw ValidationError(
                "say how callers authenticate: --jwt-secret-file PATH (bearer tokens) or --insecure-no-auth (no checks), one of them")
        }
    }

    func run() async throws {
        var authentication = CallerAuthentication.disabled
        if let jwtSecretFile {
            do {
                authentication = try await CallerAuthentication.hs256(secretFile: jwtSecretFile)
            } catch {
                throw ValidationError("\(error)")
            }
        }
        if let mintToken {
            print(try await authentication.mint(subject: mintToken, scope: tokenScope, expiresIn: OptionCheck.duration(tokenLifetime)))
            return
        }
        let url = try database.url()
        let processOperations = try operations.bootstrap(serviceName: "accounts-service", databaseURL: url)
        let logger = Logger(label: "accounts-service")
        // A stalled database sheds load (503, Retry-After) instead of queueing requests without bound.
        let pool = PQPool(PQPool.Configuration(
            url: url, maxConnections: maxConnections, acquireTimeout: OptionCheck.duration(poolTimeout), maxWaiters: maxWaiting,
            statementTimeout: OptionCheck.duration(statementTimeout)))
        try await reportingFailures {
            let missing = try await SchemaMigrator(EventOutboxSchema.modules).pending(pool)
            guard missing.isEmpty else {
                throw ValidationError(
                    "the event store tables are missing or out of date (\(missing.map(String.init(describing:)).joined(separator: ", "))): "
                        + "run `eventoutbox migrate` first")
            }
            // The service's own table: its module, applied here (safe with several replicas starting at once).
            for migration in try await SchemaMigrator([AccountsServiceSchema.module]).migrate(pool) {
                logger.info("applied schema migration", metadata: ["migration": "\(migration)"])
            }
        }
        if !authentication.isEnabled {
            logger.warning("serving WITHOUT authentication (--insecure-no-auth): every caller may act on every account")
        }
        let api = AccountsAPI(
            bank: Bank(store: EventStore(pool: pool), cache: aggregateCacheSize == 0 ? nil : AggregateCache(capacity: aggregateCacheSize)),
            authentication: authentication,
            idempotencyKeyLifetime: OptionCheck.duration(idempotencyKeyLifetime), logger: logger)
        try ListenCheck.free(host: host, port: port, option: "--port")
        // Descriptors for the pool, logs, TLS files and the like are kept out of the HTTP connections' share.
        let limits = ConnectionLimits(idleTimeout: OptionCheck.duration(idleTimeout), maxOpenConnections: maxOpenConnections)
            .withinDescriptorLimit(reserve: maxConnections + 64)
        if limits.maxOpenConnections < maxOpenConnections {
            logger.notice(
                "HTTP connections capped below the descriptor limit", metadata: ["http.max_open_connections": "\(limits.maxOpenConnections)"])
        }
        let app = Application(
            router: api.makeRouter(), server: limits.server,
            configuration: .init(address: .hostname(host, port: port), serverName: "accounts-service"),
            onServerRunning: { [host, port] channel in
                logger.info("serving the bank over HTTP", metadata: ["address": "\(host):\(channel.localAddress?.port ?? port)"])
            },
            logger: logger)
        let group = processOperations.serviceGroup([app], logger: logger)
        try await group.run()
        await pool.close()
    }
}
