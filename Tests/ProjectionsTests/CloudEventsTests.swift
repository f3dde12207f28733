import BankAccount
import BankProjections
import EventSourcing
import EventStore
import Foundation
import KafkaClient
import OutboxRelay
import LibPQ
@_spi(Testing) import Projections
import TestSupport
import Testing

@Suite("--format cloudevents: the CloudEvents Python SDK reads the records; the projector reads both formats on one topic")
struct CloudEventsTests {
    @Test("envelopes, then CloudEvents on the same topic: the SDK parses every CloudEvent with the mapped attributes; the projector applies all")
    func bothFormats() async throws {
        let pipeline = try await Pipeline.make()
        let account = try await pipeline.bank.open(owner: "Ce", initialDeposit: 100)
        _ = try await pipeline.bank.deposit(account, amount: 5, description: "as an envelope")
        let waiting = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        try await pipeline.relaying { try await waitUntil("the envelopes are published") { try await pipeline.test.count(waiting) == 0 } }
        let correlated = EventMetadata(correlationID: "corr-7", actor: "kim", traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        _ = try await pipeline.bank.deposit(account, amount: 7, description: "as a \"CloudEvent\"", metadata: correlated)
        _ = try await pipeline.bank.withdraw(account, amount: 2)
        try await pipeline.relaying(format: .cloudEvents(source: nil)) {
            try await waitUntil("the CloudEvents are published") { try await pipeline.test.count(waiting) == 0 }
        }

        // A reader no one here wrote: kcat dumps the topic, the CloudEvents SDK parses each record.
        let dump = try await Tools.command(["kcat", "-C", "-J", "-e", "-q", "-b", pipeline.brokers, "-t", pipeline.topic], in: URL(fileURLWithPath: "/tmp"))
        #expect(dump.status == 0, "\(dump.output.prefix(500))")
        let input = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("records") + ".jsonl")
        try Data(dump.output.utf8).write(to: input)
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/lib/read-cloudevents.py").path
        let parsed = try await Tools.command(["sh", "-c", "python3 '\(script)' < '\(input.path)'"], in: URL(fileURLWithPath: "/tmp"))
        try? FileManager.default.removeItem(at: input)
        #expect(parsed.status == 0, "\(parsed.output.prefix(1000))")
        let lines = parsed.output.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        let events = lines.filter { $0["attributes"] != nil }
        #expect(lines.count == 4 && events.count == 2, "2 envelopes (not CloudEvents: the SDK refuses them), 2 CloudEvents: \(parsed.output.prefix(1000))")
        let stored = try await pipeline.test.store.readStream(account)
        for (event, record) in zip(events, stored.suffix(2)) {
            let attributes = try #require(event["attributes"] as? [String: String])
            #expect(attributes["specversion"] == "1.0")
            #expect(attributes["id"] == record.eventID.uuidString.lowercased())
            #expect(attributes["type"] == record.eventType)
            #expect(attributes["subject"] == account && event["key"] as? String == account)
            #expect(attributes["source"] == "/eventoutbox/\(pipeline.topic)")
            #expect(attributes["streamversion"] == String(record.streamVersion))
            #expect(attributes["time"].flatMap(ISOTimestamp.parse) == record.occurredAt, "\(attributes["time"] ?? "")")
            let data = try #require(event["data"] as? [String: Any])
            let payload = try #require(try JSONSerialization.jsonObject(with: Data(record.payload.utf8)) as? [String: Any])
            #expect(NSDictionary(dictionary: data).isEqual(to: payload), "data \(data) vs payload \(payload)")
        }
        let first = try #require(events.first?["attributes"] as? [String: String])
        #expect(first["correlationid"] == "corr-7" && first["actor"] == "kim")
        #expect(first["traceparent"] == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")

        // The projector reads both formats from the one topic (empty tables: no back-fill from the store).
        try await pipeline.test.pool.withConnection { connection in
            for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
        }
        let consumer = ProjectionConsumer(
            configuration: pipeline.consumerConfiguration(),
            applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry))
        try await consumer.prepare()
        let task = Task { try await consumer.run() }
        try await waitUntil("every event applied") { try await pipeline.test.projected("account_balances") == 4 }
        consumer.stop()
        try await task.value
        #expect(try await pipeline.balances() == [account: 110])
        #expect(consumer.deadLetterCount == 0)
        #expect(consumer.appliedCount == 8, "4 events from Kafka, 2 projections")
        try await pipeline.test.drop()
    }
}
