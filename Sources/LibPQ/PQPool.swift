import BlockingIO
/// A small bounded pool of ``PQConnection``s.
///
/// At most ``Configuration/maxConnections`` connections are open; callers beyond that wait in order.
/// A connection that broke while in use (server restart, network) is dropped and replaced by a new one
/// on the next request, so a restarted server is picked up without intervention.
public actor PQPool {
    public struct Configuration: Sendable {
        /// `postgresql://` URL or libpq `key=value` pairs.
        public var url: String
        /// Upper bound on open connections. Default: 4.
        public var maxConnections: Int
        /// Longest wait for a connection when all are in use; then ``PQError/Code/timeout``. Default: 30 s.
        public var acquireTimeout: Duration
        /// Callers that may wait for a connection at once; one more gets ``PQError/Code/poolBusy`` at once.
        /// `nil`: no bound. A server sets one so that a stalled database sheds load instead of queueing it.
        public var maxWaiters: Int?
        /// `statement_timeout` of every connection the pool opens (`nil`: the server's). A statement that runs
        /// longer fails with SQLSTATE 57014 instead of holding its connection.
        public var statementTimeout: Duration?

        public init(
            url: String, maxConnections: Int = 4, acquireTimeout: Duration = .seconds(30), maxWaiters: Int? = nil,
            statementTimeout: Duration? = nil
        ) {
            precondition(maxConnections >= 1, "maxConnections must be at least 1")
            self.url = url
            self.maxConnections = maxConnections
            self.acquireTimeout = acquireTimeout
            self.maxWaiters = maxWaiters
            self.statementTimeout = statementTimeout
        }
    }

    private enum Grant {
        case connection(PQConnection)
        case openNew
    }

    public nonisolated let configuration: Configuration
    private var idle: [PQConnection] = []
    private var openCount = 0
    private var waiters: [(id: Int, continuation: CheckedContinuation<Grant, any Error>)] = []
    private var nextWaiter = 0
    private var closed = false

    public init(_ configuration: Configuration) {
        self.configuration = configuration
    }

    public init(url: String, maxConnections: Int = 4, acquireTimeout: Duration = .seconds(30)) {
        self.init(Configuration(url: url, maxConnections: maxConnections, acquireTimeout: acquireTimeout))
    }

    /// Lends a connection to `body` and takes it back afterwards.
    @discardableResult
    public func withConnection<T: Sendable>(_ body: @Sendable (PQConnection) async throws -> T) async throws -> T {
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

    /// Runs `body` in a transaction on a pooled connection; see ``PQConnection/withTransaction(_:)``.
    @discardableResult
    public func withTransaction<T: Sendable>(_ body: @Sendable (PQConnection) async throws -> T) async throws -> T {
        try await withConnection { connection in try await connection.withTransaction(body) }
    }

    /// Closes idle connections and refuses new requests. Connections in use close when returned.
    public func close() {
        closed = true
        idle.removeAll()
        let pending = waiters
        waiters.removeAll()
        for waiter in pending {
            waiter.continuation.resume(throwing: PQError(code: .poolClosed, message: "the connection pool was closed"))
        }
    }

    private func acquire() async throws -> PQConnection {
        guard !closed else { throw PQError(code: .poolClosed, message: "the connection pool was closed") }
        if let connection = idle.popLast() { return connection }
        if openCount < configuration.maxConnections {
            openCount += 1
            return try await openReserved()
        }
        if let maxWaiters = configuration.maxWaiters, waiters.count >= maxWaiters {
            throw PQError(
                code: .poolBusy,
                message: "all \(configuration.maxConnections) database connections are in use and \(waiters.count) callers wait already; try again shortly")
        }
        nextWaiter += 1
        let id = nextWaiter
        let timeout = configuration.acquireTimeout
        // Not isolated to this actor: the task holds the pool weakly and must not outlive it on its executor.
        let expiry = Task.detached { [weak self] in
            try await Task.sleep(for: timeout)
            await self?.expire(id)
        }
        defer { expiry.cancel() }
        let grant = try await withCheckedThrowingContinuation { waiters.append((id, $0)) }
        switch grant {
        case .connection(let connection): return connection
        case .openNew: return try await openReserved()
        }
    }

    /// Opens a connection for a slot already counted in `openCount`; gives the slot back on failure.
    private func openReserved() async throws -> PQConnection {
        do {
            let connection = try await PQConnection.connect(to: configuration.url)
            if let timeout = configuration.statementTimeout {
                let milliseconds = max(1, timeout.clampedMilliseconds)
                do {
                    try await connection.executeScript("SET statement_timeout = \(milliseconds)", statement: "pool: statement timeout")
                } catch {
                    await connection.close()
                    throw error
                }
            }
            return connection
        } catch {
            slotFreed()
            throw error
        }
    }

    private func release(_ connection: PQConnection) async {
        let broken = connection.isBroken
        if closed || broken {
            slotFreed()
            return
        }
        if !waiters.isEmpty {
            waiters.removeFirst().continuation.resume(returning: .connection(connection))
        } else {
            idle.append(connection)
        }
    }

    /// A waiter whose time is up, if it is still waiting.
    private func expire(_ id: Int) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }
        waiters.remove(at: index).continuation.resume(
            throwing: PQError(
                code: .timeout,
                message: "no database connection became free within \(configuration.acquireTimeout): all \(configuration.maxConnections) are in use; raise maxConnections or shorten the work done while holding one"))
    }

    private func slotFreed() {
        if !closed, !waiters.isEmpty {
            waiters.removeFirst().continuation.resume(returning: .openNew)
        } else {
            openCount -= 1
        }
    }
}
