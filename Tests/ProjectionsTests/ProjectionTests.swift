import BankAccount
import BankProjections
import EventSourcing
import EventStore
import Foundation
import InMemoryLogging
import KafkaClient
import Logging
import OutboxRelay
import LibPQ
@_spi(Testing) import Projections
import PropertyBased
import TestSupport
import Synchronization
import Testing

/// A bank, its relay and its projector on a test schema and topic of their own.
struct Pipeline {
    let test: TestEventStore
    let topic: String
    let brokers: String
    let bank: Bank

    static func make() async throws -> Pipeline {
        let topic = uniqueName("bank")
        let test = try await TestEventStore.create(maxConnections: 6)
        return Pipeline(test: test, topic: topic, brokers: try TestEnvironment.kafkaBrokers(), bank: Bank(store: test.store, topic: topic))
    }

    func consumerConfiguration(group: String = uniqueName("projector")) -> ProjectionConsumerConfiguration {
        var configuration = ProjectionConsumerConfiguration(
            databaseURL: test.schema.url,
            kafka: KafkaConfiguration(
                bootstrapServers: brokers,
                properties: ["allow.auto.create.topics": "true", "session.timeout.ms": "6000", "heartbeat.interval.ms": "500", "log_level": "3"]),
            groupID: group, topics: [topic])
        configuration.commitInterval = .milliseconds(200)
        return configuration
    }

    /// Runs only the relay while `body` runs.
    func relaying<T>(format: RecordFormat = .envelope, _ body: () async throws -> T) async throws -> T {
        let relay = makeRelay(format: format)
        let relayTask = Task { try await relay.run() }
        defer { relay.stop() }
        let value = try await body()
        relay.stop()
        try await relayTask.value
        return value
    }

    func makeRelay(format: RecordFormat = .envelope) -> OutboxRelay {
        var relayConfiguration = OutboxRelayConfiguration(databaseURL: test.schema.url, kafka: KafkaConfiguration(bootstrapServers: brokers))
        relayConfiguration.format = format
        relayConfiguration.leaderLockKey = Int64.random(in: 1...Int64.max)
        relayConfiguration.pollInterval = .milliseconds(200)
        return OutboxRelay(configuration: relayConfiguration)
    }

    /// Runs relay and projector while `body` runs, then stops both.
    func running<T>(
        logger: Logger = Logger(label: "eventoutbox.projections"), _ body: (ProjectionConsumer) async throws -> T
    ) async throws -> T {
        let relay = makeRelay()
        let consumer = ProjectionConsumer(
            configuration: consumerConfiguration(),
            applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry),
            logger: logger)
        try await consumer.prepare()  // tables exist before the body looks at them
        let relayTask = Task { try await relay.run() }
        let consumerTask = Task { try await consumer.run() }
        defer {
            relay.stop()
            consumer.stop()
        }
        let value = try await body(consumer)
        relay.stop()
        consumer.stop()
        try await relayTask.value
        try await consumerTask.value
        return value
    }

    func balances() async throws -> [String: Int64] {
        try await test.pool.withConnection { connection in
            Dictionary(uniqueKeysWithValues: try await connection.query("SELECT account_id, balance FROM account_balances").map {
                (try $0.decode(String.self, "account_id"), try $0.decode(Int64.self, "balance"))
            })
        }
    }

    /// Every row of a table, as text, sorted: for comparing tables row by row.
    func rows(_ table: String, except: [String] = ["updated_at"]) async throws -> [String] {
        try await test.pool.withConnection { connection in
            let columns = try await connection.query(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                [.text(table)]
            ).map { try $0.decode(String.self, "column_name") }.filter { !except.contains($0) }
            return try await connection.query("SELECT concat_ws('|', \(columns.joined(separator: ", "))) AS line FROM \(table) ORDER BY 1")
                .map { try $0.decode(String.self, "line") }
        }
    }

    func expectedBalances(_ ids: [String]) async throws -> [String: Int64] {
        var result: [String: Int64] = [:]
        for id in ids { result[id] = try await bank.account(id).state.balance }
        return result
    }
}

@Suite("projections from Kafka (real PostgreSQL + kafka-mock-cluster + the real relay)")
struct ProjectionTests {
    @Test("end to end: bank commands → relay → projector; account_balances matches the bank for every account")
    func endToEnd() async throws {
        let pipeline = try await Pipeline.make()
        var ids: [String] = []
        try await pipeline.running { consumer in
            for n in 0..<8 {
                let id = try await pipeline.bank.open(owner: "Owner \(n) 'quoted' 🙂", initialDeposit: Int64(1000 * n))
                ids.append(id)
                _ = try await pipeline.bank.deposit(id, amount: 250, description: "pay")
                _ = try await pipeline.bank.withdraw(id, amount: 600)
                _ = try await pipeline.bank.withdraw(id, amount: 100_000)  // rejected
            }
            let expected = try await pipeline.expectedBalances(ids)
            try await waitUntil("account_balances matches the bank") { try await pipeline.balances() == expected }
            try await waitUntil("daily volume complete") {
                try await pipeline.test.projected("daily_volume") == 32
            }
            _ = consumer
        }
        let volume = try await pipeline.rows("daily_volume", except: ["day"])
        // deposits: 7 initial (n > 0) + 8 x 250; withdrawals: 7 of 600 (n = 0 is rejected); rejected: 8 + 1.
        #expect(volume == ["\(28_000 + 2000)|15|\(7 * 600)|7|9"])
        try await pipeline.test.drop()
    }

    @Test("the same event delivered twice changes nothing and is counted as a duplicate")
    func duplicateDelivery() async throws {
        let pipeline = try await Pipeline.make()
        let id = try await pipeline.bank.open(owner: "Dup", initialDeposit: 100)
        _ = try await pipeline.bank.deposit(id, amount: 50)
        try await pipeline.running { consumer in
            try await waitUntil("applied") { try await pipeline.balances()[id] == 150 }
            // Publish the deposit again, as a relay would after a crash.
            let envelope = try await pipeline.test.pool.withConnection {
                try await $0.query("SELECT envelope FROM outbox WHERE stream_version = 2").first!.decode(String.self, at: 0)
            }
            let producer = try KafkaProducer(configuration: .init(bootstrapServers: pipeline.brokers))
            let report = try await producer.send(.init(topic: pipeline.topic, key: id, value: envelope))
            #expect(report.error == nil)
            await producer.close()
            try await waitUntil("the duplicate is seen") { consumer.duplicateCount >= 2 }  // one per projection
            #expect(try await pipeline.balances()[id] == 150)
        }
        #expect(try await pipeline.rows("daily_volume", except: ["day"]) == ["150|2|0|0|0"])
        try await pipeline.test.drop()
    }

    @Test("at batch speed, every record published twice: each event's effect counted once, every copy counted as a duplicate")
    func exactlyOnceAtSpeed() async throws {
        let pipeline = try await Pipeline.make()
        // Tables first, so that the projector applies everything from Kafka (no back-fill from the store).
        try await pipeline.test.pool.withConnection { connection in
            for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
        }
        var ids: [String] = []
        for n in 0..<20 { ids.append(try await pipeline.bank.open(owner: "Fast \(n)", initialDeposit: 100)) }
        let accounts = ids
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<4 {
                group.addTask {
                    for n in stride(from: worker, to: 1200, by: 4) {
                        if n % 5 == 4 {
                            _ = try await pipeline.bank.withdraw(accounts[n % accounts.count], amount: 3)
                        } else {
                            _ = try await pipeline.bank.deposit(accounts[n % accounts.count], amount: Int64(n % 7 + 1))
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        let total = try await pipeline.test.count("SELECT count(*) FROM events")
        let expected = try await pipeline.expectedBalances(accounts)
        try await pipeline.running { consumer in
            try await waitUntil("every event applied to both projections", timeout: .seconds(60)) { consumer.appliedCount == 2 * total }
            // Everything again, as a relay that lost its progress would publish it: same keys, so same partitions.
            let envelopes = try await pipeline.test.pool.withConnection {
                try await $0.query("SELECT message_key, envelope FROM outbox ORDER BY id").map {
                    (try $0.decode(String.self, "message_key"), try $0.decode(String.self, "envelope"))
                }
            }
            let producer = try KafkaProducer(configuration: .init(bootstrapServers: pipeline.brokers))
            let promises = try envelopes.map {
                try producer.enqueue(KafkaOutgoingMessage(topic: pipeline.topic, key: Array($0.0.utf8), value: Array($0.1.utf8)))
            }
            for promise in promises { #expect(await promise.report().error == nil) }
            await producer.close()
            try await waitUntil("every copy skipped as a duplicate", timeout: .seconds(60)) { consumer.duplicateCount == 2 * total }
            #expect(consumer.appliedCount == 2 * total)
            #expect(try await pipeline.balances() == expected)
        }
        #expect(try await pipeline.test.projected("account_balances") == total)
        #expect(try await pipeline.test.count("SELECT count(*) FROM account_balances_progress") == accounts.count)
        #expect(try await pipeline.test.count("SELECT sum(deposits_count + withdrawals_count + rejected_count)::bigint FROM daily_volume") == total)
        try await pipeline.test.drop()
    }

    @Test("a poison message (malformed JSON, unknown type) is dead-lettered with its bytes; later events are applied")
    func poisonMessages() async throws {
        let pipeline = try await Pipeline.make()
        let first = try await pipeline.bank.open(owner: "Before", initialDeposit: 10)
        try await pipeline.running { consumer in
            try await waitUntil("first account") { try await pipeline.balances()[first] == 10 }
            let producer = try KafkaProducer(configuration: .init(bootstrapServers: pipeline.brokers))
            _ = try await producer.send(.init(topic: pipeline.topic, key: first, value: "{not json"))
            let unknown = #"{"eventId":"6f9619ff-8b86-d011-b42d-00cf4fc964ff","streamId":"\#(first)","streamVersion":2,"eventType":"InterestAccrued","schemaVersion":1,"occurredAt":"2026-11-25T00:00:00.000000Z","payload":{"rate":3},"metadata":{}}"#
            _ = try await producer.send(.init(topic: pipeline.topic, key: first, value: unknown))
            await producer.close()
            // Same key, so same partition: Kafka delivers it after the two poison messages.
            _ = try await pipeline.bank.deposit(first, amount: 5)
            try await waitUntil("the event after the poison") { try await pipeline.balances()[first] == 15 }
            #expect(consumer.deadLetterCount == 2)
        }
        let letters = try await pipeline.test.pool.withConnection {
            try await $0.query("SELECT reason, value FROM projection_dead_letters ORDER BY id").map {
                (try $0.decode(String.self, "reason"), try $0.decode([UInt8].self, "value"))
            }
        }
        #expect(letters.count == 2)
        #expect(letters[0].1 == Array("{not json".utf8))
        #expect(letters[0].0.contains("not an EventOutbox envelope"))
        #expect(letters[1].0.contains("InterestAccrued"))
        #expect(letters[1].0.contains("not registered"))
        try await pipeline.test.drop()
    }

    @Test("accounts opened with Int64.max: daily_volume's numeric sums hold every deposit of the day; nothing is dead-lettered")
    func readModelOverflow() async throws {
        let pipeline = try await Pipeline.make()
        // Each balance fits in Int64; their sum does not. Before, daily_volume summed into bigint: the second
        // open and every later deposit of the day were dead-lettered whole, so account_balances missed them too.
        let (rich, richer, small) = try await pipeline.running { consumer in
            let rich = try await pipeline.bank.open(owner: "Rich", initialDeposit: Int64.max)
            let richer = try await pipeline.bank.open(owner: "Richer", initialDeposit: Int64.max)
            let small = try await pipeline.bank.open(owner: "Small", initialDeposit: 0)
            _ = try await pipeline.bank.deposit(small, amount: 7)
            _ = try await pipeline.bank.withdraw(rich, amount: 5)
            try await waitUntil("every event applied to both read models") {
                let volume = try await pipeline.test.projected("daily_volume")
                let balances = try await pipeline.test.projected("account_balances")
                return volume == 5 && balances == 5
            }
            #expect(consumer.deadLetterCount == 0)
            return (rich, richer, small)
        }
        #expect(try await pipeline.balances() == [rich: Int64.max - 5, richer: Int64.max, small: 7])
        let total = try await pipeline.test.pool.withConnection {
            try await $0.query("SELECT sum(deposits_total)::text AS total, sum(deposits_count)::bigint AS n FROM daily_volume").first!
        }
        #expect(try total.decode(String.self, "total") == "\(2 * Decimal(Int64.max) + 7)")
        #expect(try total.decode(Int64.self, "n") == 3)
        #expect(try await pipeline.test.count("SELECT count(*) FROM projection_dead_letters") == 0)
        try await pipeline.test.drop()
    }

    @Test("a daily_volume made with bigint totals (the first shape) is upgraded to numeric on start, its rows kept")
    func dailyVolumeUpgrade() async throws {
        let pipeline = try await Pipeline.make()
        try await pipeline.test.pool.withConnection { connection in
            try await connection.executeScript(
                """
                CREATE TABLE daily_volume (day date PRIMARY KEY, deposits_total bigint NOT NULL DEFAULT 0,
                    deposits_count int NOT NULL DEFAULT 0, withdrawals_total bigint NOT NULL DEFAULT 0,
                    withdrawals_count int NOT NULL DEFAULT 0, rejected_count int NOT NULL DEFAULT 0);
                CREATE TABLE daily_volume_progress (stream_id text NOT NULL, source text NOT NULL, last_version bigint NOT NULL,
                    PRIMARY KEY (stream_id, source));
                INSERT INTO daily_volume VALUES ('2026-01-01', 9223372036854775807, 1, 0, 0, 0);
                """)
        }
        let consumer = ProjectionConsumer(
            configuration: pipeline.consumerConfiguration(), applier: ProjectionApplier(projections: [AccountProjections.dailyVolume], registry: BankEvents.registry))
        for _ in 0..<2 { try await consumer.prepare() }  // twice: the upgrade is idempotent
        let types = try await pipeline.test.pool.withConnection { connection in
            try await connection.query(
                "SELECT column_name || ' ' || data_type AS c FROM information_schema.columns WHERE table_schema = current_schema() "
                    + "AND table_name = 'daily_volume' AND column_name <> 'day' ORDER BY ordinal_position"
            ).map { try $0.decode(String.self, "c") }
        }
        #expect(types == ["deposits_total numeric", "deposits_count bigint", "withdrawals_total numeric", "withdrawals_count bigint", "rejected_count bigint"])
        #expect(try await pipeline.rows("daily_volume") == ["2026-01-01|9223372036854775807|1|0|0|0"])
        try await pipeline.test.drop()
    }

    @Test("an event one projection refuses for good is dead-lettered for that projection only; the consumer's other projections apply it")
    func deadLetterPerProjection() async throws {
        let refusing = Projection.refusing(13, name: "picky_deposits")
        let pipeline = try await Pipeline.make()
        var configuration = pipeline.consumerConfiguration()
        configuration.maxHandlerAttempts = 1
        let consumer = ProjectionConsumer(
            configuration: configuration,
            applier: ProjectionApplier(projections: AccountProjections.all + [refusing], registry: BankEvents.registry))
        try await consumer.prepare()
        let account = try await pipeline.bank.open(owner: "P", initialDeposit: 0)
        for amount: Int64 in [13, 5] { _ = try await pipeline.bank.deposit(account, amount: amount) }
        try await pipeline.relaying {
            let task = Task { try await consumer.run() }
            try await waitUntil("the deposit after the refused one reaches every projection") {
                let picked = try await pipeline.test.count("SELECT count(*) FROM picky_deposits WHERE amount = 5")
                let balance = try await pipeline.balances()[account]
                return picked == 1 && balance == 18
            }
            consumer.stop()
            try await task.value
        }
        let letters = try await pipeline.test.pool.withConnection { try await ProjectionDeadLetters.list(on: $0) }
        #expect(letters.count == 1)
        #expect(letters.first?.projection == "picky_deposits")
        #expect(letters.first?.reason.contains("refuses 13") == true, "\(letters)")
        #expect(try await pipeline.rows("daily_volume", except: ["day"]) == ["18|2|0|0|0"], "daily_volume has the refused deposit too")
        // The retry goes to the projection that refused it, not again to the others.
        let fixed = ProjectionApplier(projections: AccountProjections.all + [.refusing(nil, name: "picky_deposits")], registry: BankEvents.registry)
        let outcome = try await pipeline.test.pool.withConnection { try await ProjectionDeadLetters.retry(letters[0].id, with: fixed, on: $0) }
        #expect(outcome?.applied == 1)
        #expect(try await pipeline.test.count("SELECT sum(amount)::bigint FROM picky_deposits") == 18)
        #expect(try await pipeline.balances()[account] == 18)
        try await pipeline.test.drop()
    }

    @Test("a back-fill that meets events it cannot apply (refused, unknown type) dead-letters them and goes on; the projector starts")
    func backFillDeadLetters() async throws {
        let pipeline = try await Pipeline.make()
        let account = try await pipeline.bank.open(owner: "B", initialDeposit: 0)
        for amount: Int64 in [13, 5, 13, 2] { _ = try await pipeline.bank.deposit(account, amount: amount) }
        // An event of a type this program does not know (written by a newer service, say), in a stream of its own.
        try await pipeline.test.pool.withConnection { connection in
            try await connection.execute(
                "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, occurred_at) "
                    + "VALUES (gen_random_uuid(), 'alien-1', 1, 'InterestAccrued', 1, '{\"amount\": 1}', now())")
        }
        var configuration = pipeline.consumerConfiguration()
        configuration.maxHandlerAttempts = 1
        let consumer = ProjectionConsumer(
            configuration: configuration,
            applier: ProjectionApplier(projections: [AccountProjections.balances, .refusing(13, name: "picky_deposits")], registry: BankEvents.registry))
        try await consumer.prepare()
        #expect(try await pipeline.test.count("SELECT sum(amount)::bigint FROM picky_deposits") == 7)
        #expect(try await pipeline.balances()[account] == 33)
        let letters = try await pipeline.test.pool.withConnection { try await ProjectionDeadLetters.list(on: $0) }
        #expect(letters.compactMap(\.projection).sorted() == ["account_balances", "picky_deposits", "picky_deposits", "picky_deposits"])
        #expect(Set(letters.map(\.consumer)) == [ProjectionRebuilder.deadLetterConsumer])
        #expect(letters.filter { $0.reason.contains("InterestAccrued") }.count == 2, "the unknown type, once per projection: \(letters.map(\.reason))")
        #expect(letters.filter { $0.reason.contains("refuses 13") }.count == 2)
        #expect(letters.allSatisfy { $0.partition == -1 && $0.origin.hasPrefix("event store @") })
        // A rebuild meets them again: the older letters give way to the new ones, not pile up.
        let rebuilder = ProjectionRebuilder(pool: pipeline.test.pool, registry: BankEvents.registry)
        try await rebuilder.rebuild(.refusing(13, name: "picky_deposits"))
        let after = try await pipeline.test.pool.withConnection { try await ProjectionDeadLetters.list(on: $0) }
        #expect(after.count == 4)
        #expect(Set(after.map(\.id)).intersection(letters.filter { $0.projection == "picky_deposits" }.map(\.id)).isEmpty)
        // Fixed, a retry applies one to its projection.
        let retried = try #require(after.first { $0.projection == "picky_deposits" && $0.reason.contains("refuses 13") })
        let fixed = ProjectionApplier(projections: [.refusing(nil, name: "picky_deposits")], registry: BankEvents.registry)
        #expect(try await pipeline.test.pool.withConnection { try await ProjectionDeadLetters.retry(retried.id, with: fixed, on: $0) }?.applied == 1)
        #expect(try await pipeline.test.count("SELECT sum(amount)::bigint FROM picky_deposits") == 20)
        try await pipeline.test.drop()
    }

    @Test("a handler that keeps failing (its own error, SQL class 42) is dead-lettered after maxHandlerAttempts; the partition goes on")
    func failingHandlers() async throws {
        struct Refused: Error, CustomStringConvertible { var description: String { "the handler refuses 13" } }
        let fragile = Projection(
            name: "fragile_deposits",
            tables: [.init(name: "fragile_deposits", createSQL: "CREATE TABLE {table} (event_id uuid PRIMARY KEY, amount bigint NOT NULL)")]
        ) { event, recorded, context in
            guard let deposit = event as? MoneyDeposited else { return }
            if deposit.amount == 13 { throw Refused() }
            if deposit.amount == 42 { try await context.connection.execute("SELECT * FROM no_such_table_anywhere") }
            try await context.connection.execute(
                "INSERT INTO \(context.table("fragile_deposits")) (event_id, amount) VALUES ($1, $2)",
                [.uuid(recorded.eventID), .int64(deposit.amount)])
        }
        let pipeline = try await Pipeline.make()
        var configuration = pipeline.consumerConfiguration()
        configuration.maxHandlerAttempts = 2
        configuration.maxBackoff = .milliseconds(200)
        let consumer = ProjectionConsumer(
            configuration: configuration, applier: ProjectionApplier(projections: [fragile], registry: BankEvents.registry))
        try await consumer.prepare()  // the tables, before any event (nothing to back-fill)
        let account = try await pipeline.bank.open(owner: "F", initialDeposit: 0)
        for amount: Int64 in [13, 42, 5] { _ = try await pipeline.bank.deposit(account, amount: amount) }
        try await pipeline.relaying {
            let task = Task { try await consumer.run() }
            try await waitUntil("the deposit after the failing ones is applied", timeout: .seconds(60)) {
                try await pipeline.test.count("SELECT count(*) FROM fragile_deposits WHERE amount = 5") == 1
            }
            consumer.stop()
            try await task.value
        }
        let reasons = try await pipeline.test.pool.withConnection {
            try await $0.query("SELECT reason FROM projection_dead_letters ORDER BY id").map { try $0.decode(String.self, "reason") }
        }
        #expect(reasons.count == 2, "\(reasons)")
        #expect(reasons.first?.contains("handler failed 2 times: the handler refuses 13") == true)
        #expect(reasons.last?.contains("42P01") == true)
        #expect(try await pipeline.test.count("SELECT count(*) FROM fragile_deposits") == 1)
        try await pipeline.test.drop()
    }

    @Test("a batch retried after transient failures (SQLSTATE 40001) is never dead-lettered, and stop() ends the retry's back-off at once")
    func stopEndsARetryBackoff() async throws {
        final class Failures: Sendable { let count = Atomic<Int>(0) }
        let failures = Failures()
        let busy = Projection(
            name: "busy_deposits",
            tables: [.init(name: "busy_deposits", createSQL: "CREATE TABLE {table} (event_id uuid PRIMARY KEY)")]
        ) { event, _, context in
            guard event is MoneyDeposited else { return }
            failures.count.add(1, ordering: .relaxed)
            try await context.connection.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'always busy' USING ERRCODE = 'serialization_failure'; END $$")
        }
        let pipeline = try await Pipeline.make()
        var configuration = pipeline.consumerConfiguration()
        configuration.maxHandlerAttempts = 2  // transient failures are not attempts: never reached
        configuration.maxBackoff = .seconds(3600)
        let consumer = ProjectionConsumer(
            configuration: configuration, applier: ProjectionApplier(projections: [busy], registry: BankEvents.registry))
        try await consumer.prepare()
        let account = try await pipeline.bank.open(owner: "B", initialDeposit: 0)
        _ = try await pipeline.bank.deposit(account, amount: 5)
        try await pipeline.relaying {
            let task = Task { try await consumer.run() }
            // The back-off doubles from 100 ms: the 10th failure is followed by a 51 s wait.
            try await waitUntil("the deposit failed 10 times", timeout: .seconds(180)) { failures.count.load(ordering: .relaxed) >= 10 }
            consumer.stop()
            let stopped = await withTaskGroup(of: Bool.self) { group in
                group.addTask { _ = try? await task.value; return true }
                group.addTask { try? await Task.sleep(for: .seconds(30)); return false }
                let first = await group.next()!
                group.cancelAll()
                return first
            }
            #expect(stopped, "run() did not return within 30 s of stop(): the back-off was not interrupted")
            try await task.value
        }
        #expect(try await pipeline.test.count("SELECT count(*) FROM projection_dead_letters") == 0)
        #expect(try await pipeline.test.count("SELECT count(*) FROM busy_deposits") == 0)
        try await pipeline.test.drop()
    }

    @Test("dead letters: listed with their raw bytes; a retry after the fix applies once although later events were applied")
    func deadLetterRetry() async throws {
        struct Refused: Error, CustomStringConvertible { var description: String { "refusing 13 until fixed" } }
        let fixed = Locked(false)
        let fragile = Projection(
            name: "fixable_deposits",
            tables: [.init(name: "fixable_deposits", createSQL: "CREATE TABLE {table} (event_id uuid PRIMARY KEY, amount bigint NOT NULL)")]
        ) { event, recorded, context in
            guard let deposit = event as? MoneyDeposited else { return }
            if deposit.amount == 13, !fixed.value { throw Refused() }
            try await context.connection.execute(
                "INSERT INTO \(context.table("fixable_deposits")) (event_id, amount) VALUES ($1, $2)",
                [.uuid(recorded.eventID), .int64(deposit.amount)])
        }
        let pipeline = try await Pipeline.make()
        var configuration = pipeline.consumerConfiguration()
        configuration.maxHandlerAttempts = 1
        let applier = ProjectionApplier(projections: [fragile], registry: BankEvents.registry)
        let consumer = ProjectionConsumer(configuration: configuration, applier: applier)
        try await consumer.prepare()
        let account = try await pipeline.bank.open(owner: "Fix", initialDeposit: 0)
        for amount: Int64 in [13, 5] { _ = try await pipeline.bank.deposit(account, amount: amount) }
        try await pipeline.relaying {
            let task = Task { try await consumer.run() }
            try await waitUntil("the deposit after the refused one is applied") {
                try await pipeline.test.count("SELECT count(*) FROM fixable_deposits WHERE amount = 5") == 1
            }
            consumer.stop()
            try await task.value
        }
        let connection = try await PQConnection.connect(to: pipeline.test.schema.url)
        let letters = try await ProjectionDeadLetters.list(consumer: configuration.groupID, on: connection)
        #expect(letters.count == 1)
        let letter = try #require(letters.first)
        let envelope = try await connection.query("SELECT envelope FROM outbox WHERE stream_version = 2").first!.decode(String.self, at: 0)
        #expect(letter.value == Array(envelope.utf8))
        #expect(letter.key == Array(account.utf8))
        #expect(letter.reason.contains("refusing 13 until fixed"))
        #expect(try await ProjectionDeadLetters.find(letter.id, on: connection) == letter)

        // Not fixed yet: the retry fails and changes nothing.
        await #expect(throws: (any Error).self) { try await ProjectionDeadLetters.retry(letter.id, with: applier, on: connection) }
        #expect(try await ProjectionDeadLetters.list(on: connection).count == 1)
        fixed.withLock { $0 = true }
        let outcome = try await ProjectionDeadLetters.retry(letter.id, with: applier, on: connection)
        #expect(outcome == .init(applied: 1, duplicates: 0))
        #expect(try await pipeline.test.count("SELECT sum(amount)::bigint FROM fixable_deposits") == 18)
        #expect(try await ProjectionDeadLetters.list(on: connection).isEmpty)
        #expect(try await ProjectionDeadLetters.retry(letter.id, with: applier, on: connection) == nil, "retried once only")
        #expect(try await pipeline.test.count("SELECT last_version FROM fixable_deposits_progress") == 3, "progress never goes back")
        await connection.close()
        try await pipeline.test.drop()
    }

    @Test("upgrading from the event-id table (<projection>_applied): the first start back-fills and drops it")
    func upgradeFromAppliedTable() async throws {
        let pipeline = try await Pipeline.make()
        let account = try await pipeline.bank.open(owner: "Old", initialDeposit: 40)
        _ = try await pipeline.bank.deposit(account, amount: 2)
        // The layout of earlier versions: live tables with a stale balance, and the applied event ids.
        try await pipeline.test.pool.withConnection { connection in
            try await AccountProjections.balances.createEmptyTables(on: connection)
            try await connection.executeScript(
                "DROP TABLE account_balances_progress; "
                    + "CREATE TABLE account_balances_applied (event_id uuid PRIMARY KEY, position bigint NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()); "
                    + "INSERT INTO account_balances (account_id, owner, balance, last_version, updated_at) VALUES ('\(account)', 'Old', 40, 1, now())")
        }
        let consumer = ProjectionConsumer(
            configuration: pipeline.consumerConfiguration(),
            applier: ProjectionApplier(projections: [AccountProjections.balances], registry: BankEvents.registry))
        try await consumer.prepare()
        #expect(try await pipeline.balances() == [account: 42])
        #expect(try await pipeline.test.count("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'account_balances_applied'") == 0)
        #expect(try await pipeline.test.projected("account_balances") == 2)
        try await pipeline.test.drop()
    }

    @Test("projectors starting together take turns preparing: concurrent start-ups all succeed, one back-fill")
    func concurrentPrepare() async throws {
        let pipeline = try await Pipeline.make()
        let account = try await pipeline.bank.open(owner: "Together", initialDeposit: 3)
        let consumers = (0..<4).map { _ in
            ProjectionConsumer(
                configuration: pipeline.consumerConfiguration(),
                applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry))
        }
        // Without the lock, concurrent CREATE TABLE IF NOT EXISTS fails in the catalog (23505 on pg_type).
        try await withThrowingTaskGroup(of: Void.self) { group in
            for consumer in consumers { group.addTask { try await consumer.prepare() } }
            try await group.waitForAll()
        }
        #expect(try await pipeline.balances() == [account: 3])
        #expect(try await pipeline.test.projected("account_balances") == 1)
        try await pipeline.test.drop()
    }

    @Test("a fatal Kafka error ends run() with that error (after committing what was applied), not a normal return")
    func fatalKafkaError() async throws {
        let pipeline = try await Pipeline.make()
        let consumer = ProjectionConsumer(
            configuration: pipeline.consumerConfiguration(),
            applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry))
        let finished = Locked(false)
        try await consumer.prepare()  // tables exist before the wait below looks at them (nothing to back-fill yet)
        let account = try await pipeline.bank.open(owner: "Fatal", initialDeposit: 7)
        let running = Task { try await consumer.run() }
        let outcome = Task {
            defer { finished.withLock { $0 = true } }
            return await running.result
        }
        try await pipeline.relaying {
            try await waitUntil("the consumer applies the first event") { try await pipeline.balances()[account] == 7 }
        }
        consumer.raiseFatalKafkaErrorForTesting("test: fenced")
        try await waitUntil("run() ends on the fatal error") { finished.value }
        guard case .failure(let error) = await outcome.value else {
            Issue.record("run() returned normally after a fatal Kafka error")
            return
        }
        #expect((error as? KafkaError)?.isFatal == true, "\(error)")
        #expect("\(error)".contains("test: fenced"))
        try await pipeline.test.drop()
    }

    @Test("a dead-letter log line carries the record's traceparent")
    func traceparentInLogs() async throws {
        let pipeline = try await Pipeline.make()
        let handler = InMemoryLogHandler()
        let logger = Logger(label: "test", factory: { _ in handler })
        let id = try await pipeline.bank.open(owner: "Trace", initialDeposit: 1)
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        try await pipeline.running(logger: logger) { _ in
            try await waitUntil("opened") { try await pipeline.balances()[id] == 1 }
            let producer = try KafkaProducer(configuration: .init(bootstrapServers: pipeline.brokers))
            _ = try await producer.send(
                .init(topic: pipeline.topic, key: id, value: "garbage", headers: [KafkaHeader(name: "traceparent", value: traceparent)]))
            await producer.close()
            try await waitUntil("the dead-letter log line") {
                handler.entries.contains { $0.level == .error && $0.metadata["traceparent"] == "\(traceparent)" }
            }
        }
        let line = try #require(handler.entries.first { $0.level == .error })
        #expect("\(line.message)".contains("projection_dead_letters"))
        #expect(line.metadata["reason"].map { "\($0)".contains("not an EventOutbox envelope") } == true)
        try await pipeline.test.drop()
    }

    @Test("for random histories, a rebuilt projection equals the incrementally built one, row for row")
    func rebuildEqualsIncremental() async throws {
        let pipeline = try await Pipeline.make()
        let histories = Gen.int(in: -400...400).array(of: 1...12).array(of: 1...4)
        try await pipeline.running { consumer in
            await propertyCheck(count: 6, input: histories) { accounts in
                do {
                    var events = 0
                    for amounts in accounts {
                        let id = try await pipeline.bank.open(owner: "R", initialDeposit: 200)
                        events += 1
                        for amount in amounts where amount != 0 {
                            if amount > 0 {
                                _ = try await pipeline.bank.deposit(id, amount: Int64(amount))
                            } else {
                                _ = try await pipeline.bank.withdraw(id, amount: Int64(-amount))
                            }
                            events += 1
                        }
                    }
                    let total = try await pipeline.test.count("SELECT count(*) FROM events")
                    try await waitUntil("the projector catches up") {
                        let balances = try await pipeline.test.projected("account_balances")
                        let volume = try await pipeline.test.projected("daily_volume")
                        return balances == total && volume == total
                    }
                    let incremental = (try await pipeline.rows("account_balances"), try await pipeline.rows("daily_volume"))
                    let rebuilder = ProjectionRebuilder(pool: pipeline.test.pool, registry: BankEvents.registry)
                    for projection in AccountProjections.all { try await rebuilder.rebuild(projection) }
                    #expect(try await pipeline.rows("account_balances") == incremental.0)
                    #expect(try await pipeline.rows("daily_volume") == incremental.1)
                    _ = consumer
                } catch {
                    Issue.record("\(error)")
                }
            }
        }
        try await pipeline.test.drop()
    }

    @Test("rebuild while events keep arriving: the live consumer goes on without double counting")
    func rebuildUnderLoad() async throws {
        let pipeline = try await Pipeline.make()
        var ids: [String] = []
        for n in 0..<6 { ids.append(try await pipeline.bank.open(owner: "L\(n)", initialDeposit: 1000)) }
        let accounts = ids
        try await pipeline.running { consumer in
            let writer = Task {
                for round in 0..<60 {
                    let id = accounts[round % accounts.count]
                    if round % 3 == 2 {
                        _ = try await pipeline.bank.withdraw(id, amount: 70)
                    } else {
                        _ = try await pipeline.bank.deposit(id, amount: 10 + Int64(round))
                    }
                }
            }
            try await waitUntil("some events applied") { consumer.appliedCount > 20 }
            let rebuilder = ProjectionRebuilder(pool: pipeline.test.pool, registry: BankEvents.registry, batchSize: 7)
            for projection in AccountProjections.all { try await rebuilder.rebuild(projection) }
            try await writer.value
            let expected = try await pipeline.expectedBalances(accounts)
            try await waitUntil("balances match the bank after the rebuild") { try await pipeline.balances() == expected }
            let total = try await pipeline.test.count("SELECT count(*) FROM events")
            try await waitUntil("every event applied once to daily_volume") {
                try await pipeline.test.projected("daily_volume") == total
            }
        }
        // daily_volume (built live across a rebuild) equals a fresh rebuild of it.
        let live = try await pipeline.rows("daily_volume")
        try await ProjectionRebuilder(pool: pipeline.test.pool, registry: BankEvents.registry).rebuild(AccountProjections.dailyVolume)
        #expect(try await pipeline.rows("daily_volume") == live)
        try await pipeline.test.drop()
    }
}

extension Projection {
    /// A projection of deposits that refuses (throws for) deposits of `amount`; `nil`: takes them all.
    static func refusing(_ amount: Int64?, name: String) -> Projection {
        struct Refused: Error, CustomStringConvertible {
            var amount: Int64
            var description: String { "the handler refuses \(amount)" }
        }
        return Projection(
            name: name,
            tables: [.init(name: name, createSQL: "CREATE TABLE {table} (event_id uuid PRIMARY KEY, amount bigint NOT NULL)")]
        ) { event, recorded, context in
            guard let deposit = event as? MoneyDeposited else { return }
            if deposit.amount == amount { throw Refused(amount: deposit.amount) }
            try await context.connection.execute(
                "INSERT INTO \(context.table(name)) (event_id, amount) VALUES ($1, $2)", [.uuid(recorded.eventID), .int64(deposit.amount)])
        }
    }
}
