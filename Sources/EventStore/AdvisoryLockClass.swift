/// Every PostgreSQL advisory lock EventOutbox takes, registered in one place so that no two purposes can share
/// a key.
///
/// PostgreSQL keeps two key spaces apart: a single `bigint` key (`pg_advisory_lock(bigint)`) and a pair of
/// `int4` keys (`pg_advisory_lock(int4, int4)`); a lock in one never conflicts with a lock in the other.
///
/// - The `bigint` space belongs to the outbox relay, whose keys the operator chooses (`--lock-key K`): `K` for
///   the active relay, `K + p` for partition `p` and `K - 1` for the partitioned relays' membership
///   (`OutboxRelayConfiguration`). Nothing else takes a `bigint` key.
/// - Every other purpose takes a pair: its class below, and a key within the class (usually
///   `hashtext(current_schema())`, so that schemas do not wait on each other).
///
/// Before this registry, `migrate` took the `bigint` key 7240511001, which is the default relay key minus one:
/// the membership lock of partitioned relays, so a migration waited for as long as they ran.
public enum AdvisoryLockClass: Int32, CaseIterable, Sendable {
    /// ``SchemaMigrator/migrate(_:)``: one migrator per schema at a time (transaction lock).
    case migrate = 72_405_110
    /// A projector preparing its tables and back-filling new projections, per schema.
    case projectorPrepare = 72_405_113
    /// A projection's rebuild; the key is `hashtext(schema || '.' || projection)`.
    case rebuild = 72_405_114
}
