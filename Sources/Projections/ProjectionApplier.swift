import EventSourcing
import Foundation
import PostgresClient

/// Applies events to projections exactly once each: the handler's writes and the `_applied` record of
/// the event id commit in the same transaction, and an event id already recorded is skipped.
public struct ProjectionApplier: Sendable {
    public let projections: [Projection]
    public let registry: EventRegistry

    public init(projections: [Projection], registry: EventRegistry) {
        self.projections = projections
        self.registry = registry
    }

    /// What happened to one event, per projection.
    public struct Outcome: Sendable, Equatable {
        public var applied = 0
        public var duplicates = 0
    }

    /// Applies `recorded` to every projection inside the caller's transaction.
    /// - Throws: ``EventDecodingError`` if the event cannot be decoded (nothing written); database errors.
    public func apply(_ recorded: RecordedEvent, suffix: String = "", on connection: PostgresConnection) async throws -> Outcome {
        try await apply(recorded, decoded: try registry.decode(recorded), suffix: suffix, on: connection)
    }

    /// Applies an event already decoded by the caller (with ``registry``), so it is not decoded twice.
    public func apply(
        _ recorded: RecordedEvent, decoded event: any DomainEvent, suffix: String = "", on connection: PostgresConnection
    ) async throws -> Outcome {
        var outcome = Outcome()
        let context = ProjectionContext(connection: connection, suffix: suffix)
        for projection in projections {
            let inserted = try await connection.execute(
                "INSERT INTO \(SQLIdentifier.quoted(projection.appliedTable.name + suffix)) (event_id, position) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [.uuid(recorded.eventID), .int64(recorded.position)], statement: "projection: record \(projection.name)")
            if inserted == 0 {
                outcome.duplicates += 1
                continue
            }
            try await projection.apply(event, recorded, context)
            outcome.applied += 1
        }
        return outcome
    }
}
