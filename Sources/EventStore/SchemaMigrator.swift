import LibPQ

/// One named, numbered change to the tables of a ``SchemaModule``.
public struct SchemaMigration: Sendable, Equatable {
    /// 1, 2, 3, ... within its module.
    public var version: Int
    public var name: String
    /// One or more statements, run in the migrator's transaction.
    public var sql: String

    public init(version: Int, name: String, sql: String) {
        self.version = version
        self.name = name
        self.sql = sql
    }
}

/// The part of the database schema that one module owns: its tables, created and upgraded by its own migrations.
///
/// A module names the modules whose tables its migrations refer to; ``SchemaMigrator`` applies those first.
/// A service of your own registers its tables the same way, beside the toolkit's:
///
/// ```swift
/// let orders = SchemaModule("orders-service", dependencies: ["event-store"], migrations: [
///     SchemaMigration(version: 1, name: "order numbers", sql: "CREATE TABLE order_numbers (...)"),
/// ])
/// try await SchemaMigrator(EventOutboxSchema.modules + [orders]).migrate(pool)
/// ```
public struct SchemaModule: Sendable {
    /// Unique among the modules of one database schema; recorded with each applied migration.
    public var name: String
    public var dependencies: [String]
    /// Numbered 1, 2, 3, ... in this order.
    public var migrations: [SchemaMigration]

    public init(_ name: String, dependencies: [String] = [], migrations: [SchemaMigration]) {
        self.name = name
        self.dependencies = dependencies
        self.migrations = migrations
    }
}

/// A migration, named by its module: what ``SchemaMigrator`` applied, or would apply.
public struct ModuleMigration: Sendable, Hashable, CustomStringConvertible {
    public var module: String
    public var version: Int
    public var name: String

    public init(module: String, version: Int, name: String) {
        self.module = module
        self.version = version
        self.name = name
    }

    public var description: String { "\(module) \(version) (\(name))" }
}

/// A set of modules that cannot be migrated as registered: the message says which module and what to change.
public struct SchemaModuleError: Error, Equatable, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// Applies the migrations of several modules, each module after the ones it depends on, each migration once.
///
/// Applied migrations are recorded per module in `eventoutbox_schema_migrations`. One migrator per database
/// schema runs at a time, across processes (a transaction-scoped advisory lock, ``AdvisoryLockClass/migrate``),
/// and all of one run commits or none of it. So `migrate` is safe to run twice and from several processes at once.
public struct SchemaMigrator: Sendable {
    public let modules: [SchemaModule]

    public init(_ modules: [SchemaModule]) {
        self.modules = modules
    }

    /// The modules in the order they are applied: every module after its dependencies, otherwise as registered.
    /// - Throws: ``SchemaModuleError`` for an empty or repeated name, versions that are not 1, 2, 3, ..., an
    ///   unregistered dependency, or dependencies that form a cycle.
    public func ordered() throws -> [SchemaModule] {
        var names: Set<String> = []
        for module in modules {
            guard !module.name.isEmpty else { throw SchemaModuleError(message: "a schema module has an empty name") }
            guard names.insert(module.name).inserted else {
                throw SchemaModuleError(message: "schema module '\(module.name)' is registered twice")
            }
            let versions = module.migrations.map(\.version)
            guard versions == (0..<versions.count).map({ $0 + 1 }) else {
                throw SchemaModuleError(
                    message: "schema module '\(module.name)' numbers its migrations \(versions): they must be 1, 2, 3, ... in order")
            }
            for dependency in module.dependencies where !modules.contains(where: { $0.name == dependency }) {
                throw SchemaModuleError(
                    message: "schema module '\(module.name)' depends on '\(dependency)', which is not registered: add it to the migrator")
            }
        }
        var order: [SchemaModule] = []
        var placed: Set<String> = []
        while order.count < modules.count {
            guard let next = modules.first(where: { module in
                !placed.contains(module.name) && module.dependencies.allSatisfy { placed.contains($0) }
            }) else {
                let rest = modules.filter { !placed.contains($0.name) }.map(\.name)
                throw SchemaModuleError(message: "schema modules \(rest) depend on each other in a cycle: one of them must not")
            }
            order.append(next)
            placed.insert(next.name)
        }
        return order
    }

    /// Applies the migrations that are missing, in one transaction. Returns what it applied (empty if up to date).
    @discardableResult
    public func migrate(_ pool: PQPool) async throws -> [ModuleMigration] {
        let order = try ordered()
        return try await pool.withTransaction { connection in
            try await connection.query(
                "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))", [.int32(AdvisoryLockClass.migrate.rawValue)],
                statement: "migrate: lock")
            try await Self.prepareBookkeeping(connection)
            let done = try await Self.applied(connection)
            var applied: [ModuleMigration] = []
            for module in order {
                for migration in module.migrations where !done.contains(Key(module: module.name, version: migration.version)) {
                    try await connection.executeScript(
                        migration.sql, statement: "migration \(module.name) \(migration.version): \(migration.name)")
                    try await connection.execute(
                        "INSERT INTO eventoutbox_schema_migrations (module, version, name) VALUES ($1, $2, $3)",
                        [.text(module.name), .int(migration.version), .text(migration.name)], statement: "migrate: record")
                    applied.append(ModuleMigration(module: module.name, version: migration.version, name: migration.name))
                }
            }
            return applied
        }
    }

    /// The migrations that ``migrate(_:)`` would apply, without changing anything.
    public func pending(_ pool: PQPool) async throws -> [ModuleMigration] {
        let order = try ordered()
        let done = try await pool.withConnection { connection -> Set<Key> in
            if try await Self.tableExists("eventoutbox_schema_migrations", on: connection) {
                return try await Self.applied(connection)
            }
            return Set((try await Self.legacyRecords(connection) ?? []).map { Key(module: $0.migration.module, version: $0.migration.version) })
        }
        return order.flatMap { module in
            module.migrations.filter { !done.contains(Key(module: module.name, version: $0.version)) }
                .map { ModuleMigration(module: module.name, version: $0.version, name: $0.name) }
        }
    }

    private struct Key: Hashable {
        var module: String
        var version: Int
    }

    private static func prepareBookkeeping(_ connection: PQConnection) async throws {
        guard try await !tableExists("eventoutbox_schema_migrations", on: connection) else { return }
        try await connection.executeScript(
            """
            CREATE TABLE eventoutbox_schema_migrations (
                module     text        NOT NULL,
                version    int         NOT NULL,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (module, version))
            """, statement: "migrate: bookkeeping table")
        try await adoptLegacyRecords(connection)
    }

    private static func applied(_ connection: PQConnection) async throws -> Set<Key> {
        Set(
            try await connection.query("SELECT module, version FROM eventoutbox_schema_migrations", statement: "migrate: applied")
                .map { Key(module: try $0.decode(String.self, "module"), version: try $0.decode(Int.self, "version")) })
    }

    // MARK: Before modules

    /// Up to 0.9.0, one list numbered 1-6 for all of the tables, recorded in `eventoutbox_migrations`; each of those is
    /// now a module's own. The old table stays as it was, for binaries of older versions.
    static let legacyMigrations: [Int: ModuleMigration] = [
        1: ModuleMigration(module: "event-store", version: 1, name: "events, outbox, snapshots"),
        2: ModuleMigration(module: "outbox-relay", version: 1, name: "outbox dead letters"),
        3: ModuleMigration(module: "event-store", version: 2, name: "outbox: waiting rows by stream"),
        4: ModuleMigration(module: "outbox-relay", version: 2, name: "dead letters: rows held behind another"),
        5: ModuleMigration(module: "accounts-service", version: 1, name: "idempotency keys"),
        6: ModuleMigration(module: "accounts-service", version: 2, name: "idempotency keys per caller, with expiry"),
    ]

    /// What the old list records, each version as the module migration it became; `nil` without the old table.
    /// A version that no release wrote is refused: the schema was changed by something this build cannot vouch for.
    private static func legacyRecords(_ connection: PQConnection) async throws -> [(version: Int, migration: ModuleMigration)]? {
        guard try await tableExists("eventoutbox_migrations", on: connection) else { return nil }
        return try await connection.query(
            "SELECT version FROM eventoutbox_migrations ORDER BY version", statement: "migrate: old applied"
        ).map { row in
            let version = try row.decode(Int.self, "version")
            guard let migration = legacyMigrations[version] else {
                throw SchemaModuleError(
                    message: "eventoutbox_migrations records version \(version), which no version of EventOutbox wrote: "
                        + "the schema was changed by hand or by a newer build; resolve it before migrating")
            }
            return (version, migration)
        }
    }

    /// Records, once, what the old list had applied as the modules' migrations.
    private static func adoptLegacyRecords(_ connection: PQConnection) async throws {
        for (version, migration) in try await legacyRecords(connection) ?? [] {
            try await connection.execute(
                "INSERT INTO eventoutbox_schema_migrations (module, version, name, applied_at) "
                    + "SELECT $1, $2, $3, applied_at FROM eventoutbox_migrations WHERE version = $4",
                [.text(migration.module), .int(migration.version), .text(migration.name), .int(version)],
                statement: "migrate: adopt old record")
        }
    }

    private static func tableExists(_ table: String, on connection: PQConnection) async throws -> Bool {
        try await connection.queryOne(
            "SELECT to_regclass($1) IS NOT NULL AS present", [.text(table)], statement: "migrate: is there a table \(table)"
        ).decode(Bool.self, "present")
    }
}
