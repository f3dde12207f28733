import PostgresClient

/// The tables of the event store, created and upgraded by numbered migrations.
///
/// `migrate` is safe to run twice and from several processes at once: it takes an advisory lock and applies
/// only the migrations not yet recorded in `eventoutbox_migrations`.
public enum EventStoreSchema {
    public struct Migration: Sendable {
        public var version: Int
        public var name: String
        public var sql: String
    }

    /// The channel on which every append transaction sends `NOTIFY` (payload: the number of outbox rows).
    public static let outboxChannel = "eventoutbox_outbox"

    public static let migrations: [Migration] = [
        Migration(
            version: 1, name: "events, outbox, snapshots",
            sql: """
                CREATE TABLE events (
                    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    event_id        uuid        NOT NULL UNIQUE,
                    stream_id       text        NOT NULL,
                    stream_version  bigint      NOT NULL CHECK (stream_version >= 1),
                    event_type      text        NOT NULL,
                    schema_version  int         NOT NULL,
                    payload         jsonb       NOT NULL,
                    metadata        jsonb       NOT NULL DEFAULT '{}',
                    occurred_at     timestamptz NOT NULL,
                    CONSTRAINT events_stream_version_unique UNIQUE (stream_id, stream_version)
                );
                CREATE INDEX events_stream_time ON events (stream_id, occurred_at);

                -- Events are facts: refuse to change or remove them.
                CREATE FUNCTION eventoutbox_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    RAISE EXCEPTION 'events are append-only: % is not allowed', TG_OP USING ERRCODE = 'P0001';
                END $$;
                CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
                    FOR EACH ROW EXECUTE FUNCTION eventoutbox_events_append_only();
                CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
                    FOR EACH STATEMENT EXECUTE FUNCTION eventoutbox_events_append_only();

                CREATE TABLE outbox (
                    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    event_id        uuid        NOT NULL UNIQUE REFERENCES events (event_id),
                    stream_id       text        NOT NULL,
                    stream_version  bigint      NOT NULL,
                    topic           text        NOT NULL,
                    message_key     text        NOT NULL,
                    envelope        text        NOT NULL,
                    headers         jsonb       NOT NULL,
                    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
                    published_at    timestamptz,
                    kafka_partition int,
                    kafka_offset    bigint
                );
                CREATE INDEX outbox_waiting ON outbox (id) WHERE published_at IS NULL;
                CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

                CREATE TABLE snapshots (
                    stream_id            text        NOT NULL,
                    version              bigint      NOT NULL,
                    state_schema_version int         NOT NULL,
                    state                jsonb       NOT NULL,
                    created_at           timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (stream_id, version, state_schema_version)
                );
                """),
        Migration(
            version: 2, name: "outbox dead letters",
            sql: """
                CREATE TABLE outbox_dead_letters (
                    outbox_id       bigint      PRIMARY KEY,
                    event_id        uuid        NOT NULL,
                    stream_id       text        NOT NULL,
                    stream_version  bigint      NOT NULL,
                    topic           text        NOT NULL,
                    message_key     text        NOT NULL,
                    envelope        text        NOT NULL,
                    headers         jsonb       NOT NULL,
                    created_at      timestamptz NOT NULL,
                    error           text        NOT NULL,
                    failed_at       timestamptz NOT NULL DEFAULT clock_timestamp()
                );
                CREATE INDEX outbox_dead_letters_stream ON outbox_dead_letters (stream_id);
                """),
        Migration(
            version: 3, name: "outbox: waiting rows by stream",
            sql: """
                -- The relay asks, for each row it takes, whether its stream has an earlier waiting row.
                CREATE INDEX outbox_waiting_stream ON outbox (stream_id, id) WHERE published_at IS NULL;
                """),
        Migration(
            version: 4, name: "dead letters: rows held behind another",
            sql: """
                -- A relay reading the WAL cannot leave a held-back row waiting in the outbox: it records it here,
                -- pointing at the dead letter it waits for, and retrying that one retries both.
                ALTER TABLE outbox_dead_letters ADD COLUMN held_behind bigint;
                CREATE INDEX outbox_dead_letters_held ON outbox_dead_letters (held_behind) WHERE held_behind IS NOT NULL;
                """),
        Migration(
            version: 5, name: "idempotency keys",
            sql: """
                -- A service's answer to a request that carried an Idempotency-Key, written in the transaction of
                -- the events it caused: a retry with the same key gets the same answer and writes nothing.
                CREATE TABLE idempotency_keys (
                    key          text        PRIMARY KEY,
                    -- The request in a canonical form (method, path, decoded body): the same key with another
                    -- request is refused.
                    request      text        NOT NULL,
                    status       int         NOT NULL,
                    body         text        NOT NULL,
                    location     text,
                    created_at   timestamptz NOT NULL DEFAULT now()
                );
                """),
        Migration(
            version: 6, name: "idempotency keys per caller, with expiry",
            sql: """
                -- A key is the caller's own (the token's subject; '' without authentication): another caller's
                -- same key is another request. Answers expire (accounts-service --idempotency-key-lifetime).
                ALTER TABLE idempotency_keys ADD COLUMN caller text NOT NULL DEFAULT '';
                ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
                ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (caller, key);
                CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
                """),
    ]

    /// Applies the migrations that are missing. Returns the versions it applied (empty if up to date).
    @discardableResult
    public static func migrate(_ pool: PostgresPool) async throws -> [Int] {
        try await pool.withTransaction { connection in
            // One migrator per schema at a time, across processes (a lock class of its own: see AdvisoryLockClass).
            try await connection.query(
                "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))", [.int32(AdvisoryLockClass.migrate.rawValue)],
                statement: "migrate: lock")
            try await connection.executeScript(
                """
                CREATE TABLE IF NOT EXISTS eventoutbox_migrations (
                    version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())
                """, statement: "migrate: bookkeeping table")
            let done = Set(
                try await connection.query("SELECT version FROM eventoutbox_migrations", statement: "migrate: applied")
                    .map { try $0.decode(Int.self, "version") })
            var applied: [Int] = []
            for migration in migrations where !done.contains(migration.version) {
                try await connection.executeScript(migration.sql, statement: "migration \(migration.version): \(migration.name)")
                try await connection.execute(
                    "INSERT INTO eventoutbox_migrations (version, name) VALUES ($1, $2)",
                    [.int(migration.version), .text(migration.name)], statement: "migrate: record")
                applied.append(migration.version)
            }
            return applied
        }
    }
}
