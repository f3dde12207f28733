import EventStore
import OutboxRelayStore
import LibPQ

/// Which outbox partitions this relay publishes when several relays split one database's streams
/// (``OutboxRelayConfiguration/partitions`` > 1).
///
/// Each partition `p` is a session advisory lock (key `leaderLockKey + p`) on the relay's connection; the
/// relays also hold one shared "member" lock (key `leaderLockKey - 1`), so each can count its peers. Every
/// relay aims at `ceil(partitions / members)` partitions: it takes free ones up to that and gives back any
/// above it. A relay that dies loses its session and so its locks; the survivors take its partitions at their
/// next rebalance. A relay takes partitions at any time, but gives them back only while nothing is in flight
/// (the caller says when), so a partition changes hands with every delivered row already marked.
struct PartitionOwnership {
    let count: Int
    let baseKey: Int64
    private(set) var owned: [Int] = []

    init(count: Int, baseKey: Int64) {
        precondition(count > 1, "partition ownership is for more than one partition")
        self.count = count
        self.baseKey = baseKey
    }

    var memberKey: Int64 { baseKey &- 1 }

    var partitions: OutboxPartitions { OutboxPartitions(count: count, owned: owned) }

    /// Joins the relays of this database (the shared member lock, held for the session).
    func join(on connection: PQConnection) async throws {
        try await connection.query("SELECT pg_advisory_lock_shared($1)", [.int64(memberKey)], statement: "relay: join partitioned relays")
    }

    /// How many relays hold the member lock (this one included).
    func members(on connection: PQConnection) async throws -> Int {
        try await connection.queryOne(
            """
            SELECT count(*) AS members FROM pg_locks
            WHERE locktype = 'advisory' AND mode = 'ShareLock' AND granted AND objsubid = 1
              AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid
            """, [.int64(memberKey)], statement: "relay: count partitioned relays"
        ).decode(Int.self, "members")
    }

    /// How many partitions a relay should hold, given the relays holding the member lock.
    static func target(partitions: Int, members: Int) -> Int {
        let members = max(members, 1)
        return (partitions + members - 1) / members
    }

    /// What a rebalance did.
    struct Change {
        /// `owned` changed.
        var changed = false
        /// This relay holds more than its share but was not allowed to give any back (rows in flight).
        var mustRelease = false
    }

    /// Takes free partitions up to the target and, when `mayRelease`, gives back those above it (only allowed
    /// with nothing in flight, so that a partition changes hands with every delivered row marked).
    mutating func rebalance(mayRelease: Bool, on connection: PQConnection) async throws -> Change {
        let members = try await members(on: connection)
        let target = Self.target(partitions: count, members: members)
        let before = owned
        guard mayRelease || owned.count <= target else { return Change(mustRelease: true) }
        while owned.count > target, let released = owned.popLast() {
            try await connection.query("SELECT pg_advisory_unlock($1)", [.int64(baseKey &+ Int64(released))], statement: "relay: release partition")
        }
        if owned.count < target {
            // Start at a random partition so that relays joining together try different ones first.
            let start = Int.random(in: 0..<count)
            for offset in 0..<count where owned.count < target {
                let partition = (start + offset) % count
                guard !owned.contains(partition) else { continue }
                let acquired = try await connection.queryOne(
                    "SELECT pg_try_advisory_lock($1) AS acquired", [.int64(baseKey &+ Int64(partition))],
                    statement: "relay: try partition lock"
                ).decode(Bool.self, "acquired")
                if acquired { owned.append(partition) }
            }
        }
        owned.sort()
        return Change(changed: owned != before.sorted())
    }
}
