import EventStore
import EventSourcing
import EventStoreSQL
import Foundation
import LibPQ

/// An outbox row waiting to be published.
public struct OutboxRow: Sendable, Hashable {
    public var id: Int64
    public var eventID: UUID
    public var streamID: String
    public var streamVersion: Int64
    public var topic: String
    public var key: String
    /// The JSON envelope (see `OutboxEnvelope`), the Kafka message value.
    public var envelope: String
    /// Kafka headers by name.
    public var headers: [String: String]
    public var createdAt: Date

    public init(
        id: Int64, eventID: UUID, streamID: String, streamVersion: Int64, topic: String, key: String, envelope: String,
        headers: [String: String], createdAt: Date
    ) {
        self.id = id
        self.eventID = eventID
        self.streamID = streamID
        self.streamVersion = streamVersion
        self.topic = topic
        self.key = key
        self.envelope = envelope
        self.headers = headers
        self.createdAt = createdAt
    }
}

extension OutboxRow {
    /// Reads a row of `outbox` (from a query, or an insert read from the WAL).
    /// - Throws: ``OutboxRowError`` when its headers are not a JSON object of strings; `PQError` when a
    ///   column is missing or does not decode.
    public init(row: PQRow) throws {
        let id = try row.decode(Int64.self, "id")
        let headersText = try row.decode(String.self, "headers")
        guard let headers = JSONText.stringObject(headersText) else {
            throw OutboxRowError(outboxID: id, reason: "its headers are not a JSON object of strings: \(headersText.prefix(200))")
        }
        self.init(
            id: id,
            eventID: try row.decode(UUID.self, "event_id"),
            streamID: try row.decode(String.self, "stream_id"),
            streamVersion: try row.decode(Int64.self, "stream_version"),
            topic: try row.decode(String.self, "topic"),
            key: try row.decode(String.self, "message_key"),
            envelope: try row.decode(String.self, "envelope"),
            headers: headers,
            createdAt: try row.decode(Date.self, "created_at"))
    }
}

/// A share of the outbox's streams, for relays that split the work (`outbox-relay --partitions N`).
///
/// A stream's partition is a stable hash of its id computed by PostgreSQL (`hashtext`), so every relay of a
/// database agrees, whatever it runs on.
public struct OutboxPartitions: Sendable, Hashable {
    /// How many partitions the streams are split into: the same for every relay of one database.
    public var count: Int
    /// The partitions meant, each in `0 ..< count`.
    public var owned: [Int]

    public init(count: Int, owned: [Int]) {
        precondition(count >= 1, "partition count must be at least 1")
        precondition(owned.allSatisfy { (0..<count).contains($0) }, "partitions must lie in 0..<\(count)")
        self.count = count
        self.owned = owned
    }

    /// Every stream.
    public static let all = OutboxPartitions(count: 1, owned: [0])

    /// The SQL expression of a stream's partition (0 ..< count); `hashtext` is int4, shifted to be non-negative.
    public static func sql(_ streamColumn: String, count: String) -> String {
        "mod(hashtext(\(streamColumn))::bigint + 2147483648, \(count))::int"
    }

    /// The partition of one stream, as PostgreSQL computes it.
    public static func partition(of streamID: String, count: Int, on connection: PQConnection) async throws -> Int {
        try await connection.queryOne(
            "SELECT \(sql("$1::text", count: "$2::int")) AS p", [.text(streamID), .int(count)], statement: "outbox: stream partition"
        ).decode(Int.self, "p")
    }
}

/// An outbox row that cannot be read as written.
public struct OutboxRowError: Error, CustomStringConvertible {
    public var outboxID: Int64
    public var reason: String
    public var description: String { "outbox row \(outboxID) cannot be published: \(reason); fix or dead-letter it by hand" }
}

/// A row the relay could not publish for a reason retrying will not fix; its stream is held back until it
/// is retried.
public struct DeadLetter: Sendable, Hashable, Codable {
    public var outboxID: Int64
    public var eventID: UUID
    public var streamID: String
    public var streamVersion: Int64
    public var topic: String
    public var error: String
    public var failedAt: Date
    /// Size of the message value in bytes.
    public var envelopeBytes: Int
}

/// How the outbox stands.
public struct OutboxStatus: Sendable, Hashable, Codable {
    public var waiting: Int
    /// Seconds since the oldest waiting row was written (0 when none waits).
    public var oldestWaitingAgeSeconds: Double
    public var deadLetters: Int
    public var published: Int
}

/// The SQL of the outbox: what the relay and the admin tool do to it.
public struct OutboxTable: Sendable {
    public init() {}

    /// Waiting rows with ids above `cursor`, in id order, skipping streams that have a dead letter (their
    /// later rows wait so that the stream's order is kept).
    ///
    /// A cursor can pass a row whose transaction took a lower id and commits later; see
    /// ``streamsWithWaitingRows(in:on:)`` for how a relay finds such holes.
    ///
    /// - Parameters:
    ///   - cursor: 0 for a full scan; else the highest id the caller has already taken.
    ///   - alsoIDs: ids below the cursor to look at again (ids a cursor skipped: their transactions may
    ///     commit later); those still waiting come first.
    ///   - limit: the most rows to return.
    ///   - partitions: only streams of these partitions (``OutboxPartitions``); every stream by default.
    ///   - connection: the relay's connection.
    public func waitingRows(
        after cursor: Int64, alsoIDs: [Int64] = [], limit: Int, partitions: OutboxPartitions = .all,
        on connection: PQConnection
    ) async throws -> [OutboxRow] {
        try await selectWaiting(
            alsoIDs.isEmpty ? ["o.id > $2"] : ["o.id > $2", "o.id = ANY($3::bigint[])"],
            alsoIDs.isEmpty ? [.int64(cursor)] : [.int64(cursor), .int64Array(alsoIDs)], limit: limit,
            partitions: partitions, statement: "outbox: waiting rows", on: connection)
    }

    /// Waiting rows with ids up to `cursor` other than `excluded` (the rows a relay has in flight), in id order:
    /// the rows a cursor passed while their transactions were still open, and rows a relay held back behind
    /// them. Lets a busy relay catch up on those without waiting for its pipeline to empty.
    public func waitingRows(
        through cursor: Int64, excluding excluded: [Int64], limit: Int, partitions: OutboxPartitions = .all,
        on connection: PQConnection
    ) async throws -> [OutboxRow] {
        try await selectWaiting(
            ["o.id <= $2 AND NOT EXISTS (SELECT 1 FROM unnest($3::bigint[]) AS f(id) WHERE f.id = o.id)"],
            [.int64(cursor), .int64Array(excluded)], limit: limit, partitions: partitions,
            statement: "outbox: waiting rows behind the cursor", on: connection)
    }

    /// The one shape of every fetch: waiting rows matching any of `conditions` (each an index-friendly branch
    /// of its own, so no branch turns the ordered scan into a sort of the whole backlog), in id order. `$1` is
    /// the limit; the conditions use `binds` as `$2`, `$3`, ...
    private func selectWaiting(
        _ conditions: [String], _ binds: [PQBind], limit: Int, partitions: OutboxPartitions, statement: String,
        on connection: PQConnection
    ) async throws -> [OutboxRow] {
        let partitionCount = "$\(binds.count + 2)::int"
        let filters = """
            o.published_at IS NULL
              AND (\(partitionCount) = 1
                   OR \(OutboxPartitions.sql("o.stream_id", count: partitionCount)) = ANY($\(binds.count + 3)::int[]))
              AND NOT EXISTS (SELECT 1 FROM outbox_dead_letters d WHERE d.stream_id = o.stream_id)
            """
        let branches = conditions.map { "(SELECT o.* FROM outbox o WHERE \($0) AND \(filters) ORDER BY o.id LIMIT $1)" }
        return try await connection.query(
            """
            SELECT o.id, o.event_id, o.stream_id, o.stream_version, o.topic, o.message_key, o.envelope,
                   o.headers::text AS headers, o.created_at
            FROM (\(branches.joined(separator: " UNION ALL "))) o
            ORDER BY o.id
            LIMIT $1
            """,
            [.int(limit)] + binds + [.int(partitions.count), .int32Array(partitions.owned.map(Int32.init))],
            statement: statement
        ).map(OutboxRow.init(row:))
    }

    /// A question about one stream: does it have a waiting row with an id strictly between `afterID` and
    /// `beforeID`?
    public struct StreamRange: Sendable, Hashable {
        public var streamID: String
        public var afterID: Int64
        public var beforeID: Int64
        public init(streamID: String, afterID: Int64, beforeID: Int64) {
            self.streamID = streamID
            self.afterID = afterID
            self.beforeID = beforeID
        }
    }

    /// Of the given ranges, the streams that have a waiting row inside theirs: one statement for any number.
    /// A relay asks this for a row it is about to send whose predecessor it has not sent itself; a waiting row
    /// in between is a hole (a late commit) that must go first.
    public func streamsWithWaitingRows(in ranges: [StreamRange], on connection: PQConnection) async throws -> Set<String> {
        guard !ranges.isEmpty else { return [] }
        return Set(
            try await connection.query(
                """
                SELECT s.stream_id FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS s(stream_id, after_id, before_id)
                WHERE EXISTS (SELECT 1 FROM outbox p WHERE p.stream_id = s.stream_id AND p.published_at IS NULL
                                AND p.id > s.after_id AND p.id < s.before_id)
                """,
                [.textArray(ranges.map(\.streamID)), .int64Array(ranges.map(\.afterID)), .int64Array(ranges.map(\.beforeID))],
                statement: "outbox: holes before rows"
            ).map { try $0.decode(String.self, "stream_id") })
    }

    /// Where a row was stored in Kafka.
    public struct Delivery: Sendable, Hashable {
        public var id: Int64
        public var partition: Int32
        public var offset: Int64
        public init(id: Int64, partition: Int32, offset: Int64) {
            self.id = id
            self.partition = partition
            self.offset = offset
        }
    }

    /// Marks rows as published, with their partition and offset: one statement of fixed shape (arrays), so
    /// one prepared statement serves every batch size.
    public func markPublished(_ deliveries: [Delivery], on connection: PQConnection) async throws {
        guard !deliveries.isEmpty else { return }
        try await connection.execute(
            """
            UPDATE outbox o SET published_at = clock_timestamp(), kafka_partition = d.p, kafka_offset = d.off
            FROM unnest($1::bigint[], $2::int[], $3::bigint[]) AS d(id, p, off) WHERE o.id = d.id
            """,
            [.int64Array(deliveries.map(\.id)), .int32Array(deliveries.map(\.partition)),
             .int64Array(deliveries.map(\.offset))],
            statement: "outbox: mark published")
    }

    /// Marks rows that Kafka holds but whose partition and offset are not known here (an exactly-once relay
    /// recovering its last transaction from the progress topic). Rows already marked keep their marks; ids no
    /// longer in the outbox are skipped. Returns how many rows were marked.
    @discardableResult
    public func markPublished(ids: [Int64], on connection: PQConnection) async throws -> Int {
        guard !ids.isEmpty else { return 0 }
        return try await connection.execute(
            "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1::bigint[]) AND published_at IS NULL",
            [.int64Array(ids)], statement: "outbox: mark recovered as published")
    }

    /// Deletes published rows at once instead of marking them (for relays run with no retention).
    public func deletePublished(_ deliveries: [Delivery], on connection: PQConnection) async throws {
        guard !deliveries.isEmpty else { return }
        try await connection.execute(
            "DELETE FROM outbox WHERE id = ANY($1::bigint[])", [.int64Array(deliveries.map(\.id))],
            statement: "outbox: delete published")
    }

    /// Deletes rows by id (an exactly-once relay with `--delete-published` recovering its last transaction).
    /// Returns how many were deleted.
    @discardableResult
    public func deletePublishedIDs(_ ids: [Int64], on connection: PQConnection) async throws -> Int {
        guard !ids.isEmpty else { return 0 }
        return try await connection.execute(
            "DELETE FROM outbox WHERE id = ANY($1::bigint[])", [.int64Array(ids)], statement: "outbox: delete recovered")
    }

    /// Moves a row to the dead-letter table with the reason. Returns `false` if the row is not in the outbox.
    @discardableResult
    public func moveToDeadLetters(_ id: Int64, error: String, on connection: PQConnection) async throws -> Bool {
        try await connection.execute(
            """
            WITH moved AS (DELETE FROM outbox WHERE id = $1 RETURNING *)
            INSERT INTO outbox_dead_letters
                (outbox_id, event_id, stream_id, stream_version, topic, message_key, envelope, headers, created_at, error)
            SELECT id, event_id, stream_id, stream_version, topic, message_key, envelope, headers, created_at, $2
            FROM moved
            """, [.int64(id), .text(error)], statement: "outbox: dead-letter") == 1
    }

    /// Records a row as a dead letter from its content, and deletes it from the outbox if it is still there:
    /// for relays that read rows from the WAL, where the outbox row may already be gone. Recording the same
    /// row twice keeps the first record.
    /// - Parameters:
    ///   - row: the row, as read.
    ///   - error: why it is set aside.
    ///   - heldBehind: for a row that did not fail itself but follows a dead letter of its stream:
    ///     that dead letter's outbox id (retrying it retries this row too).
    ///   - connection: the relay's connection.
    public func deadLetter(_ row: OutboxRow, error: String, heldBehind: Int64? = nil, on connection: PQConnection)
        async throws
    {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let headers = String(decoding: try encoder.encode(row.headers), as: UTF8.self)
        try await connection.execute(
            """
            WITH gone AS (DELETE FROM outbox WHERE id = $1)
            INSERT INTO outbox_dead_letters
                (outbox_id, event_id, stream_id, stream_version, topic, message_key, envelope, headers, created_at, error, held_behind)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11)
            ON CONFLICT (outbox_id) DO NOTHING
            """,
            [.int64(row.id), .uuid(row.eventID), .text(row.streamID), .int64(row.streamVersion), .text(row.topic), .text(row.key),
             .text(row.envelope), .text(headers), .timestamp(row.createdAt), .text(error), heldBehind.map { .int64($0) } ?? .null],
            statement: "outbox: dead-letter row")
    }

    /// The dead letters of one stream that hold it back: the lowest stream version and its outbox id, or `nil`
    /// when the stream has none.
    public func firstDeadLetter(ofStream streamID: String, on connection: PQConnection) async throws
        -> (outboxID: Int64, streamVersion: Int64)?
    {
        try await connection.query(
            "SELECT outbox_id, stream_version FROM outbox_dead_letters WHERE stream_id = $1 ORDER BY stream_version, outbox_id LIMIT 1",
            [.text(streamID)], statement: "outbox: first dead letter of stream"
        ).first.map { (try $0.decode(Int64.self, "outbox_id"), try $0.decode(Int64.self, "stream_version")) }
    }

    /// Every stream that has a dead letter.
    public func streamsWithDeadLetters(on connection: PQConnection) async throws -> Set<String> {
        Set(
            try await connection.query("SELECT DISTINCT stream_id FROM outbox_dead_letters", statement: "outbox: dead-lettered streams")
                .map { try $0.decode(String.self, "stream_id") })
    }

    /// Puts a dead letter back into the outbox under its original id (so it goes before its stream's later
    /// rows), with the rows held behind it (`--source wal`), in id order.
    /// - Returns: `false` if there is no dead letter with that id.
    public func retryDeadLetter(_ outboxID: Int64, on connection: PQConnection) async throws -> Bool {
        try await connection.withTransaction { tx in
            let moved = try await tx.execute(
                """
                WITH moved AS (
                    DELETE FROM outbox_dead_letters
                    WHERE outbox_id = $1 OR (held_behind = $1 AND EXISTS (SELECT 1 FROM outbox_dead_letters WHERE outbox_id = $1))
                    RETURNING *)
                INSERT INTO outbox (id, event_id, stream_id, stream_version, topic, message_key, envelope, headers, created_at)
                OVERRIDING SYSTEM VALUE
                SELECT outbox_id, event_id, stream_id, stream_version, topic, message_key, envelope, headers, created_at
                FROM moved ORDER BY outbox_id
                """, [.int64(outboxID)], statement: "outbox: retry dead letter")
            if moved > 0 {
                try await tx.notify(EventTables.outboxChannel, payload: "1")
            }
            return moved > 0
        }
    }

    public func deadLetters(on connection: PQConnection) async throws -> [DeadLetter] {
        try await connection.query(
            """
            SELECT outbox_id, event_id, stream_id, stream_version, topic, error, failed_at, octet_length(envelope) AS bytes
            FROM outbox_dead_letters ORDER BY outbox_id
            """, statement: "outbox: list dead letters"
        ).map { row in
            DeadLetter(
                outboxID: try row.decode(Int64.self, "outbox_id"), eventID: try row.decode(UUID.self, "event_id"),
                streamID: try row.decode(String.self, "stream_id"),
                streamVersion: try row.decode(Int64.self, "stream_version"), topic: try row.decode(String.self, "topic"),
                error: try row.decode(String.self, "error"), failedAt: try row.decode(Date.self, "failed_at"),
                envelopeBytes: try row.decode(Int.self, "bytes"))
        }
    }

    public func status(on connection: PQConnection) async throws -> OutboxStatus {
        let row = try await connection.queryOne(
            """
            SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS waiting,
                   COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - (SELECT min(created_at) FROM outbox WHERE published_at IS NULL)), 0)::text AS age,
                   (SELECT count(*) FROM outbox_dead_letters) AS dead,
                   (SELECT count(*) FROM outbox WHERE published_at IS NOT NULL) AS published
            """, statement: "outbox: status"
        )
        return OutboxStatus(
            waiting: try row.decode(Int.self, "waiting"),
            oldestWaitingAgeSeconds: Double(try row.decode(String.self, "age")) ?? 0,
            deadLetters: try row.decode(Int.self, "dead"),
            published: try row.decode(Int.self, "published"))
    }

    /// Deletes up to `limit` rows published more than `olderThan` ago. Returns how many it deleted.
    public func deletePublished(olderThan: Duration, limit: Int, on connection: PQConnection) async throws -> Int {
        try await connection.execute(
            """
            DELETE FROM outbox WHERE id IN (
                SELECT id FROM outbox WHERE published_at IS NOT NULL
                  AND published_at < clock_timestamp() - make_interval(secs => $1::float8)
                ORDER BY published_at LIMIT $2)
            """, [.text(String(Double(olderThan.components.seconds))), .int(limit)], statement: "outbox: retention")
    }

    /// Deletes up to `limit` rows written more than `olderThan` ago, published or not: for relays that read
    /// the WAL, which holds every insert (the rows are a convenience for inspection). Returns how many it deleted.
    public func deleteRows(olderThan: Duration, limit: Int, on connection: PQConnection) async throws -> Int {
        try await connection.execute(
            """
            DELETE FROM outbox WHERE id IN (
                SELECT id FROM outbox WHERE created_at < clock_timestamp() - make_interval(secs => $1::float8)
                ORDER BY id LIMIT $2)
            """, [.text(String(Double(olderThan.components.seconds))), .int(limit)], statement: "outbox: retention (wal)")
    }
}
