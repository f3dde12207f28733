import Foundation
import InMemoryTracing
import Synchronization
import Tracing

/// An in-memory tracer that speaks W3C `traceparent`, and keeps only the spans of the traces a test watches
/// (other tests share the process and its one tracer; their appends get no `traceparent`).
public final class WatchingTracer: Tracer, Sendable {
    public typealias Span = InMemorySpan
    private let watched = Mutex<Set<String>>([])
    private let finished = Mutex<[FinishedInMemorySpan]>([])

    /// The process's tracer (installed once: InstrumentationSystem takes one per process).
    public static let shared: WatchingTracer = {
        let tracer = WatchingTracer()
        InstrumentationSystem.bootstrap(tracer)
        return tracer
    }()

    public func watch(_ traceID: String) { watched.withLock { _ = $0.insert(traceID) } }
    public func spans(of traceID: String) -> [FinishedInMemorySpan] { finished.withLock { $0.filter { $0.traceID == traceID } } }

    public static func hex(_ bytes: Int) -> String { (0..<bytes).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined() }

    public func startSpan<Instant: TracerInstant>(
        _ operationName: String, context: @autoclosure () -> ServiceContext, ofKind kind: SpanKind, at instant: @autoclosure () -> Instant,
        function: String, file fileID: String, line: UInt
    ) -> InMemorySpan {
        let parent = context()
        let spanContext = parent.inMemorySpanContext.map {
            InMemorySpanContext(traceID: $0.traceID, spanID: Self.hex(8), parentSpanID: $0.spanID)
        } ?? InMemorySpanContext(traceID: Self.hex(16), spanID: Self.hex(8), parentSpanID: nil)
        return InMemorySpan(
            operationName: operationName, context: parent, spanContext: spanContext, kind: kind, startInstant: instant()
        ) { span in self.record(span) }
    }

    private func record(_ span: FinishedInMemorySpan) {
        guard watched.withLock({ $0.contains(span.traceID) }) else { return }
        finished.withLock { $0.append(span) }
    }

    public func forceFlush() {}

    public func inject<Carrier, Inject: Injector>(_ context: ServiceContext, into carrier: inout Carrier, using injector: Inject)
    where Inject.Carrier == Carrier {
        guard let span = context.inMemorySpanContext, watched.withLock({ $0.contains(span.traceID) }) else { return }
        injector.inject("00-\(span.traceID)-\(span.spanID)-01", forKey: "traceparent", into: &carrier)
    }

    public func extract<Carrier, Extract: Extractor>(_ carrier: Carrier, into context: inout ServiceContext, using extractor: Extract)
    where Extract.Carrier == Carrier {
        guard let value = extractor.extract(key: "traceparent", from: carrier) else { return }
        let parts = value.split(separator: "-")
        guard parts.count == 4 else { return }
        context.inMemorySpanContext = InMemorySpanContext(traceID: String(parts[1]), spanID: String(parts[2]), parentSpanID: nil)
    }
}

