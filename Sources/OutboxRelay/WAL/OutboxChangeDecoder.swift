import EventStore
import Foundation
import OutboxRelayStore
import LibPQ

/// What a WAL relay does something about, read from the replication stream.
enum WALChange: Sendable {
    /// The server has sent everything before `walEnd`.
    case keepalive(walEnd: PostgresLSN, replyRequested: Bool)
    case begin(commitTime: Date)
    /// An insert into the outbox, read.
    case row(OutboxRow)
    /// An insert into the outbox that cannot be read as an outbox row.
    case unreadable(outboxID: Int64, reason: String)
    case commit(endLSN: PostgresLSN)
    /// Anything else (other tables, relation and type descriptions): only its position counts.
    case other

    var isRow: Bool {
        if case .row = self { return true }
        return false
    }
}

/// Turns replication messages into outbox changes. Pure and `Sendable`, so a relay can decode the next batch
/// on another thread while it hands the current one to Kafka.
struct OutboxChangeDecoder: Sendable {
    /// The schema whose `outbox` is published (a publication may name other tables).
    let schema: String
    private var relations: [UInt32: PgOutputRelation] = [:]
    /// The highest position read so far.
    private(set) var received = PostgresLSN.zero

    init(schema: String) { self.schema = schema }

    mutating func decode(_ messages: [ReplicationMessage]) throws -> [WALChange] {
        var changes: [WALChange] = []
        changes.reserveCapacity(messages.count)
        for message in messages {
            switch message {
            case .keepalive(let walEnd, let reply):
                received = max(received, walEnd)
                changes.append(.keepalive(walEnd: walEnd, replyRequested: reply))
            case .xLogData(let start, _, let payload):
                received = max(received, start)
                changes.append(try decode(PgOutputMessage.decode(payload)))
            }
        }
        return changes
    }

    private mutating func decode(_ message: PgOutputMessage) throws -> WALChange {
        switch message {
        case .begin(_, let commitTime, _):
            return .begin(commitTime: commitTime)
        case .commit(_, let endLSN, _):
            return .commit(endLSN: endLSN)
        case .relation(let relation):
            relations[relation.id] = relation
            return .other
        case .insert(let relationID, let values):
            guard let relation = relations[relationID] else {
                throw PQError(code: .decoding, message: "pgoutput sent an insert for relation \(relationID) before describing it")
            }
            guard relation.name == "outbox", relation.namespace == schema else { return .other }
            let row = try relation.row(values)
            do {
                return .row(try OutboxRow(row: row))
            } catch {
                return .unreadable(outboxID: try row.decode(Int64.self, "id"), reason: "\(error)")
            }
        case .other:
            return .other
        }
    }
}
