import BankAccount
import BankProjections
import EventStore
import Foundation
import KafkaClient
import LibPQ
import Projections
import TestSupport
import Testing

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

@Suite("account-projector process (real PostgreSQL + kafka-mock-cluster + the real relay)")
struct ProjectorProcessTests {
    @Test("SIGTERM: the projector commits the offsets of everything it applied, then exits 0 (checked in the group afterwards)")
    func sigtermCommitsOffsets() async throws {
        let pipeline = try await Pipeline.make()
        let group = uniqueName("projector")
        let env = ["EVENTOUTBOX_DATABASE_URL": pipeline.test.schema.url, "KAFKA_BROKERS": pipeline.brokers]
        try await pipeline.test.pool.withConnection { connection in
            for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
        }
        var ids: [String] = []
        for n in 0..<4 {
            let id = try await pipeline.bank.open(owner: "T\(n)", initialDeposit: 100)
            _ = try await pipeline.bank.deposit(id, amount: 5)
            ids.append(id)
        }
        let expected = try await pipeline.expectedBalances(ids)
        // Offsets are committed only at shutdown: a commit interval of an hour.
        let log = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("projector") + ".log")
        let projector = try Tools.start(
            "account-projector",
            ["--group", group, "--topic", pipeline.topic, "--kafka-property", "allow.auto.create.topics=true",
             "--kafka-property", "session.timeout.ms=6000", "--commit-interval", "3600"],
            environment: env, output: log)
        try await pipeline.relaying {
            try await waitUntil("the projector applied everything") { try await pipeline.balances() == expected }
        }
        kill(projector.processIdentifier, SIGTERM)
        try await waitUntil("the projector exits") { !projector.isRunning }
        #expect(projector.terminationStatus == 0)

        // Where the relay put each event, from the outbox: the committed offset of a partition is its last + 1.
        let stored = try await pipeline.test.pool.withConnection { connection in
            try await connection.query("SELECT kafka_partition AS p, max(kafka_offset) + 1 AS next FROM outbox GROUP BY kafka_partition")
                .map { (try $0.decode(Int32.self, "p"), try $0.decode(Int64.self, "next")) }
        }
        let reader = try KafkaConsumer(configuration: KafkaConfiguration(bootstrapServers: pipeline.brokers), groupID: group)
        let committed = try await reader.committed(stored.map { KafkaTopicPartition(topic: pipeline.topic, partition: $0.0) })
        await reader.close()
        #expect(
            Dictionary(uniqueKeysWithValues: committed.map { ($0.partition, $0.offset) })
                == Dictionary(uniqueKeysWithValues: stored.map { ($0.0, $0.1) }))
        try await pipeline.test.drop()
    }

    @Test("killed after its database commits but before its offset commits: on restart nothing is applied twice")
    func killBeforeOffsetCommit() async throws {
        let pipeline = try await Pipeline.make()
        var ids: [String] = []
        for n in 0..<5 {
            let id = try await pipeline.bank.open(owner: "K\(n)", initialDeposit: 500)
            _ = try await pipeline.bank.deposit(id, amount: 25)
            _ = try await pipeline.bank.withdraw(id, amount: 100)
            ids.append(id)
        }
        let total = try await pipeline.test.count("SELECT count(*) FROM events")
        let group = uniqueName("projector")
        let env = ["EVENTOUTBOX_DATABASE_URL": pipeline.test.schema.url, "KAFKA_BROKERS": pipeline.brokers]
        let common = ["--group", group, "--topic", pipeline.topic, "--kafka-property", "allow.auto.create.topics=true",
                      "--kafka-property", "session.timeout.ms=6000"]
        let expected = try await pipeline.expectedBalances(ids)

        // The first projector applies everything from Kafka and never commits an offset (interval of an hour).
        let log = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("projector") + ".log")
        try await pipeline.test.pool.withConnection { connection in
            // Pretend the projection was built before these events: empty tables, nothing applied.
            for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
        }
        let first = try Tools.start("account-projector", common + ["--commit-interval", "3600"], environment: env, output: log)
        try await pipeline.relaying {
            try await waitUntil("the first projector applied everything") { try await pipeline.balances() == expected }
        }
        kill(first.processIdentifier, SIGKILL)
        try await waitUntil("the first projector is gone") { !first.isRunning }

        let port = testPort()
        let second = try Tools.start("account-projector", common + ["--metrics-port", String(port)], environment: env, output: log)
        try await waitUntil("the restarted projector skipped every redelivered event", timeout: .seconds(60)) {
            guard let (body, _) = try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!) else {
                return false
            }
            let text = String(decoding: body, as: UTF8.self)
            #expect(Exposition.familiesWithoutHelp(text).isEmpty, "families without # HELP: \(Exposition.familiesWithoutHelp(text))")
            return text.split(separator: "\n").contains { $0.hasPrefix("eventoutbox_projection_duplicates_skipped_total ") && $0.hasSuffix(" \(2 * total)") }
        }
        kill(second.processIdentifier, SIGTERM)
        try await waitUntil("the second projector stops") { !second.isRunning }
        #expect(second.terminationStatus == 0)
        #expect(try await pipeline.balances() == expected)
        #expect(try await pipeline.test.projected("account_balances") == total)
        #expect(try await pipeline.rows("daily_volume", except: ["day"]) == ["\(5 * 525)|10|500|5|0"])

        let rebuilt = try await Tools.run("account-projector", ["--rebuild", "daily_volume"], environment: env)
        #expect(rebuilt.status == 0)
        #expect(rebuilt.stdout.contains("rebuilt daily_volume from \(total) events"))
        #expect(rebuilt.stderr.contains("\(total)/\(total) events"))
        #expect(try await pipeline.rows("daily_volume", except: ["day"]) == ["\(5 * 525)|10|500|5|0"])
        #expect(try await Tools.run("account-projector", ["--rebuild", "nope"], environment: env).stderr.contains("unknown projection"))
        #expect(try await Tools.run("account-projector", ["--help"]).stdout.contains("--rebuild"))
        #expect(try await Tools.run("outbox-relay", ["--help"]).stdout.contains("--kafka-property"))
        try await pipeline.test.drop()
    }

    @Test("account-projector --dead-letters, --show-dead-letter, --retry-dead-letter: raw bytes shown, a retry that still fails changes nothing")
    func deadLetterCommands() async throws {
        let pipeline = try await Pipeline.make()
        let group = uniqueName("projector")
        let env = ["EVENTOUTBOX_DATABASE_URL": pipeline.test.schema.url, "KAFKA_BROKERS": pipeline.brokers]
        let consumer = ProjectionConsumer(
            configuration: pipeline.consumerConfiguration(group: group),
            applier: ProjectionApplier(projections: AccountProjections.all, registry: BankEvents.registry))
        try await consumer.prepare()
        let empty = try await Tools.run("account-projector", ["--dead-letters", "--group", group], environment: env)
        #expect(empty.status == 0 && empty.stdout.contains("no dead letters"))
        let task = Task { try await consumer.run() }
        let producer = try KafkaProducer(configuration: .init(bootstrapServers: pipeline.brokers))
        _ = try await producer.send(KafkaOutgoingMessage(topic: pipeline.topic, key: Array("k".utf8), value: [0xff, 0x00, 0x7b]))
        await producer.close()
        try await waitUntil("dead-lettered") { consumer.deadLetterCount == 1 }
        consumer.stop()
        try await task.value
        let id = try await pipeline.test.count("SELECT id FROM projection_dead_letters")

        let list = try await Tools.run("account-projector", ["--dead-letters", "--group", group], environment: env)
        #expect(list.status == 0)
        #expect(list.stdout.hasPrefix("\(id)\t\(pipeline.topic)/"), "\(list.stdout)")
        #expect(list.stdout.contains("3 bytes") && list.stdout.contains("not an EventOutbox envelope"))
        let show = try await Tools.run("account-projector", ["--show-dead-letter", String(id)], environment: env)
        #expect(show.status == 0)
        #expect(show.stdout.contains("value:      hex ff007b") && show.stdout.contains("key:        k")
                && show.stdout.contains("projection: all projections"), "\(show.stdout)")
        let retry = try await Tools.run("account-projector", ["--retry-dead-letter", String(id)], environment: env)
        #expect(retry.status != 0)
        #expect(retry.stderr.hasPrefix("error: "), "\(retry.stderr)")
        #expect(try await pipeline.test.count("SELECT count(*) FROM projection_dead_letters") == 1)
        let unknown = try await Tools.run("account-projector", ["--retry-dead-letter", "999999"], environment: env)
        #expect(unknown.status != 0 && unknown.stderr.contains("no dead letter with id 999999"))
        try await pipeline.test.drop()
    }

    @Test("two projectors in one group share the partitions; SIGKILL one under load: the other takes over, balances equal the store's")
    func twoProjectorsOneKilled() async throws {
        let pipeline = try await Pipeline.make()
        try await pipeline.test.pool.withConnection { connection in
            for projection in AccountProjections.all { try await projection.createEmptyTables(on: connection) }
        }
        var ids: [String] = []
        for n in 0..<16 { ids.append(try await pipeline.bank.open(owner: "S\(n)", initialDeposit: 1000)) }
        let accounts = ids
        let group = uniqueName("projector")
        let env = ["EVENTOUTBOX_DATABASE_URL": pipeline.test.schema.url, "KAFKA_BROKERS": pipeline.brokers]
        let common = ["--group", group, "--topic", pipeline.topic, "--kafka-property", "allow.auto.create.topics=true",
                      "--kafka-property", "session.timeout.ms=6000", "--kafka-property", "heartbeat.interval.ms=500",
                      "--commit-interval", "0.2"]
        let log = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("projector") + ".log")
        let ports = [testPort(), testPort()]
        let projectors = try ports.map {
            try Tools.start("account-projector", common + ["--metrics-port", String($0)], environment: env, output: log)
        }
        defer { for projector in projectors where projector.isRunning { kill(projector.processIdentifier, SIGKILL) } }
        func applied(_ port: Int) async -> Int {
            guard let (body, _) = try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!) else { return 0 }
            let line = String(decoding: body, as: UTF8.self).split(separator: "\n")
                .first { $0.hasPrefix("eventoutbox_projection_applied_total ") }
            return line.flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
        }
        try await pipeline.relaying {
            let writer = Task {
                for round in 0..<600 {
                    _ = try await pipeline.bank.deposit(accounts[round % accounts.count], amount: Int64(round % 9 + 1))
                }
            }
            try await waitUntil("both projectors apply events (the partitions are shared)", timeout: .seconds(60)) {
                let first = await applied(ports[0])
                let second = await applied(ports[1])
                return first > 0 && second > 0
            }
            kill(projectors[0].processIdentifier, SIGKILL)
            try await writer.value
            let expected = try await pipeline.expectedBalances(accounts)
            try await waitUntil("the survivor took over and every balance equals the store's", timeout: .seconds(90)) {
                try await pipeline.balances() == expected
            }
        }
        #expect(projectors[1].isRunning)
        let total = try await pipeline.test.count("SELECT count(*) FROM events")
        #expect(try await pipeline.test.projected("account_balances") == total)
        #expect(try await pipeline.test.projected("daily_volume") == total)
        kill(projectors[1].processIdentifier, SIGTERM)
        try await waitUntil("the survivor stops") { !projectors[1].isRunning }
        #expect(projectors[1].terminationStatus == 0)
        try await pipeline.test.drop()
    }
}
