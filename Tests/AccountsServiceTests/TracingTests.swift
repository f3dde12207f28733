import AccountsService
import BankAccount
import EventSourcing
import EventStore
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Hummingbird
import InMemoryTracing
import KafkaClient
import OutboxRelay
import PostgresClient
import Projections
import Synchronization
import TestSupport
import Testing
import Tracing

/// An in-memory tracer that speaks W3C `traceparent`, and keeps only the spans of the traces a test watches
/// (other tests share the process and its one tracer; their appends get no `traceparent`).
final class WatchingTracer: Tracer, Sendable {
    typealias Span = InMemorySpan
    private let watched = Mutex<Set<String>>([])
    private let finished = Mutex<[FinishedInMemorySpan]>([])

    static let shared: WatchingTracer = {
        let tracer = WatchingTracer()
        InstrumentationSystem.bootstrap(tracer)
        return tracer
    }()

    func watch(_ traceID: String) { watched.withLock { _ = $0.insert(traceID) } }
    func spans(of traceID: String) -> [FinishedInMemorySpan] { finished.withLock { $0.filter { $0.traceID == traceID } } }

    static func hex(_ bytes: Int) -> String { (0..<bytes).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined() }

    func startSpan<Instant: TracerInstant>(
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

    func forceFlush() {}

    func inject<Carrier, Inject: Injector>(_ context: ServiceContext, into carrier: inout Carrier, using injector: Inject)
    where Inject.Carrier == Carrier {
        guard let span = context.inMemorySpanContext, watched.withLock({ $0.contains(span.traceID) }) else { return }
        injector.inject("00-\(span.traceID)-\(span.spanID)-01", forKey: "traceparent", into: &carrier)
    }

    func extract<Carrier, Extract: Extractor>(_ carrier: Carrier, into context: inout ServiceContext, using extractor: Extract)
    where Extract.Carrier == Carrier {
        guard let value = extractor.extract(key: "traceparent", from: carrier) else { return }
        let parts = value.split(separator: "-")
        guard parts.count == 4 else { return }
        context.inMemorySpanContext = InMemorySpanContext(traceID: String(parts[1]), spanID: String(parts[2]), parentSpanID: nil)
    }
}

@Suite("one deposit traced end to end: HTTP request → append → relay publish → projector apply")
struct TracingTests {
    @Test("every hop continues the caller's trace, each span the child of the one before")
    func depositTraced() async throws {
        let tracer = WatchingTracer.shared
        let traceID = WatchingTracer.hex(16)
        let callerSpan = WatchingTracer.hex(8)
        tracer.watch(traceID)

        let topic = uniqueName("traced")
        let test = try await TestEventStore.create(maxConnections: 8, routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        let bank = Bank(store: test.store, topic: topic)
        let account = try await bank.open(owner: "Traced", initialDeposit: 1)
        try await test.pool.withConnection { connection in
            for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
        }
        let port = testPort()
        let app = Application(router: AccountsAPI(bank: bank).makeRouter(), configuration: .init(address: .hostname("127.0.0.1", port: port)))
        let server = Task { try await app.run() }
        var relayConfiguration = OutboxRelayConfiguration(databaseURL: test.schema.url, kafka: KafkaConfiguration(bootstrapServers: brokers))
        relayConfiguration.leaderLockKey = Int64.random(in: 1...Int64.max)
        relayConfiguration.pollInterval = .milliseconds(200)
        let relay = OutboxRelay(configuration: relayConfiguration)
        let relayTask = Task { try await relay.run() }
        let consumer = ProjectionConsumer(
            configuration: ProjectionConsumerConfiguration(
                pool: test.pool,
                kafka: KafkaConfiguration(bootstrapServers: brokers, properties: ["allow.auto.create.topics": "true", "log_level": "3"]),
                groupID: uniqueName("traced"), topics: [topic]),
            applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry))
        let consumerTask = Task { try await consumer.run() }

        var request = URLRequest(url: URL(string: "http://127.0.0.1:\(port)/accounts/\(account)/deposits")!)
        try await waitUntil("the service answers") {
            (try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/health/live")!)) != nil
        }
        request.httpMethod = "POST"
        request.httpBody = Data(#"{"amount": 5}"#.utf8)
        request.setValue("00-\(traceID)-\(callerSpan)-01", forHTTPHeaderField: "traceparent")
        let (_, response) = try await URLSession.shared.data(for: request)
        #expect((response as? HTTPURLResponse)?.statusCode == 200)
        try await waitUntil("the projector applied the deposit and ended its span", timeout: .seconds(60)) {
            tracer.spans(of: traceID).contains { $0.operationName == "eventoutbox.apply" }
        }
        relay.stop()
        consumer.stop()
        server.cancel()
        try await relayTask.value
        try await consumerTask.value
        _ = await server.result

        let spans = tracer.spans(of: traceID)
        let http = try #require(spans.first { $0.kind == .server }, "\(spans.map(\.operationName))")
        let append = try #require(spans.first { $0.operationName == "eventoutbox.append" })
        let publish = try #require(spans.first { $0.operationName == "eventoutbox.publish" })
        let apply = try #require(spans.first { $0.operationName == "eventoutbox.apply" })
        let tree = spans.map { "\($0.operationName) \($0.spanID) <- \($0.parentSpanID ?? "-")" }
        #expect(http.parentSpanID == callerSpan, "\(tree)")
        #expect(append.parentSpanID == http.spanID)
        #expect(publish.parentSpanID == append.spanID)
        #expect(apply.parentSpanID == append.spanID)
        let stored = try #require(try await test.store.readStream(account).last)
        #expect(stored.metadata.traceparent == "00-\(traceID)-\(append.spanID)-01")
        #expect(try await test.count("SELECT balance FROM account_balances WHERE account_id = $1", [.text(account)]) == 6)
        try await test.drop()
    }
}
