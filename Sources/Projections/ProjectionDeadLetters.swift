import EventSourcing
import Foundation
import LibPQ

/// An event a projection could not apply, as stored in `projection_dead_letters`: a Kafka record (from a
/// consumer), or an event replayed from the event store (by a back-fill or a rebuild: `partition` -1, `offset`
/// its position in the store, `topic` empty).
public struct ProjectionDeadLetter: Sendable, Codable, Equatable {
    public var id: Int64
    /// The consumer group that dead-lettered it, or `rebuild` for a back-fill or rebuild.
    public var consumer: String
    /// The projection that refused it; `nil` when no projection can take it (it does not decode).
    public var projection: String?
    public var topic: String
    public var partition: Int32
    public var offset: Int64
    public var key: [UInt8]?
    /// The record's value, byte for byte.
    public var value: [UInt8]?
    /// The record's headers with text values (a CloudEvent's attributes are there).
    public var headers: [String: String]
    public var reason: String
    public var receivedAt: Date

    init(row: PQRow) throws {
        id = try row.decode(Int64.self, "id")
        consumer = try row.decode(String.self, "consumer")
        projection = try row.decodeIfPresent(String.self, "projection")
        topic = try row.decode(String.self, "topic")
        partition = try row.decode(Int32.self, "partition")
        offset = try row.decode(Int64.self, "offset")
        key = try row.decodeIfPresent([UInt8].self, "key")
        value = try row.decodeIfPresent([UInt8].self, "value")
        let headersText = try row.decodeIfPresent(String.self, "headers")
        headers = headersText.flatMap { JSONText.stringObject($0) } ?? [:]
        reason = try row.decode(String.self, "reason")
        receivedAt = try row.decode(Date.self, "received_at")
    }

    /// Where the event came from: `topic/partition@offset`, or `event store @position`.
    public var origin: String { partition < 0 ? "event store @\(offset)" : "\(topic)/\(partition)@\(offset)" }
}

/// Inspecting and retrying `projection_dead_letters`.
public enum ProjectionDeadLetters {
    private static let columns = "id, consumer, projection, topic, partition, \"offset\", key, value, headers::text AS headers, reason, received_at"

    /// Stores a dead letter (inside the caller's transaction, if any).
    static func record(
        consumer: String, projection: String?, topic: String, partition: Int32, offset: Int64, key: [UInt8]?, value: [UInt8]?,
        headers: [String: String] = [:], reason: String, on connection: PQConnection
    ) async throws {
        let headersJSON = JSONText.object(headers.sorted { $0.key < $1.key }.map { (key: $0.key, json: JSONText.string($0.value)) })
        try await connection.execute(
            "INSERT INTO projection_dead_letters (consumer, projection, topic, partition, \"offset\", key, value, headers, reason) "
                + "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9)",
            [.text(consumer), .text(projection), .text(topic), .int32(partition), .int64(offset),
             key.map(PQBind.bytea) ?? .null, value.map(PQBind.bytea) ?? .null, .text(headersJSON), .text(reason)],
            statement: "projection: dead-letter")
    }

    /// Every dead letter (of `consumer`'s group, if given), oldest first.
    public static func list(consumer: String? = nil, on connection: PQConnection) async throws -> [ProjectionDeadLetter] {
        try await connection.query(
            "SELECT \(columns) FROM projection_dead_letters WHERE $1::text IS NULL OR consumer = $1 ORDER BY id",
            [.text(consumer)], statement: "projection dead letters: list"
        ).map(ProjectionDeadLetter.init(row:))
    }

    /// The dead letter `id`, or `nil`.
    public static func find(_ id: Int64, on connection: PQConnection) async throws -> ProjectionDeadLetter? {
        try await connection.query(
            "SELECT \(columns) FROM projection_dead_letters WHERE id = $1", [.int64(id)], statement: "projection dead letters: find"
        ).first.map(ProjectionDeadLetter.init(row:))
    }

    /// Applies dead letter `id` and deletes it, in one transaction: once the cause is fixed (a handler, a
    /// registered type, an upcaster). It goes to the projection that refused it, or to all of `applier`'s when
    /// none is named. It is applied even though later events of its stream were applied since (it never was:
    /// the transaction that failed on it wrote nothing).
    /// - Returns: the outcome, or `nil` if there is no dead letter `id`.
    /// - Throws: why it still cannot be applied (nothing changes then): `EventDecodingError`, the handler's
    ///   error, or ``DeadLetterProjectionUnknown`` when `applier` lacks the projection it names.
    public static func retry(_ id: Int64, with applier: ProjectionApplier, on connection: PQConnection) async throws
        -> ProjectionApplier.Outcome?
    {
        try await connection.withTransaction { tx -> ProjectionApplier.Outcome? in
            guard
                let letter = try await tx.query(
                    "SELECT \(columns) FROM projection_dead_letters WHERE id = $1 FOR UPDATE", [.int64(id)],
                    statement: "projection dead letters: lock"
                ).first.map(ProjectionDeadLetter.init(row:))
            else { return nil }
            guard letter.value != nil else { throw EnvelopeError("dead letter \(id) has no value to apply") }
            let recorded = try ProjectionConsumer.recordedEvent(headers: letter.headers, value: letter.value)
            // Replayed from the store: its source is the store's (topic nil), as in the rebuild that refused it.
            let topic = letter.partition < 0 ? nil : letter.topic
            let event = ProjectedEvent(event: try applier.registry.decode(recorded), recorded: recorded, topic: topic)
            var target = applier
            if let name = letter.projection {
                guard let projection = applier.projections.first(where: { $0.name == name }) else {
                    throw DeadLetterProjectionUnknown(id: id, projection: name, known: applier.projections.map(\.name))
                }
                target = applier.only(projection)
            }
            let outcome = try await target.apply([event], evenIfBehind: true, on: tx)
            try await tx.execute("DELETE FROM projection_dead_letters WHERE id = $1", [.int64(id)], statement: "projection dead letters: delete")
            return outcome
        }
    }
}

/// A dead letter names a projection the applier retrying it does not have.
public struct DeadLetterProjectionUnknown: Error, CustomStringConvertible, Sendable {
    public var id: Int64
    public var projection: String
    public var known: [String]
    public var description: String {
        "dead letter \(id) was refused by projection '\(projection)', which this program does not have (it has: "
            + "\(known.joined(separator: ", "))); retry it with the program that runs that projection"
    }
}
