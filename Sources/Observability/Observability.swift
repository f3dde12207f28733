import Foundation
#if canImport(Glibc)
import Glibc
#endif
import EventSourcing
import Hummingbird
import Logging
import Metrics
import LibPQ
import Prometheus
import ServiceLifecycle

/// Process-wide logging and metrics set-up shared by the long-running executables.
public enum Observability {
    /// Logs to standard error at `level`, as text or one JSON object a line (``LogFormat``). With a `metricsPort`, also sends metrics to Prometheus and returns the
    /// ``OperationsEndpoint`` that serves them (run it beside the process's own services). Call once, at start.
    /// - Throws: ``ListenError`` when the metrics port cannot be bound (checked before anything starts).
    public static func bootstrap(
        logLevel: Logger.Level, logFormat: LogFormat = .text, metricsHost: String, metricsPort: Int?, databaseURL: String?
    ) throws -> OperationsEndpoint? {
        LoggingSystem.bootstrap { label in
            switch logFormat {
            case .text:
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = logLevel
                return handler
            case .json:
                var handler = JSONLogHandler(label: label)
                handler.logLevel = logLevel
                return handler
            }
        }
        guard let metricsPort else { return nil }
        try ListenCheck.free(host: metricsHost, port: metricsPort, option: "--metrics-port")
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        // Commit → Kafka is milliseconds when all is well; the default buckets start at 5 ms.
        factory.durationHistogramBuckets["eventoutbox_relay_commit_to_kafka_seconds"] = [
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
            .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10),
            .seconds(30), .seconds(60),
        ]
        MetricsSystem.bootstrap(factory)
        // Which release runs, for dashboards and alerts (`eventoutbox_build_info{version="…"} 1`).
        Gauge(label: "eventoutbox_build_info", dimensions: [("version", EventOutboxVersion.current)]).record(1)
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
            body = MetricHelp.adding(to: body)
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
            onServerRunning: { [host] channel in
                logger.info(
                    "metrics at http://\(host):\(channel.localAddress?.port ?? port)/metrics; probes at /health/live and /health/ready")
            },
            logger: logger)
        try await app.run()
    }

    /// `true` if a new connection to `url` answers `SELECT 1` (and when there is no database to ask).
    private static func databaseAnswers(_ url: String?) async -> Bool {
        guard let url else { return true }
        guard let connection = try? await PQConnection.connect(to: url) else { return false }
        let answered = (try? await connection.query("SELECT 1", statement: "readiness")) != nil
        await connection.close()
        return answered
    }
}

/// Checks, before a process starts serving, that the ports it is about to listen on are free, so that a port in
/// use ends it at once with the option and port named (SwiftNIO's own error names neither).
public enum ListenCheck {
    /// - Throws: ``ListenError`` naming `option`, `host` and `port` when binding fails (in use, not permitted,
    ///   an address this machine does not have).
    public static func free(host: String, port: Int, option: String) throws {
        guard port != 0 else { return }
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE
        var found: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &found) == 0, let info = found else {
            throw ListenError(option: option, host: host, port: port, reason: "the address cannot be resolved")
        }
        defer { freeaddrinfo(found) }
        let fd = socket(info.pointee.ai_family, info.pointee.ai_socktype, info.pointee.ai_protocol)
        guard fd >= 0 else { throw ListenError(option: option, host: host, port: port, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        // As SwiftNIO binds: with SO_REUSEADDR, so that a port in TIME_WAIT is not taken for one in use.
        var yes: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 else {
            let reason = errno == EADDRINUSE ? "the port is in use (another process listens on it)" : String(cString: strerror(errno))
            throw ListenError(option: option, host: host, port: port, reason: reason)
        }
    }
}

/// A port a process was asked to listen on cannot be bound.
public struct ListenError: Error, CustomStringConvertible, Sendable {
    public var option: String
    public var host: String
    public var port: Int
    public var reason: String
    public var description: String { "cannot listen on \(host):\(port) (\(option)): \(reason); pick another \(option)" }
}
