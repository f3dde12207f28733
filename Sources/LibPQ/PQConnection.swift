import BlockingIO
import Foundation
import Synchronization

/// One PostgreSQL connection.
///
/// libpq calls block the calling thread until the server answers. Running them on Swift's cooperative
/// thread pool (one thread per core, two here) would stall every other task while a query waits; running
/// them on libdispatch's bounded worker pool can deadlock once all workers wait on a lock that another
/// connection's next statement would release. So each connection owns a thread (`SerialThread`): every
/// libpq call on this connection runs there, one at a time, and the async caller is suspended (not
/// blocked) meanwhile. That thread is also what makes the unsynchronized `PGconn` safe to share as `Sendable`.
///
/// A connection runs one statement at a time; use ``PQPool`` for concurrency.
public final class PQConnection: @unchecked Sendable {
    // Only touched on `queue` (see the type's doc comment).
    private let handle: PQConnectionHandle
    private let thread: SerialThread
    private let broken = Atomic<Bool>(false)
    private let closed = Atomic<Bool>(false)
    private let canceller: PostgresCanceller
    /// Set when the connection's session state can no longer be trusted (a failed ROLLBACK).
    private let retired = Atomic<Bool>(false)

    private init(handle: PQConnectionHandle, thread: SerialThread) {
        self.handle = handle
        self.thread = thread
        self.canceller = handle.canceller
    }

    deinit { thread.stop() }

    /// Closes the connection once the statements already running or queued on it are done; later calls throw
    /// ``PQError/Code/connectionLost``. Releases what the session held (advisory locks, LISTEN). Closing
    /// twice does nothing.
    public func close() async {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        let handle = UnsafeTransfer(handle)
        // The thread itself stops with the connection object: a call racing with close() finds the handle
        // finished (an error), never a stopped thread.
        await thread.run { handle.value.finish() }
    }

    /// Opens a connection.
    /// - Parameter url: a `postgresql://` URL (`postgresql:///db?host=/tmp/sock` for a unix socket) or
    ///   libpq `key=value` pairs.
    /// - Throws: ``PQError`` with code ``PQError/Code/connectionFailed``.
    public static func connect(to url: String) async throws -> PQConnection {
        let thread = SerialThread(name: "eventoutbox-postgres")
        do {
            let handle = try await thread.runLibPQ { () throws(PQError) in try PQConnectionHandle.connect(url) }
            return PQConnection(handle: handle, thread: thread)
        } catch {
            thread.stop()
            throw error
        }
    }

    /// Runs a statement and returns its rows.
    /// - Parameters:
    ///   - sql: SQL with `$1`, `$2`, ... placeholders.
    ///   - binds: the values for the placeholders, in order.
    ///   - statement: a short name for error messages and logs (default: the start of `sql`).
    /// - Throws: ``PQError`` carrying SQLSTATE, the server message and `statement`.
    @discardableResult
    public func query(_ sql: String, _ binds: [PQBind] = [], statement: String? = nil) async throws
        -> [PQRow]
    {
        let name = statement ?? PostgresURL.abbreviate(sql)
        return try await run { handle throws(PQError) in try handle.execute(sql, binds, statement: name).rows }
    }

    /// Runs a statement that returns one row (an aggregate, `SELECT EXISTS`, a function call, one `RETURNING`)
    /// and returns its first row.
    /// - Throws: ``PQError`` from the server, or with code ``PQError/Code/noRow`` naming the statement
    ///   when it returned no row (instead of a trap).
    public func queryOne(_ sql: String, _ binds: [PQBind] = [], statement: String? = nil) async throws -> PQRow {
        let name = statement ?? PostgresURL.abbreviate(sql)
        guard let row = try await query(sql, binds, statement: name).first else {
            throw PQError(code: .noRow, message: "statement '\(name)' returned no row where one was expected")
        }
        return row
    }

    /// Runs a statement and returns how many rows it inserted, updated or deleted.
    @discardableResult
    public func execute(_ sql: String, _ binds: [PQBind] = [], statement: String? = nil) async throws -> Int {
        let name = statement ?? PostgresURL.abbreviate(sql)
        return try await run { handle throws(PQError) in
            try handle.execute(sql, binds, statement: name).affectedRows
        }
    }

    /// Runs SQL text without parameters; it may contain several statements separated by `;`.
    /// For schema scripts and session commands only; data always goes through ``query(_:_:statement:)``.
    public func executeScript(_ sql: String, statement: String? = nil) async throws {
        try await run { handle throws(PQError) in try handle.executeScript(sql, statement: statement) }
    }

    /// Runs `body` inside `BEGIN` ... `COMMIT`. If `body` throws, the transaction is rolled back and the
    /// error rethrown, so nothing the body wrote remains.
    @discardableResult
    public func withTransaction<T: Sendable>(
        _ body: @Sendable (PQConnection) async throws -> T
    ) async throws -> T {
        try await executeScript("BEGIN", statement: "BEGIN")
        let value: T
        do {
            value = try await body(self)
        } catch {
            // A broken connection has already lost the transaction; the server rolls it back. A ROLLBACK that
            // fails on a live connection leaves it inside the transaction: retire it, so that no later caller
            // runs its statements in there.
            do {
                try await executeScript("ROLLBACK", statement: "ROLLBACK")
            } catch {
                retired.store(true, ordering: .releasing)
            }
            throw error
        }
        try await executeScript("COMMIT", statement: "COMMIT")
        return value
    }

    /// Subscribes this connection to a notification channel (`LISTEN`).
    public func listen(_ channel: String) async throws {
        try await run { handle throws(PQError) in
            try handle.executeScript("LISTEN \(try handle.escapeIdentifier(channel))", statement: "LISTEN \(channel)")
        }
    }

    /// Sends a notification (`pg_notify`); it is delivered when the surrounding transaction commits.
    public func notify(_ channel: String, payload: String = "") async throws {
        try await query("SELECT pg_notify($1, $2)", [.text(channel), .text(payload)], statement: "notify")
    }

    /// Waits until at least one notification arrives on a channel this connection listens to, or the timeout
    /// passes. Returns the notifications received (empty on timeout).
    public func notifications(timeout: Duration) async throws -> [PQNotification] {
        let milliseconds = timeout.clampedMilliseconds
        return try await run { handle throws(PQError) in
            try handle.awaitNotifications(timeoutMilliseconds: milliseconds)
        }
    }

    /// `true` once the connection is unusable (server gone, network dropped). A pool discards it.
    /// Updated on the connection's thread after every call, so reading it needs no trip to that thread.
    public var isBroken: Bool {
        broken.load(ordering: .acquiring) || retired.load(ordering: .acquiring) || closed.load(ordering: .acquiring)
    }

    private func run<T: Sendable>(_ work: @escaping @Sendable (PQConnectionHandle) throws(PQError) -> T)
        async throws -> T
    {
        guard !closed.load(ordering: .acquiring) else {
            throw PQError(code: .connectionLost, message: "the connection was closed")
        }
        let handle = UnsafeTransfer(handle)
        let state = UnsafeTransfer(self)
        // A cancelled task cancels its statement on the server instead of waiting for it.
        return try await withTaskCancellationHandler {
            try await thread.runLibPQ { () throws(PQError) in
                defer { state.value.broken.store(handle.value.isBroken, ordering: .releasing) }
                return try work(handle.value)
            }
        } onCancel: { [canceller] in
            canceller.cancelRunningStatement()
        }
    }
}

extension SerialThread {
    /// Runs a libpq job on this thread and returns its result (or error) to the suspended caller: how every
    /// connection of this module talks to libpq.
    func runLibPQ<T>(_ work: @escaping @Sendable () throws(PQError) -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<UnsafeTransfer<T>, any Error>) in
            submit {
                do {
                    continuation.resume(returning: UnsafeTransfer(try work()))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }.value
    }
}

/// Carries a value across the thread hop. Safe here because the value is only used on the other side
/// after the hop, never concurrently (the connection's thread runs one job at a time).
struct UnsafeTransfer<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

/// A message received through `LISTEN`.
public struct PQNotification: Sendable, Hashable {
    public var channel: String
    public var payload: String
    /// The server process that sent it.
    public var senderProcessID: Int32
}
