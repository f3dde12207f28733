import EventStore

/// The relay's own table, `outbox_dead_letters`: the `SchemaModule` named `outbox-relay`.
///
/// It lives in OutboxRelayStore, not in OutboxRelay, because `eventoutbox migrate` and `eventoutbox dead-letters`
/// use it and must not link librdkafka.
public enum OutboxRelaySchema {
    public static let module = SchemaModule("outbox-relay", dependencies: ["event-store"], migrations: [
        SchemaMigration(
            version: 1, name: "outbox dead letters",
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
        SchemaMigration(
            version: 2, name: "dead letters: rows held behind another",
            sql: """
                -- A relay reading the WAL cannot leave a held-back row waiting in the outbox: it records it here,
                -- pointing at the dead letter it waits for, and retrying that one retries both.
                ALTER TABLE outbox_dead_letters ADD COLUMN held_behind bigint;
                CREATE INDEX outbox_dead_letters_held ON outbox_dead_letters (held_behind) WHERE held_behind IS NOT NULL;
                """),
    ])
}
