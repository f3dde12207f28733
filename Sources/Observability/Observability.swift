import Logging
import Metrics
import Prometheus

/// Process-wide logging and metrics set-up shared by the long-running executables.
public enum Observability {
    /// Logs to standard error at `level`; serves Prometheus metrics at `host:port` when `port` is given.
    /// Call once, at start. Returns the metrics server (stop it on exit), if any.
    public static func bootstrap(logLevel: Logger.Level, metricsHost: String, metricsPort: Int?) throws -> MetricsServer? {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = logLevel
            return handler
        }
        guard let metricsPort else { return nil }
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return try MetricsServer(host: metricsHost, port: metricsPort, registry: registry)
    }
}
