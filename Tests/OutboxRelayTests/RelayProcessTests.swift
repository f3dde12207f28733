import EventStore
import EventStoreSQL
import Foundation
import KafkaClient
import LibPQ
import TestSupport
import Testing

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// An `outbox-relay` process on a test schema.
struct RelayProcess {
    let process: ChildProcess
    let log: URL
    let name: String

    static func start(
        _ test: TestEventStore, name: String, lockKey: Int64, brokers: String, extra: [String] = []
    ) throws -> RelayProcess {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("\(uniqueName(name)).log")
        let process = try Tools.start(
            "outbox-relay",
            ["--database-url", test.schema.url + "&application_name=\(name)", "--brokers", brokers, "--poll-interval", "0.2",
             "--standby-interval", "0.2", "--lock-key", String(lockKey), "--batch-size", "200"] + extra,
            output: log)
        return RelayProcess(process: process, log: log, name: name)
    }

    func signal(_ signal: Int32) { kill(process.processIdentifier, signal) }

    func waitForExit() async throws -> Int32 {
        try await waitUntil("\(name) exits") { !process.isRunning }
        return process.terminationStatus
    }

    var output: String { (try? String(contentsOf: log, encoding: .utf8)) ?? "" }
}

/// The application name of the session holding the relay lock of this test, if any.
func activeRelay(_ test: TestEventStore, lockKey: Int64) async throws -> String? {
    try await test.pool.withConnection { connection in
        try await connection.query(
            """
            SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.classid::text = '0' AND l.objid::text = $1
            """, [.text(String(lockKey))]
        ).first?.decode(String.self, at: 0)
    }
}

func publishedIDs(_ test: TestEventStore) async throws -> Set<String> {
    try await test.pool.withConnection { connection in
        Set(try await connection.query("SELECT event_id::text FROM outbox WHERE published_at IS NOT NULL").map {
            try $0.decode(String.self, at: 0)
        })
    }
}

@Suite("outbox-relay processes: crash, failover, graceful stop (real PostgreSQL + kafka-mock-cluster)")
struct RelayProcessTests {
    @Test("killed with SIGKILL mid-batch and restarted: every event arrives at least once, order per key holds")
    func sigkillAndRestart() async throws {
        let topic = uniqueName("kill")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        let lockKey = Int64.random(in: 1...2_000_000_000)
        let ids = try await test.appendTicks(streams: 30, perStream: 100, batch: 25)
        let first = try RelayProcess.start(test, name: "relay-first", lockKey: lockKey, brokers: brokers)
        try await waitUntil("some rows published") {
            try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") >= 300
        }
        first.signal(SIGKILL)
        #expect(try await first.waitForExit() != 0)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") > 0)

        let second = try RelayProcess.start(test, name: "relay-second", lockKey: lockKey, brokers: brokers)
        try await waitUntil("the restarted relay drains the outbox", timeout: .seconds(120)) {
            try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
        }
        second.signal(SIGTERM)
        #expect(try await second.waitForExit() == 0)

        let reader = try await KafkaTopicReader.readAll(ids, brokers: brokers, topic: topic)
        #expect(reader.eventIDs == Set(ids.map { $0.uuidString.lowercased() }))
        #expect(reader.keysOutOfOrder.isEmpty)
        try await test.drop()
    }

    @Test("two relays: one active, the standby takes over when the active one is killed")
    func failover() async throws {
        let topic = uniqueName("failover")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        let lockKey = Int64.random(in: 1...2_000_000_000)
        let relays = [
            try RelayProcess.start(test, name: "relay_a", lockKey: lockKey, brokers: brokers),
            try RelayProcess.start(test, name: "relay_b", lockKey: lockKey, brokers: brokers),
        ]
        var active: String?
        try await waitUntil("one relay active") {
            active = try await activeRelay(test, lockKey: lockKey)
            return active != nil
        }
        var ids = try await test.appendTicks(streams: 20, perStream: 50, batch: 10)
        try await waitUntil("some rows published") {
            try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") >= 100
        }
        let victim = try #require(relays.first { $0.name == active })
        let survivor = try #require(relays.first { $0.name != active })
        victim.signal(SIGKILL)
        _ = try await victim.waitForExit()
        ids += try await test.appendTicks(streams: 20, perStream: 20, prefix: "after-kill")
        try await waitUntil("the standby takes over", timeout: .seconds(30)) {
            try await activeRelay(test, lockKey: lockKey) == survivor.name
        }
        try await waitUntil("the survivor drains the outbox", timeout: .seconds(120)) {
            try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
        }
        #expect(survivor.output.contains("standing by"))
        survivor.signal(SIGTERM)
        #expect(try await survivor.waitForExit() == 0)

        let reader = try await KafkaTopicReader.readAll(ids, brokers: brokers, topic: topic)
        #expect(reader.eventIDs == Set(ids.map { $0.uuidString.lowercased() }))
        #expect(reader.keysOutOfOrder.isEmpty)
        try await test.drop()
    }

    @Test("SIGTERM: stops taking rows, marks what Kafka acknowledged, exits 0; metrics were served")
    func sigterm() async throws {
        let topic = uniqueName("term")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        let port = testPort()
        _ = try await test.appendTicks(streams: 30, perStream: 100, batch: 25)
        let relay = try RelayProcess.start(
            test, name: "relay-term", lockKey: Int64.random(in: 1...2_000_000_000), brokers: brokers,
            extra: ["--metrics-port", String(port)])
        try await waitUntil("some rows published") {
            try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") >= 200
        }
        let (body, response) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!)
        #expect((response as? HTTPURLResponse)?.statusCode == 200)
        let metrics = String(decoding: body, as: UTF8.self)
        #expect(metrics.contains("eventoutbox_relay_published_total"))
        #expect(metrics.contains("eventoutbox_relay_active 1"))
        #expect(Exposition.familiesWithoutHelp(metrics).isEmpty, "families without # HELP: \(Exposition.familiesWithoutHelp(metrics))")
        // Commit → Kafka, a histogram in seconds, one observation per acknowledged row.
        let observed = Exposition.value("eventoutbox_relay_commit_to_kafka_seconds_count", in: metrics) ?? 0
        #expect(observed >= 200, "\(metrics.split(separator: "\n").filter { $0.contains("commit_to_kafka") })")
        #expect(metrics.contains(#"eventoutbox_relay_commit_to_kafka_seconds_bucket{le="0.001"}"#))
        // The sidecar's probes, on the same port.
        for probe in ["live", "ready"] {
            let (_, answer) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/health/\(probe)")!)
            #expect((answer as? HTTPURLResponse)?.statusCode == 200, "/health/\(probe)")
        }

        relay.signal(SIGTERM)
        #expect(try await relay.waitForExit() == 0)
        #expect(relay.output.contains("relay stopped"))
        // Every row marked published is really in Kafka.
        let marked = try await publishedIDs(test)
        let reader = try KafkaTopicReader(brokers: brokers, topic: topic)
        try await reader.read(until: "every marked row") { _ in reader.eventIDs.isSuperset(of: marked) }
        await reader.close()
        try await test.drop()
    }
}

/// For relays started with `--partitions`, how many partition locks each relay (by application name) holds.
func partitionHolders(_ test: TestEventStore, lockKey: Int64, partitions: Int) async throws -> [String: Int] {
    try await test.pool.withConnection { connection in
        var holders: [String: Int] = [:]
        for row in try await connection.query(
            """
            SELECT a.application_name AS name, count(*) AS held FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock' AND l.classid::text = '0'
              AND l.objid::text::bigint BETWEEN $1 AND $2
            GROUP BY a.application_name
            """, [.int64(lockKey), .int64(lockKey + Int64(partitions) - 1)])
        {
            holders[try row.decode(String.self, "name")] = try row.decode(Int.self, "held")
        }
        return holders
    }
}

@Suite("outbox-relay scale-out (real PostgreSQL + kafka-mock-cluster)")
struct RelayScaleOutTests {
    @Test("three relays on --partitions 8 share the streams; one SIGKILLed under load: survivors take over, nothing lost or reordered")
    func threeRelaysOneKilled() async throws {
        let topic = uniqueName("scale")
        let test = try await TestEventStore.create(routing: OutboxRouting(defaultTopic: topic))
        let brokers = try TestEnvironment.kafkaBrokers()
        let lockKey = Int64.random(in: 1000...2_000_000_000)
        var ids = try await test.appendTicks(streams: 40, perStream: 25, batch: 5)
        let relays = try ["relay_p0", "relay_p1", "relay_p2"].map {
            try RelayProcess.start(test, name: $0, lockKey: lockKey, brokers: brokers, extra: ["--partitions", "8"])
        }
        // A relay that took a surplus before its peers arrived gives it back only with nothing in flight, so
        // the shares settle at 3, 3, 2 a moment after all three hold partitions.
        try await waitUntil("all three relays hold balanced shares (2 or 3 each) of the eight partitions", timeout: .seconds(60)) {
            let holders = try await partitionHolders(test, lockKey: lockKey, partitions: 8)
            return holders.count == 3 && holders.values.reduce(0, +) == 8 && holders.values.allSatisfy { (2...3).contains($0) }
        }

        // Load keeps coming while one relay dies.
        let load = Task { try await test.appendTicks(streams: 40, perStream: 25, batch: 5, prefix: "load") }
        try await waitUntil("some rows published") {
            try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") >= 200
        }
        relays[0].signal(SIGKILL)
        _ = try await relays[0].waitForExit()
        ids += try await load.value
        try await waitUntil("the two survivors hold all eight partitions", timeout: .seconds(30)) {
            let holders = try await partitionHolders(test, lockKey: lockKey, partitions: 8)
            return holders[relays[0].name] == nil && holders.values.reduce(0, +) == 8 && holders.count == 2
        }
        try await waitUntil("the survivors drain the outbox", timeout: .seconds(120)) {
            try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
        }
        for survivor in relays.dropFirst() {
            #expect(survivor.output.contains("publishing outbox partitions"))
            survivor.signal(SIGTERM)
            #expect(try await survivor.waitForExit() == 0)
        }
        let reader = try await KafkaTopicReader.readAll(ids, brokers: brokers, topic: topic)
        #expect(reader.eventIDs == Set(ids.map { $0.uuidString.lowercased() }))
        #expect(reader.keysOutOfOrder.isEmpty)
        try await test.drop()
    }
}
