import EventStore
import Foundation
import LibPQ

/// The PostgreSQL side of publishing the outbox from the write-ahead log (`outbox-relay --source wal`): a
/// publication of the outbox's inserts and a logical replication slot with the built-in `pgoutput` plugin.
///
/// The slot keeps every insert committed after its creation until a relay confirms it; so create it before
/// the first event that must go out through it (``setUp(on:)``, or `eventoutbox migrate --wal`).
public struct OutboxWAL: Sendable, Hashable {
    /// The publication: inserts into this schema's `outbox`. Default: `eventoutbox_outbox`.
    public var publication: String
    /// The logical replication slot. Default: `eventoutbox_outbox`.
    public var slot: String

    public static let defaultName = "eventoutbox_outbox"

    /// - Throws: `PQError` when a name is not 1 to 63 lower-case letters, digits and underscores.
    public init(publication: String = OutboxWAL.defaultName, slot: String = OutboxWAL.defaultName) throws {
        try ReplicationNames.validate(publication, what: "publication")
        try ReplicationNames.validate(slot, what: "replication slot")
        self.publication = publication
        self.slot = slot
    }

    /// How the slot stands.
    public struct SlotStatus: Sendable, Hashable, Codable {
        public var slot: String
        public var plugin: String
        /// Whether a relay is streaming from it now.
        public var active: Bool
        /// Everything before this position has been confirmed by a relay (`confirmed_flush_lsn`).
        public var confirmedFlushLSN: String?
        /// WAL the server keeps for this slot, in bytes (from `restart_lsn` to the current position).
        public var retainedBytes: Int64
        /// WAL not yet confirmed, in bytes (from `confirmed_flush_lsn` to the current position).
        public var unconfirmedBytes: Int64
    }

    /// Everything `--source wal` needs, as found in the database.
    public struct Status: Sendable, Hashable, Codable {
        public var walLevel: String
        public var publicationExists: Bool
        /// Whether the publication covers this schema's `outbox`.
        public var publicationCoversOutbox: Bool
        public var slot: SlotStatus?
        /// This connection's schema, the one whose `outbox` is published.
        public var schema: String
    }

    /// Setup problems, each with what to do.
    public func problems(in status: Status) -> [String] {
        var problems: [String] = []
        if status.walLevel != "logical" {
            problems.append(
                "wal_level is '\(status.walLevel)', logical replication needs 'logical': set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL")
        }
        if !status.publicationExists {
            problems.append("publication '\(publication)' does not exist: run `eventoutbox migrate --wal`")
        } else if !status.publicationCoversOutbox {
            problems.append(
                "publication '\(publication)' does not include \(status.schema).outbox: ALTER PUBLICATION \(publication) ADD TABLE \(status.schema).outbox, or pick another --publication")
        }
        if let slot = status.slot {
            if slot.plugin != "pgoutput" {
                problems.append("replication slot '\(self.slot)' uses plugin '\(slot.plugin)', not pgoutput: drop it (`eventoutbox wal drop-slot`) and run `eventoutbox migrate --wal`")
            }
        } else {
            problems.append("replication slot '\(self.slot)' does not exist: run `eventoutbox migrate --wal`")
        }
        return problems
    }

    public func status(on connection: PQConnection) async throws -> Status {
        let row = try await connection.queryOne(
            """
            SELECT current_setting('wal_level') AS wal_level, current_schema() AS schema,
                   EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1) AS publication,
                   EXISTS (SELECT 1 FROM pg_publication_tables
                           WHERE pubname = $1 AND schemaname = current_schema() AND tablename = 'outbox') AS covers
            """, [.text(publication)], statement: "wal: setup status"
        )
        let slotRow = try await connection.query(
            """
            SELECT plugin, active, confirmed_flush_lsn::text AS confirmed,
                   COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint AS retained,
                   COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint AS unconfirmed
            FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()
            """, [.text(slot)], statement: "wal: slot status"
        ).first
        return Status(
            walLevel: try row.decode(String.self, "wal_level"),
            publicationExists: try row.decode(Bool.self, "publication"),
            publicationCoversOutbox: try row.decode(Bool.self, "covers"),
            slot: try slotRow.map { row in
                SlotStatus(
                    slot: slot, plugin: try row.decode(String.self, "plugin"), active: try row.decode(Bool.self, "active"),
                    confirmedFlushLSN: try row.decodeIfPresent(String.self, "confirmed"),
                    retainedBytes: try row.decode(Int64.self, "retained"), unconfirmedBytes: try row.decode(Int64.self, "unconfirmed"))
            },
            schema: try row.decode(String.self, "schema"))
    }

    /// Creates the publication (inserts into this schema's `outbox` only: retention's deletes are not
    /// streamed) and the slot, each unless it exists. Returns what it created.
    /// - Throws: ``WALSetupError`` when `wal_level` is not `logical`; `PQError` when the role may
    ///   not create them (it needs `REPLICATION` and ownership of `outbox`, or superuser).
    @discardableResult
    public func setUp(on connection: PQConnection) async throws -> [String] {
        var status = try await status(on: connection)
        guard status.walLevel == "logical" else { throw WALSetupError(problems: [problems(in: status)[0]]) }
        var created: [String] = []
        if !status.publicationExists {
            try await connection.executeScript(
                "CREATE PUBLICATION \(publication) FOR TABLE outbox WITH (publish = 'insert')",
                statement: "wal: create publication")
            created.append("publication \(publication)")
        }
        if status.slot == nil {
            try await connection.query(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", [.text(slot)], statement: "wal: create slot")
            created.append("replication slot \(slot)")
        }
        status = try await self.status(on: connection)
        let remaining = problems(in: status)
        guard remaining.isEmpty else { throw WALSetupError(problems: remaining) }
        return created
    }

    /// Drops the slot: the server frees the WAL it kept. Inserts not yet confirmed will not be published from
    /// the log (the outbox rows remain until retention). Returns `false` if there was no such slot.
    /// - Throws: `PQError` with SQLSTATE 55006 while a relay is streaming from it.
    public func dropSlot(on connection: PQConnection) async throws -> Bool {
        try await connection.query(
            """
            SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
            WHERE slot_name = $1 AND database = current_database()
            """, [.text(slot)], statement: "wal: drop slot"
        ).count == 1
    }

    /// Drops the publication if it exists.
    public func dropPublication(on connection: PQConnection) async throws {
        try await connection.executeScript("DROP PUBLICATION IF EXISTS \(publication)", statement: "wal: drop publication")
    }
}

/// The database is not ready for `--source wal`; each problem says what to do.
public struct WALSetupError: Error, CustomStringConvertible {
    public var problems: [String]
    public init(problems: [String]) { self.problems = problems }
    public var description: String { "publishing from the WAL is not set up: " + problems.joined(separator: "; ") }
}
