import BankAccount
import EventSourcing
import EventStore
import Foundation
import LibPQ
import PropertyBased
import TestSupport
import Testing

@Suite("bank accounts on the event store (real PostgreSQL)")
struct BankTests {
    @Test("50 concurrent withdrawals: never negative, one event per accepted withdrawal, conflicts retried")
    func concurrentWithdrawals() async throws {
        // 50 callers on 8 connections, each retrying on conflicts: with the whole suite running on two busy cores a
        // caller waited more than the pool's default 30 s (fresh-clone run 52). The wait is not what is tested.
        let test = try await TestEventStore.create(maxConnections: 8, acquireTimeout: .seconds(600))
        let bank = Bank(store: test.store)
        let initial: Int64 = 1_000
        let id = try await bank.open(owner: "Race", initialDeposit: initial)
        let outcomes = try await withThrowingTaskGroup(of: WithdrawalOutcome.self) { group in
            for n in 0..<50 {
                group.addTask { try await bank.withdraw(id, amount: Int64(20 + n % 7 * 10)) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        var accepted: Int64 = 0
        var acceptedCount = 0
        for (n, outcome) in outcomes.enumerated() {
            if case .accepted(let balance) = outcome {
                #expect(balance >= 0, "withdrawal \(n)")
                acceptedCount += 1
            }
        }
        let history = try await bank.history(id)
        let withdrawn = history.compactMap { $0.event as? MoneyWithdrawn }
        accepted = withdrawn.reduce(0) { $0 + $1.amount }
        #expect(withdrawn.count == acceptedCount)
        #expect(history.compactMap { $0.event as? WithdrawalRejected }.count == 50 - acceptedCount)
        #expect(history.count == 51)
        let final = try await bank.account(id).state.balance
        #expect(final == initial - accepted)
        #expect(final >= 0)
        // The balance never went negative at any version.
        var balance: Int64 = 0
        for (_, event) in history {
            if let opened = event as? AccountOpened { balance = opened.initialDeposit }
            if let out = event as? MoneyWithdrawn { balance -= out.amount }
            #expect(balance >= 0)
        }
        try await test.drop()
    }

    @Test("balance at every past version and timestamp equals the step-by-step expectation")
    func timeTravel() async throws {
        let test = try await TestEventStore.create()
        let bank = Bank(store: test.store)
        let id = try await bank.open(owner: "Kim", initialDeposit: 10_000)
        var expected: [(version: Int64, at: Date, balance: Int64)] = [(1, Date(), 10_000)]
        let steps: [(Bool, Int64)] = [(true, 2_500), (false, 4_000), (false, 100_000), (true, 1), (false, 8_501)]
        var balance: Int64 = 10_000
        for (isDeposit, amount) in steps {
            if isDeposit {
                balance = try await bank.deposit(id, amount: amount, description: "step")
            } else if case .accepted(let after) = try await bank.withdraw(id, amount: amount) {
                balance = after
            }
            expected.append((Int64(expected.count + 1), Date(), balance))
        }
        for step in expected {
            #expect(try await bank.account(id, atVersion: step.version).state.balance == step.balance)
            #expect(try await bank.account(id, asOf: step.at).state.balance == step.balance, "at version \(step.version)")
        }
        #expect(try await bank.account(id).state.balance == 0)
        await #expect(throws: BankError.self) { try await bank.account(id, asOf: Date(timeIntervalSince1970: 0)) }
        try await test.drop()
    }

    @Test("validation: non-positive amounts and unknown accounts are refused and record nothing")
    func validation() async throws {
        let test = try await TestEventStore.create()
        let bank = Bank(store: test.store)
        let id = try await bank.open(owner: "V", initialDeposit: 5)
        await #expect(throws: BankError.self) { try await bank.deposit(id, amount: 0) }
        await #expect(throws: BankError.self) { try await bank.withdraw(id, amount: -5) }
        await #expect(throws: BankError.self) { try await bank.deposit("no-such-account", amount: 5) }
        await #expect(throws: BankError.self) { try await bank.open(owner: "  ") }
        #expect(try await test.count("SELECT count(*) FROM events") == 1)
        try await test.drop()
    }

    @Test("balances at the edge of Int64: a deposit past it is refused before anything is written; a stored stream past it fails to load with a named error")
    func int64Edge() async throws {
        let test = try await TestEventStore.create()
        let bank = Bank(store: test.store)
        let id = try await bank.open(owner: "Edge", initialDeposit: Int64.max - 10)
        #expect(try await bank.deposit(id, amount: 10) == Int64.max)
        await #expect { try await bank.deposit(id, amount: 1) } throws: { "\($0)".contains("exceeds the largest balance") }
        #expect(try await test.count("SELECT count(*) FROM events WHERE stream_id = $1", [.text(id)]) == 2)
        // Events written by other means (an import) that sum past Int64: replay reports it, no trap.
        try await test.store.append(
            [NewEvent(MoneyDeposited(amount: 5, description: "imported"))], to: id, category: Account.category,
            expectedVersion: .exact(2))
        await #expect { try await bank.account(id) } throws: { error in
            (error as? BalanceOutOfRange)?.description.contains("Edge's account") == true
        }
        let low = try await bank.open(owner: "Low", initialDeposit: 0)
        try await test.store.append(
            [NewEvent(MoneyWithdrawn(amount: Int64.max, description: "")), NewEvent(MoneyWithdrawn(amount: 5, description: ""))],
            to: low, category: Account.category, expectedVersion: .exact(1))
        await #expect(throws: BalanceOutOfRange.self) { try await bank.account(low) }
        await #expect { try await bank.account(id, atVersion: 0) } throws: { "\($0)".contains("1 or more") }
        try await test.drop()
    }

    @Test("a stored v1 MoneyDeposited row is upcast; unknown types and bad payloads fail loudly")
    func storedRowsOfEveryKind() async throws {
        let test = try await TestEventStore.create()
        let bank = Bank(store: test.store)
        let id = try await bank.open(owner: "Old", initialDeposit: 100)
        func insert(_ type: String, _ version: Int, _ payload: String, stream: String, streamVersion: Int64) async throws -> UUID {
            let eventID = UUID()
            try await test.pool.withConnection {
                try await $0.execute(
                    "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, occurred_at) "
                        + "VALUES ($1, $2, $3, $4, $5, $6, now())",
                    [.uuid(eventID), .text(stream), .int64(streamVersion), .text(type), .int(version), .jsonb(payload)])
            }
            return eventID
        }
        _ = try await insert("MoneyDeposited", 1, #"{"amount": 50}"#, stream: id, streamVersion: 2)
        #expect(try await bank.account(id).state.balance == 150)
        let deposit = try await bank.history(id).last?.event as? MoneyDeposited
        #expect(deposit == MoneyDeposited(amount: 50, description: ""))

        let unknownID = try await insert("InterestAccrued", 1, #"{"rate": 3}"#, stream: id, streamVersion: 3)
        let unknown = await #expect(throws: EventDecodingError.self) { try await bank.account(id) }
        #expect(unknown?.eventID == unknownID)
        #expect(unknown?.streamID == id)
        #expect(unknown?.eventType == "InterestAccrued")

        let other = try await bank.open(owner: "Bad", initialDeposit: 1)
        _ = try await insert("MoneyWithdrawn", 1, #"{"amount": "ten", "description": "x"}"#, stream: other, streamVersion: 2)
        let bad = await #expect(throws: EventDecodingError.self) { try await bank.account(other) }
        #expect(bad?.description.contains("amount") == true)
        try await test.drop()
    }

    @Test("a snapshot of another state schema version is ignored (full replay), never misread")
    func staleSnapshotIgnored() async throws {
        let test = try await TestEventStore.create()
        var bank = Bank(store: test.store, snapshotInterval: 3)
        let id = try await bank.open(owner: "Snap", initialDeposit: 10)
        for _ in 0..<4 { _ = try await bank.deposit(id, amount: 1) }  // versions 2...5: one snapshot, at 3
        #expect(try await test.count("SELECT count(*) FROM snapshots WHERE stream_id = $1", [.text(id)]) == 1)
        // A snapshot from a future/old layout at a later version, with nonsense in it.
        try await test.pool.withConnection {
            try await $0.execute(
                "INSERT INTO snapshots (stream_id, version, state_schema_version, state) VALUES ($1, 5, 99, $2)",
                [.text(id), .jsonb(#"{"balance": "garbage"}"#)])
        }
        #expect(try await bank.account(id).state.balance == 14)
        // A corrupt snapshot of the current layout is also ignored.
        try await test.pool.withConnection {
            try await $0.execute(
                "INSERT INTO snapshots (stream_id, version, state_schema_version, state) VALUES ($1, 5, 1, $2)",
                [.text(id), .jsonb(#"{"balance": "garbage"}"#)])
        }
        #expect(try await bank.account(id).state.balance == 14)
        bank = Bank(store: test.store, snapshotInterval: 100)
        #expect(try await bank.account(id).version == 5)
        try await test.drop()
    }

    @Test("a load that replays snapshotInterval events or more leaves a snapshot (a stream imported without any)")
    func snapshotAfterLongReplay() async throws {
        let test = try await TestEventStore.create()
        let bank = Bank(store: test.store, snapshotInterval: 10)
        let id = try await bank.open(owner: "Imported", initialDeposit: 1)
        for _ in 0..<24 { _ = try await bank.deposit(id, amount: 1) }  // versions 2...25
        try await test.pool.withConnection { try await $0.execute("DELETE FROM snapshots") }
        #expect(try await bank.account(id).state.balance == 25)
        #expect(try await test.count("SELECT max(version) FROM snapshots WHERE stream_id = $1", [.text(id)]) == 25)
        // A corrupt snapshot of the current layout is replaced by the next load that replays past it.
        try await test.pool.withConnection {
            try await $0.execute("UPDATE snapshots SET state = '{\"balance\": \"garbage\"}' WHERE stream_id = $1", [.text(id)])
        }
        #expect(try await bank.account(id).state.balance == 25)
        #expect(try await test.count("SELECT (state->>'balance')::bigint FROM snapshots WHERE stream_id = $1 AND version = 25", [.text(id)]) == 25)
        try await test.drop()
    }

    @Test("time travel starts from the newest snapshot at or below the version or moment asked for")
    func timeTravelFromSnapshots() async throws {
        let test = try await TestEventStore.create()
        let bank = Bank(store: test.store, snapshotInterval: 1000)
        let id = try await bank.open(owner: "Traveller", initialDeposit: 0)
        var times: [Date] = []
        for _ in 0..<9 {
            _ = try await bank.deposit(id, amount: 1)  // versions 2...10, balance = version - 1
            times.append(try await test.store.readStream(id).last!.occurredAt)
        }
        // A marked snapshot at version 5 (balance 1000 instead of 4): whatever reads through it shows the mark.
        var marked = Account()
        marked.isOpen = true
        marked.owner = "Traveller"
        marked.balance = 1000
        let markedJSON = String(decoding: try EventJSON.encoder.encode(marked), as: UTF8.self)
        try await test.pool.withConnection {
            try await $0.execute(
                "INSERT INTO snapshots (stream_id, version, state_schema_version, state) VALUES ($1, 5, 1, $2)",
                [.text(id), .jsonb(markedJSON)])
        }
        #expect(try await bank.account(id, atVersion: 4).state.balance == 3, "below the snapshot: replayed from the start")
        #expect(try await bank.account(id, atVersion: 5).state.balance == 1000, "the snapshot itself")
        #expect(try await bank.account(id, atVersion: 8).state.balance == 1003, "the snapshot plus versions 6...8")
        #expect(try await bank.account(id, asOf: times[2]).state.balance == 3, "version 4 by time")
        #expect(try await bank.account(id, asOf: times[6]).state.balance == 1003, "version 8 by time, through the snapshot")
        let pastEnd = await #expect(throws: BankError.self) { try await bank.account(id, atVersion: 11) }
        #expect(pastEnd?.description.contains("there is no version 11") == true)
        try await test.drop()
    }

    @Test("for random command histories, snapshot + tail replay equals full replay")
    func snapshotEqualsReplay() async throws {
        let test = try await TestEventStore.create()
        let commands = Gen.int(in: -300...300).array(of: 1...40)
        let interval = Gen.int(in: 1...7)
        await propertyCheck(count: 25, input: commands, interval) { amounts, interval in
            do {
                let bank = Bank(store: test.store, snapshotInterval: interval)
                let id = try await bank.open(owner: "P", initialDeposit: 100)
                for amount in amounts where amount != 0 {
                    if amount > 0 {
                        _ = try await bank.deposit(id, amount: Int64(amount))
                    } else {
                        _ = try await bank.withdraw(id, amount: Int64(-amount))
                    }
                }
                let viaSnapshot = try await bank.repository.load(id)
                let full = try bank.repository.replay(try await test.store.readStream(id), onto: VersionedState(state: Account(), version: 0))
                #expect(viaSnapshot.state == full.state)
                #expect(viaSnapshot.version == full.version)
                #expect(viaSnapshot.version == Int64(1 + amounts.filter { $0 != 0 }.count))
            } catch {
                Issue.record(error)
            }
        }
        #expect(try await test.count("SELECT count(*) FROM snapshots") > 0)
        try await test.drop()
    }
}
