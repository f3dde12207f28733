import AccountsService
import BankAccount
import BankProjections
import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Hummingbird
import InMemoryTracing
import KafkaClient
import OutboxRelay
import LibPQ
import Projections
import Synchronization
import TestSupport
import Testing
import Tracing

@Suite("one deposit traced end to end: HTTP request → append → relay publish → projector apply")
struct TracingTests {
    @Test("every hop continues the caller's trace, each span the child of the one before")
    func depositTraced() async throws {
        let tracer = WatchingTracer.shared
        let traceID = WatchingTracer.hex(16)
        let callerSpan = WatchingTracer.hex(8)
        tracer.watch(traceID)

        let topic = uniqueName("traced")
        let test = try await TestEventStore.create(maxConnections: 8, routing: OutboxRouting(defaultTopic: topic), modules: [AccountsServiceSchema.module])
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
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
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
