import EventSourcing
import EventStore
import Foundation
import KafkaClient
import Metrics
import OutboxRelayStore
import Tracing

/// What the relay observes of each row in flight: a span per row that carries a trace (its `traceparent`
/// header), continuing it from the enqueue to Kafka's report, and the time from the row's transaction start to
/// that report (`eventoutbox_relay_commit_to_kafka_seconds`). Rows without a trace cost a timestamp each.
struct PublishSpans {
    private var open: [UInt64: any Span] = [:]
    private var createdAt: [UInt64: Date] = [:]
    private static let commitToKafka = Metrics.Timer(label: "eventoutbox_relay_commit_to_kafka_seconds")

    mutating func started(_ row: OutboxRow, messageID: UInt64) {
        createdAt[messageID] = row.createdAt
        guard let traceparent = row.headers["traceparent"] else { return }
        let span = InstrumentationSystem.tracer.startSpan(
            "eventoutbox.publish", context: TraceContext.context(continuing: traceparent), ofKind: .producer)
        span.attributes["eventoutbox.event_id"] = row.eventID.uuidString.lowercased()
        span.attributes["messaging.destination.name"] = row.topic
        open[messageID] = span
    }

    mutating func finished(messageID: UInt64, error: KafkaError?) {
        if let created = createdAt.removeValue(forKey: messageID), error == nil {
            Self.commitToKafka.recordNanoseconds(Int64(max(0, Date().timeIntervalSince(created)) * 1e9))
        }
        guard let span = open.removeValue(forKey: messageID) else { return }
        if let error { span.recordError(error) }
        span.end()
    }
}
