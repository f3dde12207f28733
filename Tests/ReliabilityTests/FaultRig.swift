import BankAccount
import EventSourcing
import EventStore
import Foundation
import KafkaClient
import OutboxRelayStore
import LibPQ
import TestSupport
import Testing

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// A long-running executable of the project (`outbox-relay`, `account-projector`) that a scenario may kill and
/// start again. Its counters come from its `/metrics` endpoint, summed over its runs (each run is scraped just
/// before it is killed).
final class LongRunningTool {
    let tool: String
    let arguments: [String]
    let log: URL
    private(set) var process: ChildProcess
    private(set) var port: Int
    private(set) var starts = 1
    private var earlierRuns: [String: Double] = [:]

    /// Starts `tool` with `arguments`, and `firstRun` for this run only.
    init(_ tool: String, _ arguments: [String], firstRun: [String] = []) throws {
        self.tool = tool
        self.arguments = arguments
        log = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName(tool) + ".log")
        port = testPort()
        process = try Tools.start(tool, arguments + firstRun + ["--metrics-port", String(port)], output: log)
    }

    var isRunning: Bool { process.isRunning }

    // A scenario that fails midway leaves no process behind.
    deinit { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

    /// The last lines it wrote, for failure messages.
    var recentOutput: String { String(((try? String(contentsOf: log, encoding: .utf8)) ?? "").suffix(3000)) }

    /// Sends `signal` and waits for the process to exit; returns its status.
    @discardableResult
    func stop(_ signal: Int32) async throws -> Int32 {
        for (name, value) in await scrape() { earlierRuns[name, default: 0] += value }
        kill(process.processIdentifier, signal)
        try await waitUntil("\(tool) exits after signal \(signal)") { !process.isRunning }
        return process.terminationStatus
    }

    /// Starts it again, with `extra` arguments for this run, adding to the same log.
    func restart(extra: [String] = []) throws {
        precondition(!process.isRunning, "restart() after stop()")
        port = testPort()
        process = try Tools.start(tool, arguments + extra + ["--metrics-port", String(port)], output: log, appending: true)
        starts += 1
    }

    /// A counter (a metric without labels), summed over this tool's runs so far.
    func counter(_ name: String) async -> Double {
        (earlierRuns[name] ?? 0) + (await scrape()[name] ?? 0)
    }

    /// The current run's unlabelled metrics; empty if it does not answer.
    private func scrape() async -> [String: Double] {
        guard process.isRunning,
            let (body, _) = try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!)
        else { return [:] }
        var values: [String: Double] = [:]
        for line in String(decoding: body, as: UTF8.self).split(separator: "\n") where !line.hasPrefix("#") && !line.contains("{") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let value = Double(parts[1]) { values[String(parts[0])] = value }
        }
        return values
    }
}

/// Bank commands from this process, as fast as two writers go, on a set of accounts: deposits and
/// withdrawals (some refused, hence recorded as rejected). A command that fails (the database is down) is
/// counted and the writer carries on: what counts is what the store holds afterwards.
final class BankLoad: Sendable {
    private let stopped = Locked(false)
    private let failures = Locked(0)
    private let commands = Locked(0)
    private let lastError = Locked<String?>(nil)
    private let writers: [Task<Void, Never>]

    init(bank: Bank, accounts: [String], writers count: Int = 2) {
        let (stopped, failures, commands, lastError) = (stopped, failures, commands, lastError)
        writers = (0..<count).map { writer in
            Task {
                var n = writer
                while !stopped.value {
                    let account = accounts[n % accounts.count]
                    do {
                        if n % 4 == 3 {
                            _ = try await bank.withdraw(account, amount: Int64(n % 300 + 1), description: "load \(n)")
                        } else {
                            _ = try await bank.deposit(account, amount: Int64(n % 97 + 1), description: "load \"\(n)\" ' ;--")
                        }
                        commands.withLock { $0 += 1 }
                    } catch {
                        failures.withLock { $0 += 1 }
                        lastError.withLock { $0 = "\(error)" }
                        try? await Task.sleep(for: .milliseconds(100))
                    }
                    n += count
                    try? await Task.sleep(for: .milliseconds(2))
                }
            }
        }
    }

    var succeeded: Int { commands.value }
    var failed: Int { failures.value }

    /// Stops the writers and waits for their last commands.
    func stop() async -> (succeeded: Int, failed: Int, lastError: String?) {
        stopped.withLock { $0 = true }
        for writer in writers { await writer.value }
        return (succeeded, failed, lastError.value)
    }
}

/// What one scenario measured, for RELIABILITY.md.
struct ScenarioFigures {
    var scenario: String
    var committed = 0
    var delivered = 0
    var duplicatesInKafka = 0
    /// Records of aborted transactions the mock showed (a real broker hides them from read_committed consumers).
    var abortedRecords = 0
    var duplicatesSkipped = 0
    var recovery: [Duration] = []
    var notes = ""

    /// Appends a table row to the file named by `EO_RELIABILITY_FIGURES` (set by `scripts/test`), if any.
    func record() {
        guard let path = ProcessInfo.processInfo.environment["EO_RELIABILITY_FIGURES"], !path.isEmpty else { return }
        let recovered = recovery.isEmpty
            ? "n/a"
            : recovery.map { String(format: "%.1f s", Double($0.components.seconds) + Double($0.components.attoseconds) / 1e18) }
                .joined(separator: ", ")
        let row = "| \(scenario) | \(committed) | \(delivered) | \(committed - delivered) | \(duplicatesInKafka) | \(abortedRecords) | \(duplicatesSkipped) | \(recovered) | \(notes) |\n"
        if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
        guard let handle = FileHandle(forWritingAtPath: path) else { return }
        handle.seekToEndOfFile()
        handle.write(Data(row.utf8))
        try? handle.close()
    }
}

/// One fault scenario's world: a database of its own (a schema on the shared server, or a throwaway server
/// that the scenario may crash), a `kafka-mock-cluster` process of its own driven through its control pipe,
/// the real `outbox-relay` and `account-projector` processes, and the bank in this process to write with.
final class FaultRig {
    static let partitions = 12
    /// The bank's own topic: each rig has a cluster of its own, and the `bank` CLI writes there.
    let topic = BankEvents.topic
    /// The exactly-once relay's progress topic (the mock cluster has no CreateTopics API: made at its start).
    let progressTopic = uniqueName("relay-progress")
    let group = uniqueName("projector")
    let databaseURL: String
    let server: ThrowawayPostgres?
    let schema: TestSchema?
    let pool: PQPool
    let bank: Bank
    let cluster: MockClusterProcess
    let relay: LongRunningTool
    let projector: LongRunningTool
    private(set) var accounts: [String] = []
    var figures: ScenarioFigures

    /// Sets everything up and opens `accounts` accounts (their events flow through before this returns).
    /// - Parameters:
    ///   - crashable: a PostgreSQL server of the scenario's own, which it may crash and restart.
    ///   - projectorFirstRun: more `account-projector` options for its first run only.
    init(_ scenario: String, crashable: Bool = false, accounts count: Int = 20, projectorFirstRun: [String] = []) async throws {
        figures = ScenarioFigures(scenario: scenario)
        if crashable {
            let server = try await ThrowawayPostgres.start()
            self.server = server
            schema = nil
            databaseURL = server.url
        } else {
            let schema = try await TestSchema.create("fault")
            server = nil
            self.schema = schema
            databaseURL = schema.url
        }
        pool = PQPool(url: databaseURL, maxConnections: 4)
        try await SchemaMigrator(EventOutboxSchema.modules).migrate(pool)
        bank = Bank(store: EventStore(pool: pool), topic: topic)
        cluster = try await MockClusterProcess.start(brokers: 3, topics: [(topic, Self.partitions), (progressTopic, 1)])
        // Exactly-once: the mock checks a transactional producer's sequence numbers, so a record reported
        // delivered but never stored cannot pass unnoticed (it can with an idempotent producer on the mock).
        relay = try LongRunningTool(
            "outbox-relay",
            ["--database-url", databaseURL + "&application_name=outbox-relay", "--brokers", cluster.bootstrapServers,
             "--poll-interval", "0.2", "--standby-interval", "0.2", "--lock-key", String(Int64.random(in: 1...2_000_000_000)),
             "--delivery", "exactly-once", "--transactional-id", uniqueName("relay"), "--progress-topic", progressTopic,
             "--transaction-timeout", "20"])
        projector = try LongRunningTool(
            "account-projector",
            ["--database-url", databaseURL, "--brokers", cluster.bootstrapServers, "--group", group, "--topic", topic,
             "--kafka-property", "session.timeout.ms=6000", "--kafka-property", "heartbeat.interval.ms=500"],
            firstRun: projectorFirstRun)
        for n in 0..<count { accounts.append(try await bank.open(owner: "Owner \(n) \"quoted\" 'x'", initialDeposit: 1000)) }
        try await waitUntilProjected(timeout: .seconds(90))
    }

    /// Starts a load of bank commands on the rig's accounts.
    func startLoad() -> BankLoad { BankLoad(bank: bank, accounts: accounts) }

    func query(_ sql: String, _ binds: [PQBind] = []) async throws -> [PQRow] {
        try await pool.withConnection { try await $0.query(sql, binds) }
    }

    func count(_ sql: String) async throws -> Int { try await query(sql).first!.decode(Int.self, at: 0) }

    /// The highest version of every stream in the store.
    func storedVersions() async throws -> [String: Int64] {
        var versions: [String: Int64] = [:]
        for row in try await query("SELECT stream_id, max(stream_version) FROM events GROUP BY stream_id") {
            versions[try row.decode(String.self, at: 0)] = try row.decode(Int64.self, at: 1)
        }
        return versions
    }

    /// The highest version of every stream that `projection` has applied.
    func projectedVersions(_ projection: String = "account_balances") async throws -> [String: Int64] {
        var versions: [String: Int64] = [:]
        for row in try await query("SELECT stream_id, max(last_version) FROM \(projection)_progress GROUP BY stream_id") {
            versions[try row.decode(String.self, at: 0)] = try row.decode(Int64.self, at: 1)
        }
        return versions
    }

    /// Waits until the read model holds every event committed so far.
    func waitUntilProjected(timeout: Duration = .seconds(120)) async throws {
        let target = try await storedVersions()
        try await waitUntil("the read model holds every committed event (projector: \(projector.recentOutput.suffix(600)))", timeout: timeout) {
            let projected = (try? await projectedVersions()) ?? [:]
            return target.allSatisfy { projected[$0.key, default: 0] >= $0.value }
        }
    }

    /// The fault is over (a server is back, a process restarted): measures the time until every event
    /// committed before this moment is in the read model, with the load still running.
    func recoverAfterFault() async throws {
        let ended = ContinuousClock.now
        // The store may still be coming back: the target is read when it answers.
        var target: [String: Int64] = [:]
        try await waitUntil("the store answers after the fault", timeout: .seconds(60)) {
            guard let versions = try? await storedVersions() else { return false }
            target = versions
            return true
        }
        try await waitUntil(
            "everything committed before the fault ended reaches the read model (relay: \(relay.recentOutput.suffix(800)); projector: \(projector.recentOutput.suffix(800)))",
            timeout: .seconds(120)
        ) {
            let projected = (try? await projectedVersions()) ?? [:]
            return target.allSatisfy { projected[$0.key, default: 0] >= $0.value }
        }
        figures.recovery.append(ContinuousClock.now - ended)
    }

    /// Waits until the rig has published and projected at least `events` more events than now.
    func waitForFlow(events: Int = 150) async throws {
        let start = (try await projectedVersions()).values.reduce(0, +)
        try await waitUntil("\(events) more events flow through to the read model", timeout: .seconds(90)) {
            ((try? await projectedVersions()) ?? [:]).values.reduce(0, +) >= start + Int64(events)
        }
    }

    /// Waits until the relay has marked at least `rows` more outbox rows published than now (Kafka
    /// acknowledged them).
    func waitForPublished(rows: Int) async throws {
        let published = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"
        let start = try await count(published)
        try await waitUntil("\(rows) more rows published (relay: \(relay.recentOutput.suffix(800)))", timeout: .seconds(60)) {
            (try? await count(published)) ?? 0 >= start + rows
        }
    }

    /// Checks the end state: every committed event in Kafka exactly once for a read_committed consumer (nothing
    /// else), each stream 1, 2, 3, ... there, the read models equal to what the store says (so nothing was
    /// applied twice or missed), nothing dead-lettered; fills in the figures and records them.
    func verify(expectingDeadLetters: Int = 0) async throws {
        try await waitUntil("the relay drains the outbox (relay: \(relay.recentOutput.suffix(800)))", timeout: .seconds(120)) {
            (try? await count("SELECT count(*) FROM outbox WHERE published_at IS NULL")) == 0
        }
        let committed = try await query("SELECT event_id::text FROM events").map { try $0.decode(String.self, at: 0) }
        let view = try await CommittedView.read(
            committed.compactMap { UUID(uuidString: $0) }, brokers: cluster.bootstrapServers, topic: topic,
            progressTopic: progressTopic)
        #expect(Set(view.counts.keys) == Set(committed), "Kafka holds exactly the committed events")
        #expect(view.duplicated.isEmpty, "events a read_committed consumer sees twice: \(view.duplicated.prefix(5))")
        #expect(view.keysNotExactlyOnceInOrder.isEmpty, "streams not 1, 2, 3, ... in Kafka: \(view.keysNotExactlyOnceInOrder.prefix(5))")

        try await waitUntilProjected()
        for account in accounts {
            let stored = try await bank.account(account)
            let projected = try await query("SELECT balance, last_version FROM account_balances WHERE account_id = $1", [.text(account)])
            #expect(try projected.first?.decode(Int64.self, at: 0) == stored.state.balance, "balance of \(account)")
            #expect(try projected.first?.decode(Int64.self, at: 1) == stored.version, "version of \(account)")
        }
        #expect(try await projectedVersions("daily_volume") == storedVersions())
        // Sums over the whole store against the daily read model: an event applied twice or missed shows here.
        let expected = try await query(
            """
            SELECT coalesce(sum(CASE WHEN event_type = 'AccountOpened' THEN (payload->>'initialDeposit')::bigint
                                     WHEN event_type = 'MoneyDeposited' THEN (payload->>'amount')::bigint END), 0)::bigint,
                   count(*) FILTER (WHERE event_type = 'MoneyDeposited' OR (event_type = 'AccountOpened' AND (payload->>'initialDeposit')::bigint > 0)),
                   coalesce(sum((payload->>'amount')::bigint) FILTER (WHERE event_type = 'MoneyWithdrawn'), 0)::bigint,
                   count(*) FILTER (WHERE event_type = 'MoneyWithdrawn'),
                   count(*) FILTER (WHERE event_type = 'WithdrawalRejected')
            FROM events
            """
        ).first!
        let daily = try await query(
            """
            SELECT coalesce(sum(deposits_total), 0)::bigint, coalesce(sum(deposits_count), 0)::bigint,
                   coalesce(sum(withdrawals_total), 0)::bigint, coalesce(sum(withdrawals_count), 0)::bigint,
                   coalesce(sum(rejected_count), 0)::bigint
            FROM daily_volume
            """
        ).first!
        #expect(try (0..<5).map { try daily.decode(Int64.self, at: $0) } == (0..<5).map { try expected.decode(Int64.self, at: $0) })
        #expect(try await count("SELECT count(*) FROM outbox_dead_letters") == expectingDeadLetters)
        #expect(try await count("SELECT count(*) FROM projection_dead_letters") == 0)

        figures.committed = committed.count
        figures.delivered = Set(view.counts.keys).intersection(committed).count
        figures.duplicatesInKafka = view.counts.values.reduce(0) { $0 + $1 - 1 }
        figures.abortedRecords = view.aborted
        figures.duplicatesSkipped = Int(await projector.counter("eventoutbox_projection_duplicates_skipped_total"))
        figures.record()
    }

    /// Stops the processes (SIGTERM: both must exit 0), the cluster and the database.
    func tearDown() async throws {
        #expect(try await relay.stop(SIGTERM) == 0, "outbox-relay exits 0 on SIGTERM")
        #expect(try await projector.stop(SIGTERM) == 0, "account-projector exits 0 on SIGTERM")
        await cluster.stop()
        await pool.close()
        if let schema { try await schema.drop() }
        if let server { await server.remove() }
    }
}
