import EventSourcing
import Tracing

/// Runs an append in an `eventoutbox.append` producer span and hands `body` the events stamped with that
/// span's trace, so that the relay and the consumers continue it (every driver's append goes through here).
///
/// Without a tracer that records the span, the events are passed on as they are: a `traceparent` the caller
/// put in their metadata stays.
public func withAppendSpan<Result: Sendable>(
    _ events: [NewEvent], streamID: String, _ body: ([NewEvent]) async throws -> Result
) async throws -> Result {
    try await withSpan("eventoutbox.append", ofKind: .producer) { span in
        span.attributes["eventoutbox.stream_id"] = streamID
        span.attributes["eventoutbox.events"] = events.count
        let traceparent = span.isRecording ? TraceContext.traceparent(of: span.context) : nil
        let traced = traceparent == nil ? events : events.map { event in
            var event = event
            event.metadata.traceparent = traceparent
            return event
        }
        return try await body(traced)
    }
}
