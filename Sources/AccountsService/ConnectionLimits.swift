import Hummingbird
import HummingbirdCore
import NIOCore
import Synchronization

/// How the HTTP server protects itself from clients that hold connections: an idle timeout (a connection that
/// sends nothing for that long is closed, a slow client's included) and a cap on open connections (one more is
/// closed at once, so descriptors and memory stay bounded whatever clients do).
public struct ConnectionLimits: Sendable {
    /// A connection that sends nothing for this long is closed. Default: 30 s.
    public var idleTimeout: Duration
    /// Connections open at once; one more is closed as soon as it is accepted. Default: 1,024.
    public var maxOpenConnections: Int

    public init(idleTimeout: Duration = .seconds(30), maxOpenConnections: Int = 1024) {
        self.idleTimeout = idleTimeout
        self.maxOpenConnections = maxOpenConnections
    }

    /// An HTTP/1.1 server with these limits, for `Application(router:server:...)`.
    public var server: HTTPServerBuilder {
        let counter = OpenConnections(limit: maxOpenConnections)
        let nanoseconds = idleTimeout.components.seconds * 1_000_000_000 + idleTimeout.components.attoseconds / 1_000_000_000
        return .http1(configuration: HTTP1Channel.Configuration(
            additionalChannelHandlers: [ConnectionLimitHandler(open: counter)], idleTimeout: .nanoseconds(nanoseconds)))
    }
}

/// The connections open now, shared by every connection's ``ConnectionLimitHandler``.
final class OpenConnections: Sendable {
    let limit: Int
    let count = Atomic<Int>(0)
    init(limit: Int) { self.limit = limit }
}

/// Counts its connection while it is open, and closes it at once if that makes one too many.
final class ConnectionLimitHandler: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    // Never read: reads pass through untouched.
    typealias InboundIn = ByteBuffer
    let open: OpenConnections

    init(open: OpenConnections) { self.open = open }

    func handlerAdded(context: ChannelHandlerContext) {
        if open.count.add(1, ordering: .relaxed).newValue > open.limit { context.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        open.count.subtract(1, ordering: .relaxed)
    }
}
