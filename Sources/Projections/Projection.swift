import EventSourcing
import EventStore
import Foundation
import LibPQ

/// One event handed to a projection's handler: decoded, with its stored record.
public struct ProjectedEvent: Sendable {
    public var event: any DomainEvent
    public var recorded: RecordedEvent
    /// The Kafka topic it was delivered on; `nil` when it is replayed from the event store (a rebuild).
    public var topic: String?

    public init(event: any DomainEvent, recorded: RecordedEvent, topic: String?) {
        self.event = event
        self.recorded = recorded
        self.topic = topic
    }
}

/// A read model built from events: its tables and the handler that applies events to them.
///
/// The handler must write only through ``ProjectionContext/table(_:)`` names: the same code fills the live
/// tables (from Kafka) and fresh copies during a rebuild (from the event store).
public struct Projection: Sendable {
    /// A table of the projection; `createSQL` uses `{table}` where the table name goes.
    public struct Table: Sendable {
        public var name: String
        public var createSQL: String
        /// Brings a table made by an earlier `createSQL` to the current shape (`{table}` where the name goes);
        /// run by ``ProjectionConsumer/prepare()`` on every start when the table exists, so it must be
        /// idempotent (for example `ALTER TABLE {table} ALTER COLUMN total TYPE numeric`). A rebuild makes the
        /// table from `createSQL` instead.
        public var upgradeSQL: String?
        /// - Precondition: `name` is a plain identifier (`SQLIdentifier.isPlain(_:)`): handlers splice it into SQL.
        public init(name: String, createSQL: String, upgradeSQL: String? = nil) {
            precondition(SQLIdentifier.isPlain(name), "projection table '\(name)' must be a plain identifier: a-z, 0-9, _ (at most 63)")
            self.name = name
            self.createSQL = createSQL
            self.upgradeSQL = upgradeSQL
        }
    }

    /// Applies events, in the order given, inside the caller's transaction. Every event is new to this projection
    /// (duplicates are filtered out before), and a stream's events come in version order.
    public typealias BatchHandler = @Sendable (_ events: [ProjectedEvent], _ context: ProjectionContext) async throws -> Void

    /// Identifies the projection; also the name of its `_progress` table and of its rebuild.
    public var name: String
    public var tables: [Table]
    public var applyBatch: BatchHandler

    /// A projection whose handler takes a batch of events: the fast form, which can write a batch's effects in a
    /// few set-based statements (for example `INSERT … SELECT … FROM unnest($1, $2)`) instead of one per event.
    public init(name: String, tables: [Table], applyBatch: @escaping BatchHandler) {
        // Its tables are named after it (`<name>_progress`, `<table>_rebuild`): it must stay a plain identifier
        // with those suffixes (63 bytes at most).
        precondition(
            SQLIdentifier.isPlain(name) && name.utf8.count <= 50,
            "projection name '\(name)' must be a plain identifier: a-z, 0-9, _ (at most 50)")
        self.name = name
        self.tables = tables
        self.applyBatch = applyBatch
    }

    /// A projection whose handler applies one event at a time: the simple form. Events the projection does not
    /// care about are ignored by the handler.
    public init(
        name: String, tables: [Table],
        apply: @escaping @Sendable (_ event: any DomainEvent, _ recorded: RecordedEvent, _ context: ProjectionContext) async throws -> Void
    ) {
        self.init(name: name, tables: tables, applyBatch: { events, context in
            for event in events { try await apply(event.event, event.recorded, context) }
        })
    }

    /// What makes applying idempotent: per stream and source (a Kafka topic, or `''` for the event store), the
    /// last version applied. Its size follows the number of streams, not of events.
    public var progressTable: Table {
        Table(
            name: "\(name)_progress",
            createSQL: "CREATE TABLE {table} (stream_id text NOT NULL, source text NOT NULL, last_version bigint NOT NULL, "
                + "PRIMARY KEY (stream_id, source))")
    }

    /// The table that recorded applied event ids before `_progress` replaced it; a rebuild drops it.
    var legacyAppliedTable: String { "\(name)_applied" }

    var allTables: [Table] { tables + [progressTable] }

    /// Creates the projection's live tables, empty, replacing any that exist. A consumer that finds them
    /// does not back-fill: it applies what Kafka delivers from its group's offsets on.
    public func createEmptyTables(on connection: PQConnection) async throws {
        try await ProjectionSchema.create(self, suffix: "", on: connection)
    }
}

/// Where a handler writes: a connection inside the apply transaction and the actual table names.
public struct ProjectionContext: Sendable {
    public let connection: PQConnection
    let suffix: String

    /// The actual name of one of the projection's tables (the live one, or its rebuild copy).
    public func table(_ name: String) -> String { name + suffix }
}

/// Creates missing projection tables, and records what exists.
public enum ProjectionSchema {
    /// The projector's own table, `projection_dead_letters`: the `SchemaModule` named `projections`, which
    /// ``ProjectionConsumer/prepare()`` applies. (A projection's tables are its own, made from its ``Projection/Table``s.)
    public static let module = SchemaModule("projections", migrations: [
        // IF NOT EXISTS: up to 0.9.0, the projector made this table on its own, unrecorded.
        SchemaMigration(version: 1, name: "projection dead letters", sql: deadLettersSQL)
    ])

    private static let deadLettersSQL = """
        CREATE TABLE IF NOT EXISTS projection_dead_letters (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            consumer    text        NOT NULL,
            projection  text,
            headers     jsonb,
            topic       text        NOT NULL,
            partition   int         NOT NULL,
            "offset"    bigint      NOT NULL,
            key         bytea,
            value       bytea,
            reason      text        NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now()
        );
        ALTER TABLE projection_dead_letters ADD COLUMN IF NOT EXISTS projection text;
        ALTER TABLE projection_dead_letters ADD COLUMN IF NOT EXISTS headers jsonb
        """

    /// `true` if the live tables of `projection` exist.
    static func exists(_ projection: Projection, on connection: PQConnection) async throws -> Bool {
        try await connection.queryOne(
            "SELECT to_regclass($1) IS NOT NULL AS present", [.text(projection.progressTable.name)],
            statement: "projection: exists"
        ).decode(Bool.self, "present")
    }

    /// Runs each table's ``Projection/Table/upgradeSQL`` on the live tables.
    static func upgrade(_ projection: Projection, on connection: PQConnection) async throws {
        for table in projection.tables {
            guard let sql = table.upgradeSQL else { continue }
            try await connection.executeScript(
                sql.replacingOccurrences(of: "{table}", with: table.name), statement: "projection: upgrade \(table.name)")
        }
    }

    static func create(_ projection: Projection, suffix: String, on connection: PQConnection) async throws {
        for table in projection.allTables {
            try await connection.executeScript("DROP TABLE IF EXISTS \(SQLIdentifier.quoted(table.name + suffix))")
            try await connection.executeScript(
                table.createSQL.replacingOccurrences(of: "{table}", with: table.name + suffix),
                statement: "projection: create \(table.name + suffix)")
        }
    }
}
