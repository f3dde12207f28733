/// A small bounded pool of ``PostgresConnection``s.
///
/// At most ``Configuration/maxConnections`` connections are open; callers beyond that wait in order.
/// A connection that broke while in use (server restart, network) is dropped and replaced by a new one
/// on the next request, so a restarted server is picked up without intervention.
public actor PostgresPool {
    public struct Configuration: Sendable {
        /// `postgresql://` URL or libpq `key=value` pairs.
        public var url: String
        /// Upper bound on open connections. Default: 4.
        public var maxConnections: Int

        public init(url: String, maxConnections: Int = 4) {
            precondition(maxConnections >= 1, "maxConnections must be at least 1")
            self.url = url
            self.maxConnections = maxConnections
        }
    }

    private enum Grant {
        case connection(PostgresConnection)
        case openNew
    }

    public let configuration: Configuration
    private var idle: [PostgresConnection] = []
    private var openCount = 0
    private var waiters: [CheckedContinuation<Grant, any Error>] = []
    private var closed = false

    public init(_ configuration: Configuration) {
        self.configuration = configuration
    }

    public init(url: String, maxConnections: Int = 4) {
        self.init(Configuration(url: url, maxConnections: maxConnections))
    }

    /// Lends a connection to `body` and takes it back afterwards.
    @discardableResult
    public func withConnection<T: Sendable>(_ body: @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        let connection = try await acquire()
        do {
            let value = try await body(connection)
            await release(connection)
            return value
        } catch {
            await release(connection)
            throw error
        }
    }

    /// Runs `body` in a transaction on a pooled connection; see ``PostgresConnection/withTransaction(_:)``.
    @discardableResult
    public func withTransaction<T: Sendable>(_ body: @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        try await withConnection { connection in try await connection.withTransaction(body) }
    }

    /// Closes idle connections and refuses new requests. Connections in use close when returned.
    public func close() {
        closed = true
        idle.removeAll()
        let pending = waiters
        waiters.removeAll()
        for waiter in pending {
            waiter.resume(throwing: PostgresError(code: .poolClosed, message: "the connection pool was closed"))
        }
    }

    private func acquire() async throws -> PostgresConnection {
        guard !closed else { throw PostgresError(code: .poolClosed, message: "the connection pool was closed") }
        if let connection = idle.popLast() { return connection }
        if openCount < configuration.maxConnections {
            openCount += 1
            return try await openReserved()
        }
        let grant = try await withCheckedThrowingContinuation { waiters.append($0) }
        switch grant {
        case .connection(let connection): return connection
        case .openNew: return try await openReserved()
        }
    }

    /// Opens a connection for a slot already counted in `openCount`; gives the slot back on failure.
    private func openReserved() async throws -> PostgresConnection {
        do {
            return try await PostgresConnection.connect(to: configuration.url)
        } catch {
            slotFreed()
            throw error
        }
    }

    private func release(_ connection: PostgresConnection) async {
        let broken = connection.isBroken
        if closed || broken {
            slotFreed()
            return
        }
        if !waiters.isEmpty {
            waiters.removeFirst().resume(returning: .connection(connection))
        } else {
            idle.append(connection)
        }
    }

    private func slotFreed() {
        if !closed, !waiters.isEmpty {
            waiters.removeFirst().resume(returning: .openNew)
        } else {
            openCount -= 1
        }
    }
}
