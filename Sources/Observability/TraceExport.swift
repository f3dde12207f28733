import Foundation
import Logging
import OTel
import ServiceLifecycle
import Tracing

/// Traces that leave the process: swift-otel's tracer with its OTLP/HTTP exporter, configured the way every
/// OpenTelemetry SDK is, by the standard environment variables.
///
/// Export is on when the environment names an exporter or an endpoint (`OTEL_TRACES_EXPORTER=otlp`,
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and off otherwise, or with
/// `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true`: a process nobody asked to export never tries to reach
/// a collector. swift-otel reads the rest itself: `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default,
/// or `http/json`), `OTEL_SERVICE_NAME` (default: the executable's name), `OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_TRACES_SAMPLER`, `OTEL_BSP_SCHEDULE_DELAY`, headers, timeouts and compression. OTLP over gRPC is not
/// built in (it would add gRPC to every build): point the exporter at a collector's HTTP port (4318).
/// Only traces go out this way: metrics stay on the Prometheus endpoint, logs on standard error.
public enum TraceExport {
    /// The paragraph of `--help` that says how to export traces.
    public static let help = """
        Traces go out over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_TRACES_EXPORTER=otlp) is set, \
        with the other standard OTEL_* variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, \
        OTEL_TRACES_SAMPLER, ...); never otherwise.
        """

    /// Whether `environment` asks for trace export.
    public static func isRequested(by environment: [String: String]) -> Bool {
        if environment["OTEL_SDK_DISABLED"]?.lowercased() == "true" { return false }
        if let exporter = environment["OTEL_TRACES_EXPORTER"], !exporter.isEmpty {
            return exporter.lowercased() != "none"
        }
        return ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].contains { !(environment[$0] ?? "").isEmpty }
    }

    /// Installs the exporting tracer when the environment asks for it (see ``TraceExport``) and returns the
    /// service that exports, to run first in the process's `ServiceGroup` (so that it stops last and flushes
    /// the spans of the others' shutdown); `nil` when export is off. Call once, after logging is set up.
    /// - Throws: ``TraceExportError`` naming the variable at fault (an unsupported protocol or exporter).
    public static func bootstrap(
        serviceName: String, environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> (any Service)? {
        guard isRequested(by: environment) else { return nil }
        let tracesProtocol = environment["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] ?? environment["OTEL_EXPORTER_OTLP_PROTOCOL"]
        if let tracesProtocol, !["http/protobuf", "http/json"].contains(tracesProtocol.lowercased()) {
            throw TraceExportError(
                "OTLP protocol '\(tracesProtocol)' is not built in: set OTEL_EXPORTER_OTLP_PROTOCOL to http/protobuf (or http/json) and the endpoint to the collector's HTTP port, usually 4318")
        }
        if let exporter = environment["OTEL_TRACES_EXPORTER"], !["otlp", "console", ""].contains(exporter.lowercased()) {
            throw TraceExportError("OTEL_TRACES_EXPORTER '\(exporter)' is not supported: use otlp, console or none")
        }
        var configuration = OTel.Configuration.default
        configuration.serviceName = serviceName
        configuration.diagnosticLogger = .custom(Logger(label: "eventoutbox.otel"))
        configuration.traces.exporter = .otlp
        configuration.metrics.enabled = false
        configuration.logs.enabled = false
        let backend: (factory: any Tracer, service: any Service)
        do {
            let made = try OTel.makeTracingBackend(configuration: configuration)
            backend = (made.factory, made.service)
        } catch {
            throw TraceExportError("cannot set up OTLP trace export from the OTEL_* environment: \(error)")
        }
        InstrumentationSystem.bootstrap(backend.factory)
        return backend.service
    }
}

/// The OTEL_* environment asks for something this build cannot do.
public struct TraceExportError: Error, CustomStringConvertible, Sendable {
    public var description: String
    init(_ description: String) { self.description = description }
}
