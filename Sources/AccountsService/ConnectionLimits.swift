import Hummingbird
import HummingbirdCore
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
private let RLIMIT_NOFILE_VALUE = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
#else
import Darwin
private let RLIMIT_NOFILE_VALUE = RLIMIT_NOFILE
#endif

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

    /// These limits with the connection cap lowered, if need be, below what the process may open: its descriptor
    /// limit (`RLIMIT_NOFILE`, first raised to the hard limit) less `reserve` for everything else (database
    /// connections, files, Kafka). Above the descriptor limit, accept fails with EMFILE while the connection
    /// waits in the backlog, and the event loop spins on it (seen: a core at 90% under `ulimit -n 256` with
    /// 300 idle clients); below it, the one too many is accepted and closed at once.
    public func withinDescriptorLimit(reserve: Int) -> ConnectionLimits {
        var limit = rlimit()
        guard getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0 else { return self }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(RLIMIT_NOFILE_VALUE, &raised) == 0 { limit = raised }
        }
        var copy = self
        let available = Int(clamping: limit.rlim_cur) - reserve
        copy.maxOpenConnections = max(1, min(maxOpenConnections, available))
        return copy
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
