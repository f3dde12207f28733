import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// One TCP connection to a mock broker, held while the broker is set down, so that its port cannot be taken.
///
/// librdkafka 2.0.2's mock closes a broker's listening socket when the broker is set down and binds the same
/// port again at once (so it can come back there). Between the two calls the port is free, and any socket that
/// binds port 0 in that moment (another mock broker, a test's HTTP server) can be given it; the re-bind then
/// fails and the mock aborts the whole process ("Failed to-create mock broker listener"). While the broker has
/// an accepted connection, the kernel keeps the port bound and never hands it out to an automatic bind, and the
/// mock closes that connection only after its re-bind. An answered ApiVersions request proves the broker accepted
/// this connection (a connection still waiting in the listen queue would be dropped with the listener).
final class BrokerPortHold {
    private let descriptor: Int32

    /// Connects to `port` on 127.0.0.1 and waits up to `timeout` for the broker to answer.
    /// Returns nil when the broker refuses the connection: it is down already, and a broker that is down
    /// keeps its port bound, so there is nothing to hold.
    init?(port: UInt16, timeout: Duration = .seconds(10)) throws(BrokerPortHoldError) {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw BrokerPortHoldError(port: port, step: "socket", code: errno) }
        var seconds = timeval(tv_sec: Int(timeout.components.seconds), tv_usec: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &seconds, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &seconds, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        if connected != 0 {
            let code = errno
            close(descriptor)
            if code == ECONNREFUSED { return nil }
            throw BrokerPortHoldError(port: port, step: "connect", code: code)
        }
        // ApiVersions v0: size, api key 18, version 0, correlation id 1, null client id.
        let request: [UInt8] = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xff, 0xff]
        guard write(descriptor, request, request.count) == request.count else {
            let code = errno
            close(descriptor)
            throw BrokerPortHoldError(port: port, step: "send ApiVersions", code: code)
        }
        var answer = [UInt8](repeating: 0, count: 8)
        guard read(descriptor, &answer, answer.count) > 0 else {
            let code = errno
            close(descriptor)
            throw BrokerPortHoldError(port: port, step: "read the ApiVersions answer", code: code)
        }
        self.descriptor = descriptor
    }

    deinit { close(descriptor) }
}

/// A mock broker whose port could not be held before setting it down.
struct BrokerPortHoldError: Error, CustomStringConvertible {
    var port: UInt16
    var step: String
    var code: Int32
    var description: String {
        "cannot hold mock broker port \(port) while it goes down: \(step) failed (\(String(cString: strerror(code)))); "
            + "is the broker answering on 127.0.0.1:\(port)?"
    }
}
