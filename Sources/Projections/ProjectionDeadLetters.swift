import EventSourcing
import Foundation
import PostgresClient

/// A Kafka record a projection consumer could not apply, as stored in `projection_dead_letters`.
public struct ProjectionDeadLetter: Sendable, Codable, Equatable {
    public var id: Int64
    /// The consumer group that dead-lettered it.
    public var consumer: String
    public var topic: String
    public var partition: Int32
    public var offset: Int64
    public var key: [UInt8]?
    /// The record's value, byte for byte.
    public var value: [UInt8]?
    public var reason: String
    public var receivedAt: Date

    init(row: PostgresRow) throws {
        id = try row.decode(Int64.self, "id")
        consumer = try row.decode(String.self, "consumer")
        topic = try row.decode(String.self, "topic")
        partition = try row.decode(Int32.self, "partition")
        offset = try row.decode(Int64.self, "offset")
        key = try row.decodeIfPresent([UInt8].self, "key")
        value = try row.decodeIfPresent([UInt8].self, "value")
        reason = try row.decode(String.self, "reason")
        receivedAt = try row.decode(Date.self, "received_at")
    }
}

/// Inspecting and retrying `projection_dead_letters`.
public enum ProjectionDeadLetters {
    private static let columns = "id, consumer, topic, partition, \"offset\", key, value, reason, received_at"

    /// Every dead letter (of `consumer`'s group, if given), oldest first.
    public static func list(consumer: String? = nil, on connection: PostgresConnection) async throws -> [ProjectionDeadLetter] {
        try await connection.query(
            "SELECT \(columns) FROM projection_dead_letters WHERE $1::text IS NULL OR consumer = $1 ORDER BY id",
            [.text(consumer)], statement: "projection dead letters: list"
        ).map(ProjectionDeadLetter.init(row:))
    }

    /// The dead letter `id`, or `nil`.
    public static func find(_ id: Int64, on connection: PostgresConnection) async throws -> ProjectionDeadLetter? {
        try await connection.query(
            "SELECT \(columns) FROM projection_dead_letters WHERE id = $1", [.int64(id)], statement: "projection dead letters: find"
        ).first.map(ProjectionDeadLetter.init(row:))
    }

    /// Applies dead letter `id` to `applier`'s projections and deletes it, in one transaction: once the cause is
    /// fixed (a handler, a registered type, an upcaster). It is applied even though later events of its stream
    /// were applied since (it never was: the transaction that failed on it wrote nothing).
    /// - Returns: the outcome, or `nil` if there is no dead letter `id`.
    /// - Throws: why it still cannot be applied (nothing changes then): ``EventDecodingError``, the handler's error.
    public static func retry(_ id: Int64, with applier: ProjectionApplier, on connection: PostgresConnection) async throws
        -> ProjectionApplier.Outcome?
    {
        try await connection.withTransaction { tx -> ProjectionApplier.Outcome? in
            guard
                let letter = try await tx.query(
                    "SELECT \(columns) FROM projection_dead_letters WHERE id = $1 FOR UPDATE", [.int64(id)],
                    statement: "projection dead letters: lock"
                ).first.map(ProjectionDeadLetter.init(row:))
            else { return nil }
            guard let value = letter.value else { throw EnvelopeError("dead letter \(id) has no value to apply") }
            let recorded = try OutboxEnvelope.recordedEvent(from: value)
            let event = ProjectedEvent(event: try applier.registry.decode(recorded), recorded: recorded, topic: letter.topic)
            let outcome = try await applier.apply([event], evenIfBehind: true, on: tx)
            try await tx.execute("DELETE FROM projection_dead_letters WHERE id = $1", [.int64(id)], statement: "projection dead letters: delete")
            return outcome
        }
    }
}
