import EventSourcing
import EventStore
import Foundation

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
