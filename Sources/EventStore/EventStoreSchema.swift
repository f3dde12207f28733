/// The event store's tables, `events`, `snapshots` and `outbox`: the ``SchemaModule`` named `event-store`.
///
/// `eventoutbox migrate` applies it with the relay's module (`EventOutboxSchema.modules`, in OutboxRelayStore); a
/// service of your own adds its modules to the same ``SchemaMigrator``.
public enum EventStoreSchema {
    public static let module = SchemaModule("event-store", migrations: [
        SchemaMigration(
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
        SchemaMigration(
            version: 2, name: "outbox: waiting rows by stream",
            sql: """
                -- The relay asks, for each row it takes, whether its stream has an earlier waiting row.
                CREATE INDEX outbox_waiting_stream ON outbox (stream_id, id) WHERE published_at IS NULL;
                """),
    ])
}
