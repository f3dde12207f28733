@testable import EventStore
import Foundation
import OutboxRelayStore
import LibPQ
import TestSupport
import Testing

@Suite("schema modules: order, validation, and migrations on real PostgreSQL")
struct SchemaMigratorTests {
    static func module(_ name: String, _ dependencies: [String] = [], versions: Int = 1) -> SchemaModule {
        SchemaModule(name, dependencies: dependencies, migrations: (0..<versions).map {
            SchemaMigration(version: $0 + 1, name: "step \($0 + 1)", sql: "SELECT 1")
        })
    }

    @Test("each module comes after its dependencies, otherwise in the order registered")
    func dependencyOrder() throws {
        let migrator = SchemaMigrator([
            Self.module("service", ["relay", "store"]), Self.module("store"), Self.module("relay", ["store"]), Self.module("other"),
        ])
        #expect(try migrator.ordered().map(\.name) == ["store", "relay", "service", "other"])
        #expect(try SchemaMigrator(EventOutboxSchema.modules.reversed()).ordered().map(\.name) == ["event-store", "outbox-relay"])
    }

    @Test("a registry that cannot be applied is refused before the database is touched, naming the module")
    func invalidRegistries() {
        let cases: [([SchemaModule], String)] = [
            ([Self.module("a"), Self.module("a")], "'a' is registered twice"),
            ([Self.module("")], "empty name"),
            ([SchemaModule("gap", migrations: [
                SchemaMigration(version: 1, name: "one", sql: ""), SchemaMigration(version: 3, name: "three", sql: ""),
            ])], "'gap' numbers its migrations [1, 3]"),
            ([SchemaModule("zero", migrations: [SchemaMigration(version: 0, name: "zero", sql: "")])], "'zero' numbers its migrations [0]"),
            ([Self.module("orders", ["event-store"])], "'orders' depends on 'event-store', which is not registered"),
            ([Self.module("a", ["b"]), Self.module("b", ["a"]), Self.module("c")], "[\"a\", \"b\"] depend on each other in a cycle"),
        ]
        for (modules, message) in cases {
            let error = #expect(throws: SchemaModuleError.self) { try SchemaMigrator(modules).ordered() }
            #expect(error?.message.contains(message) == true, "\(String(describing: error)) should say \(message)")
        }
    }

    @Test("a new schema gets every module's migrations in order, recorded per module; a second run applies nothing")
    func freshSchema() async throws {
        try await TestSchema.withPool("mod") { pool in
            let migrator = SchemaMigrator(EventOutboxSchema.modules)
            let expected = [
                ModuleMigration(module: "event-store", version: 1, name: "events, outbox, snapshots"),
                ModuleMigration(module: "event-store", version: 2, name: "outbox: waiting rows by stream"),
                ModuleMigration(module: "outbox-relay", version: 1, name: "outbox dead letters"),
                ModuleMigration(module: "outbox-relay", version: 2, name: "dead letters: rows held behind another"),
            ]
            #expect(try await migrator.pending(pool) == expected)
            #expect(try await migrator.migrate(pool) == expected)
            #expect(try await migrator.pending(pool).isEmpty)
            #expect(try await migrator.migrate(pool).isEmpty)
            let recorded = try await pool.withConnection {
                try await $0.query("SELECT module || ' ' || version AS m FROM eventoutbox_schema_migrations ORDER BY applied_at, module, version")
                    .map { try $0.decode(String.self, "m") }
            }
            #expect(Set(recorded) == ["event-store 1", "event-store 2", "outbox-relay 1", "outbox-relay 2"])
            let legacy = try await pool.withConnection {
                try await $0.queryOne("SELECT to_regclass('eventoutbox_migrations') IS NULL AS absent").decode(Bool.self, "absent")
            }
            #expect(legacy, "a new schema gets no old bookkeeping")
        }
    }

    @Test("a failing migration names itself and leaves nothing of the run behind")
    func failingMigrationRollsBack() async throws {
        try await TestSchema.withPool("modfail") { pool in
            let broken = SchemaModule("broken", migrations: [
                SchemaMigration(version: 1, name: "a table", sql: "CREATE TABLE made_by_broken (id int)"),
                SchemaMigration(version: 2, name: "a typo", sql: "CREATE TABEL oops (id int)"),
            ])
            let migrator = SchemaMigrator(EventOutboxSchema.modules + [broken])
            let error = await #expect(throws: PQError.self) { try await migrator.migrate(pool) }
            #expect("\(String(describing: error))".contains("migration broken 2: a typo"), "\(String(describing: error))")
            #expect(try await migrator.pending(pool).count == 6, "nothing was recorded, the toolkit's modules included")
            let table = try await pool.withConnection {
                try await $0.queryOne("SELECT to_regclass('made_by_broken') IS NULL AS absent").decode(Bool.self, "absent")
            }
            #expect(table)
        }
    }

    @Test("a session that ends in the middle of a run leaves nothing of it behind; the next run applies everything")
    func sessionLostMidRun() async throws {
        try await TestSchema.withPool("modcut") { pool in
            // The third migration ends its own session, as a restart or a network cut would.
            let cut = SchemaModule("cut", dependencies: ["event-store"], migrations: [
                SchemaMigration(version: 1, name: "a table", sql: "CREATE TABLE made_before_the_cut (id int)"),
                SchemaMigration(version: 2, name: "the session ends", sql: "SELECT pg_terminate_backend(pg_backend_pid())"),
            ])
            await #expect(throws: (any Error).self) { try await SchemaMigrator(EventOutboxSchema.modules + [cut]).migrate(pool) }
            let migrator = SchemaMigrator(EventOutboxSchema.modules)
            #expect(try await migrator.pending(pool).count == 4, "nothing recorded")
            let table = try await pool.withConnection {
                try await $0.queryOne("SELECT to_regclass('made_before_the_cut') IS NULL AS absent").decode(Bool.self, "absent")
            }
            #expect(table, "nothing applied")
            #expect(try await migrator.migrate(pool).count == 4, "a new connection migrates the schema whole")
        }
    }

    /// A schema as 0.9.0 left it: its tables and `eventoutbox_migrations` with the given versions of the one old list.
    static func legacySchema(_ pool: PQPool, versions: [Int]) async throws {
        let old = SchemaMigrator.legacyMigrations
        let sql = Dictionary(uniqueKeysWithValues: EventOutboxSchema.modules.flatMap { module in
            module.migrations.map { ("\(module.name) \($0.version)", $0.sql) }
        })
        try await pool.withConnection { connection in
            try await connection.executeScript(
                "CREATE TABLE eventoutbox_migrations (version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            for version in versions {
                let migration = try #require(old[version])
                if let script = sql["\(migration.module) \(migration.version)"] { try await connection.executeScript(script) }
                try await connection.execute(
                    "INSERT INTO eventoutbox_migrations (version, name, applied_at) VALUES ($1, $2, '2026-11-01T00:00:00Z')",
                    [.int(version), .text(migration.name)])
            }
        }
    }

    @Test("a schema migrated by 0.9.0 is adopted as it is: its old versions become the modules' own, once")
    func legacyAdopted() async throws {
        try await TestSchema.withPool("modold") { pool in
            try await Self.legacySchema(pool, versions: [1, 2, 3])
            let migrator = SchemaMigrator(EventOutboxSchema.modules)
            // Read without writing: only the relay's second migration (the old version 4) is missing.
            let missing = [ModuleMigration(module: "outbox-relay", version: 2, name: "dead letters: rows held behind another")]
            #expect(try await migrator.pending(pool) == missing)
            #expect(try await migrator.migrate(pool) == missing)
            #expect(try await migrator.migrate(pool).isEmpty)
            try await pool.withConnection { connection in
                let adopted = try await connection.query(
                    "SELECT module || ' ' || version AS m FROM eventoutbox_schema_migrations WHERE applied_at = '2026-11-01T00:00:00Z'")
                    .map { try $0.decode(String.self, "m") }
                #expect(Set(adopted) == ["event-store 1", "outbox-relay 1", "event-store 2"], "adopted with their old time")
                let old = try await connection.queryOne("SELECT count(*) AS n FROM eventoutbox_migrations").decode(Int.self, "n")
                #expect(old == 3, "the old bookkeeping is left as it was, for older binaries")
                // The column the adopted-late migration added is there.
                try await connection.execute("SELECT held_behind FROM outbox_dead_letters")
            }
        }
    }

    @Test("old versions of a module that is not registered are adopted too; a version no release wrote is refused")
    func legacyOtherModulesAndUnknownVersions() async throws {
        try await TestSchema.withPool("modold") { pool in
            try await Self.legacySchema(pool, versions: [1, 2, 3, 4, 5, 6])
            #expect(try await SchemaMigrator(EventOutboxSchema.modules).migrate(pool).isEmpty)
            let service = try await pool.withConnection {
                try await $0.queryOne("SELECT count(*) AS n FROM eventoutbox_schema_migrations WHERE module = 'accounts-service'")
                    .decode(Int.self, "n")
            }
            #expect(service == 2, "the service finds its idempotency keys applied when it starts")
        }
        try await TestSchema.withPool("mododd") { otherPool in
            try await Self.legacySchema(otherPool, versions: [1])
            try await otherPool.withConnection {
                try await $0.execute("INSERT INTO eventoutbox_migrations (version, name) VALUES (7, 'by hand')")
            }
            let error = await #expect(throws: SchemaModuleError.self) { try await SchemaMigrator(EventOutboxSchema.modules).migrate(otherPool) }
            #expect(error?.message.contains("records version 7, which no version of EventOutbox wrote") == true, "\(String(describing: error))")
            let dryRun = await #expect(throws: SchemaModuleError.self) { try await SchemaMigrator(EventOutboxSchema.modules).pending(otherPool) }
            #expect(dryRun?.message.contains("records version 7") == true, "a dry run says so too")
        }
    }
}
