import Foundation
import Prometheus

#if canImport(Glibc)
import Glibc
#endif

/// Serves `GET /metrics` in Prometheus text format from a registry.
///
/// Deliberately tiny (one thread, one request per connection, no keep-alive): Prometheus scrapes every few
/// seconds, and a full HTTP stack would cost more build time than everything else in the relay.
public final class MetricsServer: Sendable {
    /// The port it listens on (useful when started on port 0).
    public let port: Int
    private let socketDescriptor: Int32

    /// Starts listening on `host:port` and serving from a background thread.
    /// - Throws: an error naming the address when it cannot bind (port in use, bad host).
    public init(host: String = "127.0.0.1", port: Int, registry: PrometheusCollectorRegistry) throws {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw MetricsServerError("socket() failed: errno \(errno)") }
        var reuse: Int32 = 1
        setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &reuse, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
            close(descriptor)
            throw MetricsServerError("metrics host '\(host)' is not an IPv4 address")
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(descriptor, 16) == 0 else {
            let code = errno
            close(descriptor)
            throw MetricsServerError("cannot listen on \(host):\(port): \(String(cString: strerror(code)))")
        }
        var actual = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &actual) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        self.port = Int(UInt16(bigEndian: actual.sin_port))
        self.socketDescriptor = descriptor
        let thread = Thread {
            while true {
                let client = accept(descriptor, nil, nil)
                if client < 0 {
                    if errno == EINTR { continue }
                    return  // the listening socket was closed by stop()
                }
                Self.serve(client, registry: registry)
            }
        }
        thread.name = "eventoutbox-metrics"
        thread.start()
    }

    /// Stops accepting connections.
    public func stop() {
        shutdown(socketDescriptor, Int32(SHUT_RDWR))
        close(socketDescriptor)
    }

    private static func serve(_ client: Int32, registry: PrometheusCollectorRegistry) {
        defer { close(client) }
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 2048)
        while request.count < 16_384 {
            let count = read(client, &buffer, buffer.count)
            if count <= 0 { break }
            request += buffer[0..<count]
            if request.count >= 4, request.suffix(4) == [13, 10, 13, 10] { break }
        }
        let firstLine = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let parts = firstLine.split(separator: " ")
        let response: [UInt8]
        if parts.count >= 2, parts[0] == "GET", parts[1] == "/metrics" || parts[1].hasPrefix("/metrics?") {
            var body: [UInt8] = []
            registry.emit(into: &body)
            response = Array(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n".utf8)
                + body
        } else {
            let body = Array("not found; metrics are at /metrics\n".utf8)
            response = Array("HTTP/1.1 404 Not Found\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n".utf8) + body
        }
        var sent = 0
        while sent < response.count {
            let count = response[sent...].withUnsafeBytes { write(client, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            sent += count
        }
    }
}

public struct MetricsServerError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}
