import EventSourcing
import EventStore
import Foundation
import KafkaClient
import Tracing

/// A span per row in flight that carries a trace (its `traceparent` header), continuing it from the enqueue to
/// Kafka's report. Rows without a trace cost nothing.
struct PublishSpans {
    private var open: [UInt64: any Span] = [:]

    mutating func started(_ row: OutboxRow, messageID: UInt64) {
        guard let traceparent = row.headers["traceparent"] else { return }
        let span = InstrumentationSystem.tracer.startSpan(
            "eventoutbox.publish", context: TraceContext.context(continuing: traceparent), ofKind: .producer)
        span.attributes["eventoutbox.event_id"] = row.eventID.uuidString.lowercased()
        span.attributes["messaging.destination.name"] = row.topic
        open[messageID] = span
    }

    mutating func finished(messageID: UInt64, error: KafkaError?) {
        guard let span = open.removeValue(forKey: messageID) else { return }
        if let error { span.recordError(error) }
        span.end()
    }
}
