import BankAccount
import BankProjections
import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import LibPQ
@testable import Projections
import TestSupport
import Testing

/// A bank event as a projection receives it.
private func event(_ stream: String, _ version: Int64, _ domainEvent: any DomainEvent, topic: String?) -> ProjectedEvent {
    ProjectedEvent(
        event: domainEvent,
        recorded: RecordedEvent(
            position: version, eventID: UUID(), streamID: stream, streamVersion: version, eventType: type(of: domainEvent).eventType,
            schemaVersion: type(of: domainEvent).schemaVersion, payload: "{}", metadata: .init(),
            occurredAt: Date(timeIntervalSince1970: 1_790_000_000)),
        topic: topic)
}

private func deposit(_ stream: String, _ version: Int64, _ amount: Int64, topic: String? = "bank") -> ProjectedEvent {
    event(stream, version, MoneyDeposited(amount: amount, description: ""), topic: topic)
}

private func opened(_ stream: String, _ amount: Int64, topic: String? = "bank") -> ProjectedEvent {
    event(stream, 1, AccountOpened(owner: "O'Brien \"quoted\"", initialDeposit: amount), topic: topic)
}

private func admit(_ progress: inout StreamProgress, _ event: ProjectedEvent) -> Bool { progress.admit(event) }

@Suite("which events are new to a projection (StreamProgress, pure)")
struct StreamProgressTests {
    @Test("versions at or below the stream's for the source are duplicates, also within one batch")
    func duplicates() {
        var progress = StreamProgress(versions: [.init(stream: "a", source: "bank"): 3])
        #expect(!admit(&progress, deposit("a", 2, 1)))
        #expect(!admit(&progress, deposit("a", 3, 1)))
        #expect(admit(&progress, deposit("a", 4, 1)))
        #expect(!admit(&progress, deposit("a", 4, 1)), "redelivered within the same batch")
        #expect(admit(&progress, deposit("a", 6, 1)), "a gap (an event routed elsewhere, or older than retention) is allowed")
        #expect(admit(&progress, deposit("b", 1, 1)), "a stream never seen")
        #expect(progress.changed == [.init(stream: "a", source: "bank"), .init(stream: "b", source: "bank")])
        #expect(progress.versions[.init(stream: "a", source: "bank")] == 6)
    }

    @Test("topics are counted apart; the store's version (a rebuild) covers every topic")
    func sources() {
        var progress = StreamProgress(versions: [.init(stream: "a", source: "deposits"): 5, .init(stream: "a", source: ""): 2])
        #expect(admit(&progress, deposit("a", 4, 1, topic: "withdrawals")), "behind on another topic is not a duplicate")
        #expect(!admit(&progress, deposit("a", 2, 1, topic: "withdrawals")), "covered by the rebuild")
        #expect(!admit(&progress, deposit("a", 5, 1, topic: "deposits")))
        #expect(admit(&progress, deposit("a", 3, 1, topic: nil)), "replayed from the store")
    }
}

@Suite("ProjectionApplier on real PostgreSQL: exactly once per event, with bounded state")
struct ProjectionApplierTests {
    let applier = ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry)

    func withTables(_ body: (TestEventStore) async throws -> Void) async throws {
        let test = try await TestEventStore.create()
        try await test.pool.withConnection { connection in
            for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
        }
        try await body(test)
        try await test.drop()
    }

    func apply(_ events: [ProjectedEvent], _ test: TestEventStore) async throws -> ProjectionApplier.Outcome {
        try await test.pool.withTransaction { try await applier.apply(events, on: $0) }
    }

    func balance(_ account: String, _ test: TestEventStore) async throws -> Int {
        try await test.count("SELECT balance FROM account_balances WHERE account_id = $1", [.text(account)])
    }

    @Test("1,000 events of one stream leave one progress row per projection; redelivering any of them changes nothing")
    func boundedAndExact() async throws {
        try await withTables { test in
            var events = [opened("acct-1", 10)]
            for version in 2...1000 { events.append(deposit("acct-1", Int64(version), 1)) }
            for start in stride(from: 0, to: events.count, by: 200) {
                let outcome = try await apply(Array(events[start..<min(start + 200, events.count)]), test)
                #expect(outcome.duplicates == 0)
            }
            #expect(try await balance("acct-1", test) == 10 + 999)
            #expect(try await test.count("SELECT count(*) FROM account_balances_progress") == 1)
            #expect(try await test.count("SELECT count(*) FROM daily_volume_progress") == 1)
            // Old events again (a relay retry, a consumer rewound to an old offset), alone and mixed with a new one.
            var outcome = try await apply([events[0], events[1], events[500]], test)
            #expect(outcome == .init(applied: 0, duplicates: 6))
            outcome = try await apply([events[999], deposit("acct-1", 1001, 7), events[3]], test)
            #expect(outcome == .init(applied: 2, duplicates: 4))
            #expect(try await balance("acct-1", test) == 10 + 999 + 7)
            #expect(try await test.count("SELECT deposits_total FROM daily_volume") == 10 + 999 + 7)
        }
    }

    @Test("events of one stream routed to two topics are applied whichever topic delivers first")
    func twoTopics() async throws {
        try await withTables { test in
            _ = try await apply([opened("acct-2", 100, topic: "accounts")], test)
            _ = try await apply([deposit("acct-2", 3, 5, topic: "deposits")], test)
            _ = try await apply([event("acct-2", 2, MoneyWithdrawn(amount: 30, description: ""), topic: "withdrawals")], test)
            #expect(try await balance("acct-2", test) == 75)
            #expect(try await apply([deposit("acct-2", 3, 5, topic: "deposits")], test) == .init(applied: 0, duplicates: 2))
        }
    }

    @Test("after a rebuild, Kafka redelivering events the rebuild replayed skips them, and later events apply")
    func afterRebuild() async throws {
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: uniqueName("bank")))
        let bank = Bank(store: test.store)
        let account = try await bank.open(owner: "Rebuilt", initialDeposit: 50)
        _ = try await bank.deposit(account, amount: 25)
        try await ProjectionRebuilder(pool: test.pool, registry: BankEvents.registry).rebuild(AccountProjections.balances)
        #expect(try await test.count("SELECT last_version FROM account_balances_progress WHERE source = ''") == 2)
        let stored = try await test.store.readAll().reduce(into: [RecordedEvent]()) { $0.append($1) }
        let redelivered = try stored.map { ProjectedEvent(event: try BankEvents.registry.decode($0), recorded: $0, topic: "bank") }
        let balancesOnly = ProjectionApplier(projections: [AccountProjections.balances], registry: BankEvents.registry)
        var outcome = try await test.pool.withTransaction { try await balancesOnly.apply(redelivered, on: $0) }
        #expect(outcome == .init(applied: 0, duplicates: 2))
        _ = try await bank.deposit(account, amount: 5)
        let third = try #require(try await test.store.readAll(after: stored.last!.position).reduce(into: [RecordedEvent]()) { $0.append($1) }.first)
        outcome = try await test.pool.withTransaction {
            try await balancesOnly.apply([ProjectedEvent(event: try BankEvents.registry.decode(third), recorded: third, topic: "bank")], on: $0)
        }
        #expect(outcome == .init(applied: 1, duplicates: 0))
        #expect(try await balance(account, test) == 80)
        try await test.drop()
    }

    @Test("two transactions applying the same events (consumers overlapping in a rebalance): applied once")
    func concurrentTransactions() async throws {
        try await withTables { test in
            _ = try await apply([opened("acct-3", 0)], test)
            let batch = [deposit("acct-3", 2, 10), deposit("acct-3", 3, 10)]
            let first = try await PQConnection.connect(to: test.schema.url)
            let second = try await PQConnection.connect(to: test.schema.url)
            let secondPID = try await second.query("SELECT pg_backend_pid()").first!.decode(Int32.self, at: 0)
            try await first.executeScript("BEGIN")
            #expect(try await applier.apply(batch, on: first) == .init(applied: 4, duplicates: 0))
            let racing = Task { try await second.withTransaction { try await applier.apply(batch, on: $0) } }
            try await waitUntil("the second transaction waits for the first one's progress rows") {
                try await test.count("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'", [.int32(secondPID)]) == 1
            }
            try await first.executeScript("COMMIT")
            #expect(try await racing.value == .init(applied: 0, duplicates: 4))
            #expect(try await balance("acct-3", test) == 20)

            // A stream new to the projection has no row to lock: the second to record it fails, retriably.
            try await first.executeScript("BEGIN")
            _ = try await applier.apply([opened("acct-4", 9)], on: first)
            let newStream = Task { try await second.withTransaction { try await applier.apply([opened("acct-4", 9)], on: $0) } }
            try await waitUntil("the second transaction waits on the first one's insert") {
                try await test.count("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'", [.int32(secondPID)]) == 1
            }
            try await first.executeScript("COMMIT")
            let failure = await newStream.result
            guard case .failure(let error) = failure else {
                Issue.record("the second transaction applied a stream the first had just recorded")
                return
            }
            #expect(error is ConcurrentProjectionUpdate || (error as? PQError)?.isRetriable == true, "\(error)")
            #expect(ProjectionConsumer.isTransient(error))
            #expect(try await balance("acct-4", test) == 9)
            await first.close()
            await second.close()
        }
    }

    @Test("hostile stream ids and owners are stored literally")
    func hostileText() async throws {
        try await withTables { test in
            let id = #"acct-'; DROP TABLE account_balances; --"{}\"#
            _ = try await apply([opened(id, 1), deposit(id, 2, 2)], test)
            #expect(try await balance(id, test) == 3)
            #expect(try await test.count("SELECT count(*) FROM account_balances WHERE owner = $1", [.text("O'Brien \"quoted\"")]) == 1)
        }
    }
}
