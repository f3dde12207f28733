import BankAccount
import EventSourcing
@testable import EventStore
import Foundation
import LibPQ
import TestSupport
import Testing

@Suite("aggregate cache: commands decided on a cached state, kept honest by the append's version check (real PostgreSQL)")
struct AggregateCacheTests {
    /// A bank with a cache and one without (another replica: its appends never reach the cache), on one store.
    static func twoWriters() async throws -> (TestEventStore, AggregateCache<Account>, cached: Bank, other: Bank) {
        let test = try await TestEventStore.create()
        let cache = AggregateCache<Account>(capacity: 16)
        return (test, cache, Bank(store: test.store, cache: cache), Bank(store: test.store))
    }

    @Test("a warm cache decides without loading: with the snapshots table gone, a cached deposit commits and an uncached one fails")
    func warmCacheSkipsTheLoad() async throws {
        let (test, cache, cached, uncached) = try await Self.twoWriters()
        let id = try await cached.open(owner: "Warm", initialDeposit: 100)
        #expect(try await cached.deposit(id, amount: 1) == 101)
        // Opening saved the account's first state: the deposit after it was decided on the cache.
        #expect(cache.statistics == .init(hits: 1, misses: 0, stale: 0))
        // Every load starts with the newest snapshot: without its table a load fails, an append does not.
        try await test.pool.withConnection { try await $0.executeScript("ALTER TABLE snapshots RENAME TO snapshots_away") }
        #expect(try await cached.deposit(id, amount: 2) == 103)
        await #expect { try await uncached.deposit(id, amount: 4) } throws: { "\($0)".contains("snapshots") }
        try await test.pool.withConnection { try await $0.executeScript("ALTER TABLE snapshots_away RENAME TO snapshots") }
        #expect(cache.statistics == .init(hits: 2, misses: 0, stale: 0))
        #expect(try await uncached.account(id).state.balance == 103)
        #expect(try await test.count("SELECT count(*) FROM outbox") == 3)
        try await test.drop()
    }

    @Test("a state another writer changed is caught by the append: the command is decided again on the stored state")
    func staleStateIsDecidedAgain() async throws {
        let (test, cache, cached, other) = try await Self.twoWriters()
        let id = try await cached.open(owner: "Stale", initialDeposit: 100)
        #expect(try await cached.deposit(id, amount: 1) == 101)
        #expect(try await other.withdraw(id, amount: 101) == .accepted(balance: 0))
        // The cached balance (101) would accept this; the stored one (0) refuses it, and the refusal is recorded.
        let outcome = try await cached.withdraw(id, amount: 50)
        #expect(outcome == .rejected(reason: "insufficient funds: balance 0, requested 50", balance: 0))
        #expect(cache.statistics.stale == 1)
        let history = try await cached.history(id).map { type(of: $0.event).eventType }
        #expect(history == ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn", "WithdrawalRejected"])
        #expect(try await test.count("SELECT count(*) FROM outbox") == 4)
        // The rejection left the cache current again: the next command is a hit and commits at version 5.
        let hitsBefore = cache.statistics.hits
        #expect(try await cached.deposit(id, amount: 7) == 7)
        #expect(cache.statistics.hits == hitsBefore + 1)
        #expect(try await test.count("SELECT max(stream_version) FROM events WHERE stream_id = $1", [.text(id)]) == 5)
        try await test.drop()
    }

    @Test("a command the cached state refuses is checked against the stored state before it is refused")
    func refusalIsCheckedAgainstTheStore() async throws {
        let (test, _, cached, other) = try await Self.twoWriters()
        let id = try await cached.open(owner: "Edge", initialDeposit: Int64.max - 10)
        #expect(try await cached.deposit(id, amount: 1) == Int64.max - 9)
        #expect(try await other.withdraw(id, amount: 100) == .accepted(balance: Int64.max - 109))
        // On the cached balance this deposit overflows; on the stored one it fits.
        #expect(try await cached.deposit(id, amount: 50) == Int64.max - 59)
        // A refusal that the stored state confirms is still a refusal, and writes nothing.
        await #expect { try await cached.deposit(id, amount: 100) } throws: { "\($0)".contains("exceeds the largest balance") }
        #expect(try await test.count("SELECT count(*) FROM events WHERE stream_id = $1", [.text(id)]) == 4)
        try await test.drop()
    }

    @Test("a command whose transaction fails leaves the cache as it was: nothing written, the next command decides on the stored state")
    func failedTransactionIsNotCached() async throws {
        let (test, cache, cached, _) = try await Self.twoWriters()
        let id = try await cached.open(owner: "Fail", initialDeposit: 10)
        let broken: @Sendable (AccountCommandResult) throws -> [TransactionalWrite] = { _ in
            [TransactionalWrite("INSERT INTO no_such_table VALUES (1)", statement: "a write that fails")]
        }
        await #expect { try await cached.execute(.deposit(amount: 5, description: ""), on: id, alsoWriting: broken) } throws: {
            "\($0)".contains("no_such_table")
        }
        #expect(try await test.count("SELECT count(*) FROM events WHERE stream_id = $1", [.text(id)]) == 1)
        #expect(try await cached.deposit(id, amount: 2) == 12)
        // Had the failed deposit's state (version 2) been kept, this append would have expected version 2: stale.
        #expect(cache.statistics.stale == 0)
        try await test.drop()
    }

    @Test("50 concurrent withdrawals through one cache take turns: never negative, every accepted one recorded once, no state found stale")
    func concurrentCommandsShareTheCache() async throws {
        let test = try await TestEventStore.create(maxConnections: 8, acquireTimeout: .seconds(600))
        let cache = AggregateCache<Account>(capacity: 16)
        let bank = Bank(store: test.store, cache: cache)
        let id = try await bank.open(owner: "Race", initialDeposit: 1_000)
        let outcomes = try await withThrowingTaskGroup(of: WithdrawalOutcome.self) { group in
            for n in 0..<50 { group.addTask { try await bank.withdraw(id, amount: Int64(20 + n % 7 * 10)) } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let history = try await bank.history(id)
        var balance: Int64 = 0
        for (_, event) in history {
            if let opened = event as? AccountOpened { balance = opened.initialDeposit }
            if let out = event as? MoneyWithdrawn { balance -= out.amount }
            #expect(balance >= 0)
        }
        let accepted = outcomes.filter { if case .accepted = $0 { true } else { false } }.count
        #expect(history.count == 51)
        #expect(history.compactMap { $0.event as? MoneyWithdrawn }.count == accepted)
        #expect(try await bank.account(id).state.balance == balance)
        // Commands of one process take turns on a stream: none decided on a state another one had just replaced.
        #expect(cache.statistics.stale == 0)
        #expect(cache.statistics.misses == 0)
        // The cache ends current: what it holds is what the store holds.
        #expect(cache.state(of: id)?.version == 51)
        try await test.drop()
    }

    @Test("holds at most its capacity, keeps what was used last, and never goes back to an older version")
    func boundsAndOrder() {
        let cache = AggregateCache<Account>(capacity: 8)
        func state(_ version: Int64) -> VersionedState<Account> { VersionedState(state: Account(), version: version) }
        for n in 0..<1_000 {
            cache.remember("s\(n)", state(1))
            #expect(cache.count <= 8)
            // The stream used just before is still there.
            if n > 0 { #expect(cache.state(of: "s\(n - 1)") != nil, "after s\(n)") }
        }
        cache.remember("s999", state(5))
        cache.remember("s999", state(3))  // an older command finishing last
        #expect(cache.state(of: "s999")?.version == 5)
        cache.remember("new", state(0))  // a stream with no events is not a state worth keeping
        #expect(cache.state(of: "new") == nil)
        cache.forget("s999", stale: true)
        #expect(cache.state(of: "s999") == nil)
        #expect(cache.statistics.stale == 1)
    }
}
