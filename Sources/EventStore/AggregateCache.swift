import EventSourcing
import Metrics
import Synchronization

/// The latest known state of recently used streams, so that a command can be decided without loading its
/// aggregate: ``AggregateRepository/execute(_:metadata:maxAttempts:alsoWriting:_:)`` decides on the cached state
/// and appends at exactly its version. The append's version check keeps the cache honest: if another writer
/// (another replica, another repository) appended meanwhile, the append writes nothing, the entry is dropped, and
/// the command is decided again on the state loaded from the store. A cached state is never returned to a reader:
/// ``AggregateRepository/load(_:)`` always reads the store.
///
/// Commands on one stream take turns within the process (first come, first served), so that they do not race
/// each other to the same version: the second decides on the state the first saved instead of spending an append
/// on a version already taken and then loading. A command must not run another command on its own stream (it
/// would wait for itself).
///
/// Bounded: at most ``capacity`` streams are kept, the least recently used first to go (approximately: two
/// generations, the older dropped whole when the newer fills).
///
/// Metrics (swift-metrics, by `category`): `eventoutbox_aggregate_cache_hits_total` (commands decided on a
/// cached state), `_misses_total` (loaded from the store), `_stale_total` (a cached state the append found out of
/// date; each costs one statement that writes nothing).
public final class AggregateCache<State: Aggregate>: Sendable {
    /// How many streams are kept at most.
    public let capacity: Int

    /// What the cache did so far (for tests and benchmarks; operators read the metrics).
    public struct Statistics: Sendable, Equatable {
        public var hits = 0
        public var misses = 0
        public var stale = 0
    }

    private struct Generations {
        var recent: [String: VersionedState<State>] = [:]
        var older: [String: VersionedState<State>] = [:]
        var statistics = Statistics()
    }

    private let entries = Mutex(Generations())
    /// The streams a command runs on now, each with the commands waiting for their turn, in order.
    private let turns = Mutex<[String: [CheckedContinuation<Void, Never>]]>([:])
    private let hits: Counter
    private let misses: Counter
    private let staleStates: Counter

    /// - Parameter capacity: streams kept at most (at least 2).
    public init(capacity: Int) {
        precondition(capacity >= 2, "an aggregate cache holds at least 2 streams (got \(capacity))")
        self.capacity = capacity
        let dimensions = [("category", State.category)]
        hits = Counter(label: "eventoutbox_aggregate_cache_hits_total", dimensions: dimensions)
        misses = Counter(label: "eventoutbox_aggregate_cache_misses_total", dimensions: dimensions)
        staleStates = Counter(label: "eventoutbox_aggregate_cache_stale_total", dimensions: dimensions)
    }

    /// What the cache did so far.
    public var statistics: Statistics { entries.withLock { $0.statistics } }

    /// How many streams are cached now.
    public var count: Int { entries.withLock { $0.recent.count + $0.older.count } }

    /// The cached state of `streamID`, counted as a hit or a miss.
    func state(of streamID: String) -> VersionedState<State>? {
        let found = entries.withLock { entries -> VersionedState<State>? in
            if let state = entries.recent[streamID] {
                entries.statistics.hits += 1
                return state
            }
            if let state = entries.older.removeValue(forKey: streamID) {
                entries.statistics.hits += 1
                Self.insert(streamID, state, into: &entries, capacity: capacity)
                return state
            }
            entries.statistics.misses += 1
            return nil
        }
        if found == nil { misses.increment() } else { hits.increment() }
        return found
    }

    /// Keeps `state` for `streamID` unless a newer version is kept already (two commands on one stream can
    /// finish in either order).
    func remember(_ streamID: String, _ state: VersionedState<State>) {
        guard state.version > 0 else { return }
        entries.withLock { entries in
            let known = entries.recent[streamID]?.version ?? entries.older[streamID]?.version ?? 0
            guard state.version > known else { return }
            entries.older[streamID] = nil
            Self.insert(streamID, state, into: &entries, capacity: capacity)
        }
    }

    /// Drops `streamID`: its cached state was found out of date (`stale`) or its last command's outcome is unknown.
    func forget(_ streamID: String, stale: Bool) {
        entries.withLock { entries in
            entries.recent[streamID] = nil
            entries.older[streamID] = nil
            if stale { entries.statistics.stale += 1 }
        }
        if stale { staleStates.increment() }
    }

    /// Runs `body` once no other command of this process runs on `streamID`, and lets the next one in after it.
    func inTurn<T>(_ streamID: String, _ body: () async throws -> T) async rethrows -> T {
        let free = turns.withLock { turns in
            guard turns[streamID] == nil else { return false }
            turns[streamID] = []
            return true
        }
        if !free {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                // The stream may have been let go between the two looks: then this command takes it at once.
                let queued = turns.withLock { turns in
                    guard turns[streamID] != nil else {
                        turns[streamID] = []
                        return false
                    }
                    turns[streamID]!.append(continuation)
                    return true
                }
                if !queued { continuation.resume() }
            }
        }
        defer { passTurn(streamID) }
        return try await body()
    }

    /// Hands `streamID` to the next waiting command, or lets it go.
    private func passTurn(_ streamID: String) {
        let next = turns.withLock { turns -> CheckedContinuation<Void, Never>? in
            guard var waiting = turns[streamID], !waiting.isEmpty else {
                turns[streamID] = nil
                return nil
            }
            let next = waiting.removeFirst()
            turns[streamID] = waiting
            return next
        }
        next?.resume()
    }

    private static func insert(_ streamID: String, _ state: VersionedState<State>, into entries: inout Generations, capacity: Int) {
        if entries.recent[streamID] == nil, entries.recent.count >= capacity / 2 {
            entries.older = entries.recent
            entries.recent = [:]
        }
        entries.recent[streamID] = state
    }
}
