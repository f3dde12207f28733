import EventSourcing
import Foundation
import PostgresClient

/// A read model built from events: its tables and the handler that applies one event to them.
///
/// The handler must write only through ``ProjectionContext/table(_:)`` names: the same code fills the live
/// tables (from Kafka) and fresh copies during a rebuild (from the event store).
public struct Projection: Sendable {
    /// A table of the projection; `createSQL` uses `{table}` where the table name goes.
    public struct Table: Sendable {
        public var name: String
        public var createSQL: String
        /// - Precondition: `name` is a plain identifier (``SQLIdentifier/isPlain(_:)``): handlers splice it into SQL.
        public init(name: String, createSQL: String) {
            precondition(SQLIdentifier.isPlain(name), "projection table '\(name)' must be a plain identifier: a-z, 0-9, _ (at most 63)")
            self.name = name
            self.createSQL = createSQL
        }
    }

    /// Identifies the projection; also the name of its `_applied` table and of its rebuild.
    public var name: String
    public var tables: [Table]
    /// Applies one event. Events the projection does not care about are simply ignored by the handler.
    public var apply: @Sendable (_ event: any DomainEvent, _ recorded: RecordedEvent, _ context: ProjectionContext) async throws -> Void

    public init(
        name: String, tables: [Table],
        apply: @escaping @Sendable (any DomainEvent, RecordedEvent, ProjectionContext) async throws -> Void
    ) {
        // Its tables are named after it (`<name>_applied`, `<table>_rebuild`): it must stay a plain identifier
        // with those suffixes (63 bytes at most).
        precondition(
            SQLIdentifier.isPlain(name) && name.utf8.count <= 50,
            "projection name '\(name)' must be a plain identifier: a-z, 0-9, _ (at most 50)")
        self.name = name
        self.tables = tables
        self.apply = apply
    }

    /// The table recording which events were applied (`event_id` primary key): what makes applying idempotent.
    public var appliedTable: Table {
        Table(
            name: "\(name)_applied",
            createSQL: "CREATE TABLE {table} (event_id uuid PRIMARY KEY, position bigint NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
    }

    var allTables: [Table] { tables + [appliedTable] }

    /// Creates the projection's live tables, empty, replacing any that exist. A consumer that finds them
    /// does not back-fill: it applies what Kafka delivers from its group's offsets on.
    public func createEmptyTables(on connection: PostgresConnection) async throws {
        try await ProjectionSchema.create(self, suffix: "", on: connection)
    }
}

/// Where a handler writes: a connection inside the apply transaction and the actual table names.
public struct ProjectionContext: Sendable {
    public let connection: PostgresConnection
    let suffix: String

    /// The actual name of one of the projection's tables (the live one, or its rebuild copy).
    public func table(_ name: String) -> String { name + suffix }
}

/// Creates missing projection tables, and records what exists.
enum ProjectionSchema {
    static let deadLettersSQL = """
        CREATE TABLE IF NOT EXISTS projection_dead_letters (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            consumer    text        NOT NULL,
            topic       text        NOT NULL,
            partition   int         NOT NULL,
            "offset"    bigint      NOT NULL,
            key         bytea,
            value       bytea,
            reason      text        NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now()
        )
        """

    /// `true` if the live tables of `projection` exist.
    static func exists(_ projection: Projection, on connection: PostgresConnection) async throws -> Bool {
        try await connection.query(
            "SELECT to_regclass($1) IS NOT NULL AS present", [.text(projection.appliedTable.name)],
            statement: "projection: exists"
        ).first!.decode(Bool.self, "present")
    }

    static func create(_ projection: Projection, suffix: String, on connection: PostgresConnection) async throws {
        for table in projection.allTables {
            try await connection.executeScript("DROP TABLE IF EXISTS \(SQLIdentifier.quoted(table.name + suffix))")
            try await connection.executeScript(
                table.createSQL.replacingOccurrences(of: "{table}", with: table.name + suffix),
                statement: "projection: create \(table.name + suffix)")
        }
    }
}
