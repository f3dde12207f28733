import Hummingbird
import Logging
import Metrics
import PostgresClient
import Prometheus
import ServiceLifecycle

/// Process-wide logging and metrics set-up shared by the long-running executables.
public enum Observability {
    /// Logs to standard error at `level`. With a `metricsPort`, also sends metrics to Prometheus and returns the
    /// ``OperationsEndpoint`` that serves them (run it beside the process's own services). Call once, at start.
    public static func bootstrap(
        logLevel: Logger.Level, metricsHost: String, metricsPort: Int?, databaseURL: String?
    ) -> OperationsEndpoint? {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = logLevel
            return handler
        }
        guard let metricsPort else { return nil }
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return OperationsEndpoint(host: metricsHost, port: metricsPort, registry: registry, databaseURL: databaseURL)
    }
}

/// What operators and orchestrators ask a process over HTTP: `/metrics` (Prometheus), `/health/live` (the
/// process answers) and `/health/ready` (its database answers, and the process's own check, if any, finds
/// nothing wrong). A swift-service-lifecycle `Service`: run it in the process's `ServiceGroup`. Readiness opens
/// a connection per probe (probes come every few seconds), bounded by the URL's `connect_timeout` (10 s unless
/// it says otherwise). The probe answers "not ready" and nothing more; the reason goes to the log.
public struct OperationsEndpoint: Service {
    public let host: String
    public let port: Int
    let registry: PrometheusCollectorRegistry
    let databaseURL: String?
    /// The process's own readiness check: why it is not ready, or `nil`.
    public var readinessProblem: (@Sendable () -> String?)?

    public init(
        host: String, port: Int, registry: PrometheusCollectorRegistry, databaseURL: String?,
        readinessProblem: (@Sendable () -> String?)? = nil
    ) {
        self.host = host
        self.port = port
        self.registry = registry
        self.databaseURL = databaseURL
        self.readinessProblem = readinessProblem
    }

    public func run() async throws {
        let router = Router()
        router.get("metrics") { [registry] _, _ -> Response in
            var body: [UInt8] = []
            registry.emit(into: &body)
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: body)))
        }
        router.get("health/live") { _, _ in "live\n" }
        let logger = Logger(label: "eventoutbox.operations")
        router.get("health/ready") { [databaseURL, readinessProblem] _, _ -> Response in
            var problem = await Self.databaseAnswers(databaseURL) ? nil : "the database does not answer"
            problem = problem ?? readinessProblem?()
            if let problem { logger.warning("not ready", metadata: ["reason": "\(problem)"]) }
            return Response(
                status: problem == nil ? .ok : .serviceUnavailable,
                body: ResponseBody(byteBuffer: ByteBuffer(string: problem == nil ? "ready\n" : "not ready\n")))
        }
        let app = Application(
            router: router, configuration: .init(address: .hostname(host, port: port), serverName: "operations"),
            logger: logger)
        try await app.run()
    }

    /// `true` if a new connection to `url` answers `SELECT 1` (and when there is no database to ask).
    private static func databaseAnswers(_ url: String?) async -> Bool {
        guard let url else { return true }
        guard let connection = try? await PostgresConnection.connect(to: url) else { return false }
        let answered = (try? await connection.query("SELECT 1", statement: "readiness")) != nil
        await connection.close()
        return answered
    }
}
