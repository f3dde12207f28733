import EventSourcing
import EventStore
import Foundation
import LibPQ

/// A small event for relay tests.
public struct Tick: DomainEvent, Hashable {
    public static let eventType = "Tick"
    public var n: Int
    public var filler: String
    public init(n: Int, filler: String = "") {
        self.n = n
        self.filler = filler
    }
}

extension TestEventStore {
    /// Appends `perStream` events to each of `streams` streams (ids `prefix-0`, ...), `batch` events per
    /// append, interleaving the streams. Returns the event ids.
    @discardableResult
    public func appendTicks(streams: Int, perStream: Int, batch: Int = 10, prefix: String = "stream") async throws -> [UUID] {
        var ids: [UUID] = []
        var written = [Int](repeating: 0, count: streams)
        while written.contains(where: { $0 < perStream }) {
            for stream in 0..<streams where written[stream] < perStream {
                let count = min(batch, perStream - written[stream])
                let events = (0..<count).map { NewEvent(Tick(n: written[stream] + $0)) }
                try await store.append(events, to: "\(prefix)-\(stream)", category: "tick", expectedVersion: .exact(Int64(written[stream])))
                ids += events.map(\.eventID)
                written[stream] += count
            }
        }
        return ids
    }
}

extension TestEventStore {
    /// Writes `streams * perStream` events and their outbox rows in two statements (streams `bulk-0`, ...,
    /// versions in id order), for tests that need a large backlog fast. Returns how many rows it wrote.
    @discardableResult
    public func bulkFill(streams: Int, perStream: Int, topic: String) async throws -> Int {
        try await pool.withConnection { connection in
            try await connection.execute(
                """
                INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, occurred_at)
                SELECT gen_random_uuid(), 'bulk-' || (n % $2), n / $2 + 1, 'Tick', 1, jsonb_build_object('n', n), now()
                FROM generate_series(0, $1 - 1) AS n ORDER BY n
                """, [.int(streams * perStream), .int(streams)])
            return try await connection.execute(
                """
                INSERT INTO outbox (event_id, stream_id, stream_version, topic, message_key, envelope, headers)
                SELECT event_id, stream_id, stream_version, $1, stream_id,
                       json_build_object('eventId', event_id, 'streamId', stream_id, 'streamVersion', stream_version)::text,
                       jsonb_build_object('event-id', event_id::text, 'event-type', event_type,
                                          'stream-version', stream_version::text)
                FROM events WHERE stream_id LIKE 'bulk-%' ORDER BY position
                """, [.text(topic)])
        }
    }
}
