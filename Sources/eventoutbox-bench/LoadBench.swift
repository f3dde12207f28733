import ArgumentParser
import BankAccount
import BlockingIO
import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import LibPQ

/// Loading one long aggregate: from its newest snapshot, and by full replay, beside PostgreSQL alone running the
/// same reads (no decoding).
struct Load: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Aggregate load time (snapshot + tail) and full replay rate of one long bank account, beside a baseline.",
        discussion: """
            Builds one account of --events events (an opening, then deposits), saved 100 at a time with a snapshot every
            100: the load replays the last events % 100 events after the newest snapshot (use 10099 for the worst case). Measures AggregateRepository.load (newest
            snapshot + the events after it) --loads times, and a full replay (read, decode, apply; and decode + apply
            alone). The baseline is PostgreSQL alone running the same statements, rows fetched but not decoded.
            """)
    @Option(help: "Events in the stream.") var events = 10_000
    @Option(help: "Loads to time.") var loads = 300

    func run() async throws {
        let env = try Environment.read()
        try await env.withSchema(connections: 2) { _, store in
            let bank = Bank(store: store, snapshotInterval: 100)
            let repository = bank.repository
            let id = try await bank.open(owner: "Long", initialDeposit: 0)
            var state = try await repository.load(id)
            let deposits = events - 1
            // Saved up to each multiple of 100, which writes a snapshot there: the tail is events % 100.
            while state.version < Int64(events) {
                let count = Int(min(100 - state.version % 100, Int64(events) - state.version))
                let batch = (0..<count).map { _ in NewEvent(MoneyDeposited(amount: 1, description: "bench")) }
                state = try await repository.save(id, batch, after: state)
            }
            precondition(state.version == Int64(events), "built \(state.version) events, expected \(events)")
            let snapshot = try await store.pool.withConnection {
                try await $0.queryOne("SELECT COALESCE(max(version), 0) FROM snapshots WHERE stream_id = $1", [.text(id)]).decode(Int64.self, at: 0)
            }

            var loadTimes: [Duration] = []
            var baselineTimes: [Duration] = []
            for _ in 0..<loads {
                let started = ContinuousClock.now
                let loaded = try await repository.load(id)
                loadTimes.append(ContinuousClock.now - started)
                precondition(loaded.version == Int64(events) && loaded.state.balance == Int64(deposits))
                let baselineStarted = ContinuousClock.now
                try await store.pool.withConnection { connection in
                    _ = try await connection.query(
                        EventTables.snapshotAndTailSQL, [.text(id), .int(Account.stateSchemaVersion), .int64(.max)])
                }
                baselineTimes.append(ContinuousClock.now - baselineStarted)
            }
            let load = Percentiles(loadTimes)
            let baseline = Percentiles(baselineTimes)
            print(String(
                format: "load, %d-event stream, snapshot at %d + %d events: p50 %.2f ms, p99 %.2f ms; PostgreSQL alone, the same statement: p50 %.2f ms, p99 %.2f ms; ratio (p50) %.2f",
                events, snapshot, events - Int(snapshot), load.p50, load.p99, baseline.p50, baseline.p99, baseline.p50 / load.p50))

            // Full replay: everything from version 1, no snapshot.
            let readStarted = ContinuousClock.now
            let recorded = try await store.readStream(id)
            let read = ContinuousClock.now - readStarted
            let decodeStarted = ContinuousClock.now
            let replayed = try repository.replay(recorded, onto: VersionedState(state: Account(), version: 0))
            let decodeApply = ContinuousClock.now - decodeStarted
            precondition(replayed.state.balance == Int64(deposits))
            let rawStarted = ContinuousClock.now
            _ = try await store.pool.withConnection { connection in
                try await connection.query(
                    "SELECT position, event_id, stream_id, stream_version, event_type, schema_version, payload, metadata, occurred_at "
                        + "FROM events WHERE stream_id = $1 ORDER BY stream_version", [.text(id)])
            }
            let raw = ContinuousClock.now - rawStarted
            print(String(
                format: "replay without snapshot, %d events: decode + apply %.0f events/s; read + decode + apply %.0f events/s (%.1f ms); PostgreSQL alone returning the rows: %.1f ms; ratio %.2f",
                recorded.count, Double(recorded.count) / decodeApply.inSeconds, Double(recorded.count) / (read + decodeApply).inSeconds,
                (read + decodeApply).inSeconds * 1000, raw.inSeconds * 1000, raw.inSeconds / (read + decodeApply).inSeconds))
        }
    }
}

/// p50 and p99 of durations, in milliseconds.
struct Percentiles {
    let p50: Double
    let p99: Double
    init(_ durations: [Duration]) {
        let sorted = durations.map { $0.inSeconds * 1000 }.sorted()
        p50 = sorted[sorted.count / 2]
        p99 = sorted[min(sorted.count - 1, sorted.count * 99 / 100)]
    }
}
