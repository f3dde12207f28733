import ArgumentParser
import CommandLineSupport
import Logging
import ServiceLifecycle
import UnixSignals

/// The options every long-running executable shares: logs, the metrics and probes endpoint, and (through the
/// standard OTEL_* variables, see ``TraceExport``) trace export. One `@OptionGroup` in each command, so that the
/// three executables spell, check and document them the same way.
public struct OperationsOptions: ParsableArguments {
    @Option(help: "Serve Prometheus metrics at http://HOST:PORT/metrics, with the probes /health/live and /health/ready.")
    public var metricsPort: Int?

    @Option(help: "Address the metrics endpoint binds to.")
    public var metricsHost: String = "127.0.0.1"

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    public var logLevel: String = "info"

    @Option(help: ArgumentHelp("Log as text lines or one JSON object a line (default: $EVENTOUTBOX_LOG_FORMAT, else text).", valueName: "text|json"))
    public var logFormat: String?

    public init() {}

    public func validate() throws {
        try OptionCheck.port(metricsPort, "--metrics-port")
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
        do { _ = try LogFormat.resolve(logFormat) } catch { throw ValidationError("\(error)") }
    }

    /// Sets up logging and metrics and, for a process that runs as a service (`asService`), its endpoint and
    /// trace export. Call once, at start.
    /// - Throws: `ValidationError` for what the environment asks and cannot be done (an OTLP protocol not
    ///   built in); ``ListenError`` when the metrics port cannot be bound.
    public func bootstrap(serviceName: String, databaseURL: String?, asService: Bool = true) throws -> ProcessOperations {
        let endpoint = try Observability.bootstrap(
            logLevel: Logger.Level(rawValue: logLevel) ?? .info, logFormat: try LogFormat.resolve(logFormat),
            metricsHost: metricsHost, metricsPort: asService ? metricsPort : nil, databaseURL: databaseURL)
        guard asService else { return ProcessOperations(endpoint: nil, traceExport: nil) }
        do {
            return ProcessOperations(endpoint: endpoint, traceExport: try TraceExport.bootstrap(serviceName: serviceName))
        } catch {
            throw ValidationError("\(error)")
        }
    }
}

/// What ``OperationsOptions/bootstrap(serviceName:databaseURL:asService:)`` set up beside a process's own
/// services.
public struct ProcessOperations {
    /// The metrics and probes endpoint, when `--metrics-port` asks for one.
    public var endpoint: OperationsEndpoint?
    /// The span exporter, when the environment asks for one.
    public var traceExport: (any Service)?

    /// A group that runs `services` with these around them, stopped by SIGTERM or SIGINT: the exporter
    /// first (so it stops last and exports the others' final spans), the endpoint last.
    public func serviceGroup(_ services: [any Service], logger: Logger) -> ServiceGroup {
        let all = (traceExport.map { [$0] } ?? []) + services + (endpoint.map { [$0 as any Service] } ?? [])
        return ServiceGroup(
            configuration: .init(services: all.map { .init(service: $0) }, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
    }
}
