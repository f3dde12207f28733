import BankAccount
import EventSourcing
import EventStore
import Foundation
import KafkaClient
import LibPQ
import TestSupport
import Testing

/// The fault suite: each scenario runs the real `outbox-relay` and `account-projector` against real PostgreSQL
/// and a `kafka-mock-cluster` process of its own, breaks something while bank commands keep coming, and checks
/// that no event was lost, none applied twice and every stream stayed in order. Each records its figures
/// (RELIABILITY.md). One scenario at a time: each loads both cores.
@Suite("fault suite: real processes, real PostgreSQL, kafka-mock-cluster; 0 lost, 0 applied twice, order kept", .serialized)
struct FaultSuiteTests {
    @Test("PostgreSQL crashes (pg_ctl stop -m immediate) and restarts twice under load; relay and projector ride it out")
    func postgresCrashes() async throws {
        let rig = try await FaultRig("PostgreSQL crashed and restarted twice under load", crashable: true)
        let server = try #require(rig.server)
        let load = rig.startLoad()
        for _ in 0..<2 {
            try await rig.waitForFlow()
            try await server.crash()
            // Down long enough for every client to notice: their connections break, reconnects fail.
            try await Task.sleep(for: .seconds(2))
            try await server.restart()
            try await rig.recoverAfterFault()
            #expect(rig.relay.isRunning, "outbox-relay survives the crash: \(rig.relay.recentOutput)")
            #expect(rig.projector.isRunning, "account-projector survives the crash: \(rig.projector.recentOutput)")
        }
        try await rig.waitForFlow()
        let result = await load.stop()
        #expect(result.failed > 0, "the load saw the outages")
        rig.figures.notes = "\(result.succeeded) commands succeeded, \(result.failed) failed while the server was down; relay and projector never exited"
        try await rig.verify()
        try await rig.tearDown()
    }

    @Test("every broker down for 10 s under load: rows wait, then everything is published in order")
    func allBrokersDown() async throws {
        try await brokerOutage("every broker down for 10 s", down: "all down", up: "all up", for: .seconds(10))
    }

    /// A Kafka transaction spans the partitions of its batch: while a broker that leads one of them (or
    /// coordinates the relay's transactions) is down, the open transaction waits for it. A real cluster moves
    /// leadership to a replica within seconds; the mock does not, so here it waits for the broker's return.
    @Test("one broker of three down under load: the open transaction waits for it, then everything is published once")
    func oneBrokerDown() async throws {
        try await brokerOutage("one broker of three down for 5 s", down: "broker 2 down", up: "broker 2 up", for: .seconds(5))
    }

    /// Breaks the cluster with the control command `down` under load, runs `meanwhile`, keeps it broken for
    /// `duration` after that, repairs it with `up`, then measures the recovery and verifies.
    private func brokerOutage(
        _ scenario: String, down: String, up: String, for duration: Duration,
        meanwhile: (FaultRig) async throws -> Void = { _ in }
    ) async throws {
        let rig = try await FaultRig(scenario)
        let load = rig.startLoad()
        try await rig.waitForFlow()
        try await rig.cluster.command(down)
        let before = try await rig.count("SELECT count(*) FROM events")
        try await meanwhile(rig)
        try await Task.sleep(for: duration)
        let during = try await rig.count("SELECT count(*) FROM events") - before
        try await rig.cluster.command(up)
        try await rig.recoverAfterFault()
        try await rig.waitForFlow()
        _ = await load.stop()
        #expect(rig.relay.isRunning && rig.projector.isRunning)
        rig.figures.notes = "\(during) events committed during the outage"
        try await rig.verify()
        try await rig.tearDown()
    }

    @Test("outbox-relay SIGKILLed 20 times at random moments under load: nothing lost, nothing twice for read_committed consumers")
    func relayKilledRepeatedly() async throws {
        let rig = try await FaultRig("outbox-relay SIGKILLed 20 times at random moments under load")
        let load = rig.startLoad()
        try await rig.waitForFlow()
        for _ in 0..<20 {
            // A random moment: after the new run has published a random number of rows (mid-transaction,
            // between commit and mark, while recovering: wherever that falls).
            try await rig.waitForPublished(rows: Int.random(in: 1...60))
            let status = try await rig.relay.stop(SIGKILL)
            #expect(status != 0)
            try rig.relay.restart()
        }
        try await rig.recoverAfterFault()
        try await rig.waitForFlow()
        _ = await load.stop()
        rig.figures.notes = "\(rig.relay.starts) relay runs"
        try await rig.verify()
        try await rig.tearDown()
    }

    @Test("the relay's database sessions terminated five times under load (pg_terminate_backend): it reconnects, repeats nothing")
    func relaySessionsTerminated() async throws {
        let rig = try await FaultRig("the relay's database sessions terminated five times under load")
        let load = rig.startLoad()
        var terminated = 0
        for _ in 0..<5 {
            try await rig.waitForPublished(rows: Int.random(in: 20...80))
            terminated += try await rig.count(
                """
                SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                WHERE application_name = 'outbox-relay' AND pid <> pg_backend_pid()) t
                """)
            try await rig.recoverAfterFault()
        }
        try await rig.waitForFlow()
        _ = await load.stop()
        #expect(rig.relay.isRunning, "outbox-relay survives: \(rig.relay.recentOutput)")
        #expect(terminated >= 5)
        rig.figures.notes = "\(terminated) sessions terminated; the relay never exited"
        try await rig.verify()
        try await rig.tearDown()
    }

    @Test("account-projector SIGKILLed after its database commits, before its offset commits: redeliveries are skipped")
    func projectorKilledBeforeOffsetCommit() async throws {
        // Offsets are committed only every 500 records or at the interval: an hour here.
        let rig = try await FaultRig("account-projector SIGKILLed between its database commit and its offset commit",
                                     projectorFirstRun: ["--commit-interval", "3600"])
        let load = rig.startLoad()
        try await rig.waitForFlow(events: 100)
        let status = try await rig.projector.stop(SIGKILL)
        #expect(status != 0)
        try rig.projector.restart()
        try await rig.recoverAfterFault()
        try await rig.waitForFlow()
        _ = await load.stop()
        try await rig.verify()
        // Everything the first run applied came again: the projector skipped it by stream version.
        #expect(rig.figures.duplicatesSkipped > 0)
        try await rig.tearDown()
    }

    @Test("100 concurrent `bank withdraw` processes on one account: balance never negative, every refusal on record")
    func concurrentWithdrawals() async throws {
        let rig = try await FaultRig("100 concurrent withdrawals on one account (bank CLI processes)", accounts: 1)
        let account = try #require(rig.accounts.first)
        let databaseURL = rig.databaseURL
        let statuses = try await withThrowingTaskGroup(of: ToolRun.self) { group in
            for n in 0..<100 {
                group.addTask {
                    try await Tools.run(
                        "bank", ["withdraw", account, "30", "--description", "concurrent \(n)"],
                        environment: ["EVENTOUTBOX_DATABASE_URL": databaseURL])
                }
            }
            var runs: [ToolRun] = []
            for try await run in group { runs.append(run) }
            return runs
        }
        let accepted = statuses.filter { $0.status == 0 }.count
        let refused = statuses.filter { $0.status == 3 }
        #expect(accepted == 33, "1000 covers 33 withdrawals of 30")
        #expect(refused.count == 67, "other outcomes: \(statuses.filter { $0.status != 0 && $0.status != 3 }.map(\.stderr))")
        #expect(refused.allSatisfy { $0.stdout.contains("rejected: insufficient funds") || $0.stderr.contains("rejected: insufficient funds") })

        // The history, replayed event by event: never below zero, each refusal recorded with the balance it saw.
        let history = try await rig.bank.history(account)
        var balance: Int64 = 0
        var rejected = 0
        for (_, event) in history {
            switch event {
            case let opened as AccountOpened: balance += opened.initialDeposit
            case let withdrawn as MoneyWithdrawn: balance -= withdrawn.amount
            case let refusal as WithdrawalRejected:
                rejected += 1
                #expect(refusal.balanceAtTime == balance && refusal.balanceAtTime < 30)
            default: Issue.record("unexpected event \(event)")
            }
            #expect(balance >= 0)
        }
        #expect(rejected == 67 && balance == 10)
        #expect(try await rig.bank.account(account).state.balance == 10)
        rig.figures.notes = "\(accepted) accepted, \(rejected) rejected and on record, final balance 10, never negative"
        try await rig.verify()
        try await rig.tearDown()
    }

    @Test("a 1 MB event payload goes through store, relay, Kafka and projection intact")
    func megabytePayload() async throws {
        let rig = try await FaultRig("a 1 MB event payload", accounts: 2)
        let description = String(repeating: "1 MB of \"quotes\", 'apostrophes', \\ and ünïcödé; ", count: 20_000)
        #expect(description.utf8.count > 1_000_000)
        _ = try await rig.bank.deposit(rig.accounts[0], amount: 7, description: description)
        _ = try await rig.bank.deposit(rig.accounts[1], amount: 3, description: "small, after the big one")
        try await rig.waitUntilProjected()
        let stored = try await rig.bank.history(rig.accounts[0])
        #expect((stored.last?.event as? MoneyDeposited)?.description == description)
        let reader = try KafkaTopicReader(brokers: rig.cluster.bootstrapServers, topic: rig.topic)
        try await reader.read(until: "the big record") { messages in messages.contains { ($0.value?.count ?? 0) > 1_000_000 } }
        await reader.close()
        let big = try #require(reader.messages.first { ($0.value?.count ?? 0) > 1_000_000 })
        let event = try OutboxEnvelope.recordedEvent(from: try #require(big.value))
        #expect(try (BankEvents.registry.decode(event) as? MoneyDeposited)?.description == description)
        rig.figures.notes = "record of \(big.value?.count ?? 0) bytes delivered and applied"
        try await rig.verify()
        try await rig.tearDown()
    }
}
