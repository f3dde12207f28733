import Foundation
import Hummingbird
import Metrics

/// Requests by route, method and status, and their durations, under Prometheus's conventions (a `_total`
/// counter, a duration in seconds): `http_server_requests_total{method,route,status}` and
/// `http_server_request_duration_seconds{method,route,status}`. The route is the matched pattern
/// (`/accounts/{id}`), never the raw path, so an account id never becomes a label.
struct RequestMetricsMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let started = ContinuousClock.now
        let status: Int
        let response: Response
        do {
            response = try await next(request, context)
            status = Int(response.status.code)
        } catch {
            Self.record(request, context, status: (error as? any HTTPResponseError)?.status.code ?? 500, since: started)
            throw error
        }
        Self.record(request, context, status: status, since: started)
        return response
    }

    static func record(_ request: Request, _ context: Context, status: Int, since started: ContinuousClock.Instant) {
        let route = (context.endpointPath ?? "unmatched").replacingOccurrences(of: ":id", with: "{id}")
        let dimensions = [("method", request.method.rawValue), ("route", route), ("status", String(status))]
        Counter(label: "http_server_requests_total", dimensions: dimensions).increment()
        let elapsed = (ContinuousClock.now - started).components
        Metrics.Timer(label: "http_server_request_duration_seconds", dimensions: dimensions)
            .recordNanoseconds(elapsed.seconds * 1_000_000_000 + elapsed.attoseconds / 1_000_000_000)
    }
}
