import CLibPQ
import Foundation

/// Owns one `PGconn` and makes the blocking libpq calls. Not thread-safe by itself:
/// ``PQConnection`` confines every use to one serial dispatch queue.
final class PQConnectionHandle {
    private let conn: OpaquePointer
    private var finished = false
    /// Sends cancel requests for this connection from any thread.
    let canceller: PostgresCanceller
    /// Server-side prepared statements of this connection, by SQL text and parameter types. Repeated
    /// statements (every append, every projection write) skip parsing and planning: about 1.8x the
    /// throughput of the append statement in pgbench (`-M prepared` vs simple protocol).
    private var prepared: [PreparedKey: String] = [:]
    private var preparedNames = 0
    private static let maxPrepared = 256

    private struct PreparedKey: Hashable {
        var sql: String
        var types: [UInt32]
    }

    private init(conn: OpaquePointer) {
        self.conn = conn
        canceller = PostgresCanceller(PQgetCancel(conn))
    }

    deinit { finish() }

    /// Closes the connection (once); the handle must not be used afterwards.
    func finish() {
        guard !finished else { return }
        finished = true
        PQfinish(conn)
    }

    /// Defaults that a URL's own parameters override: without a connect timeout, libpq waits as long as the
    /// operating system does for a host that does not answer.
    static let connectionDefaults = ["connect_timeout": "10"]

    /// Opens a connection (blocking). `conninfo` is a `postgresql://` URL or `key=value` pairs.
    static func connect(_ conninfo: String) throws(PQError) -> PQConnectionHandle {
        // Keywords before `dbname` are defaults: the expanded URL overrides them.
        let keywords = Array(connectionDefaults.keys) + ["dbname"]
        let values = Array(connectionDefaults.values) + [conninfo]
        let made: OpaquePointer? = keywords.withCStrings { keywordPointers in
            values.withCStrings { valuePointers in PQconnectdbParams(keywordPointers, valuePointers, 1) }
        }
        guard let conn = made else {
            throw PQError(code: .connectionFailed, message: "libpq could not allocate a connection")
        }
        // From here on `handle` owns `conn`; its deinit calls PQfinish on every path.
        let handle = PQConnectionHandle(conn: conn)
        guard PQstatus(conn) == CONNECTION_OK else {
            throw PQError(
                code: .connectionFailed,
                message: "could not connect to \(PostgresURL.redacted(conninfo)): \(handle.lastErrorMessage)"
            )
        }
        // Fixed session settings that the decoders rely on (timestamps in UTC, ISO format, UTF-8 text);
        // NOTICEs (e.g. "table does not exist, skipping") would otherwise go to stderr.
        try handle.executeScript("SET client_encoding = 'UTF8'; SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET client_min_messages = warning")
        return handle
    }

    var isBroken: Bool { finished || PQstatus(conn) != CONNECTION_OK }

    private func ensureOpen(_ statement: String?) throws(PQError) {
        guard !finished else {
            throw PQError(code: .connectionLost, message: "the connection was closed", statement: statement)
        }
    }

    var lastErrorMessage: String {
        String(cString: PQerrorMessage(conn)).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Runs one parameterized statement. Values are sent out of band (`PQexecParams`), never spliced into `sql`.
    func execute(_ sql: String, _ binds: [PQBind], statement: String) throws(PQError) -> PostgresResult {
        try ensureOpen(statement)
        var wire: [(bytes: [UInt8], binary: Bool)?] = []
        wire.reserveCapacity(binds.count)
        for (index, bind) in binds.enumerated() {
            do {
                wire.append(try bind.wireValue(parameter: index + 1))
            } catch {
                var error = error
                error.statement = statement
                throw error
            }
        }
        // Copy every value into its own NUL-terminated C buffer that lives for the duration of the call.
        let buffers: [UnsafeMutablePointer<CChar>?] = wire.map { value in
            guard let value else { return nil }
            let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: value.bytes.count + 1)
            value.bytes.withUnsafeBufferPointer { source in
                source.withMemoryRebound(to: CChar.self) { chars in
                    if let base = chars.baseAddress { buffer.update(from: base, count: value.bytes.count) }
                }
            }
            buffer[value.bytes.count] = 0
            return buffer
        }
        defer { buffers.forEach { $0?.deallocate() } }
        let types = binds.map { Oid($0.typeOID) }
        let lengths = wire.map { Int32($0?.bytes.count ?? 0) }
        let formats = wire.map { Int32(($0?.binary ?? false) ? 1 : 0) }
        let values = buffers.map { UnsafePointer($0) }
        let key = PreparedKey(sql: sql, types: types.map { UInt32($0) })
        if let name = try preparedName(key, statement: statement) {
            do {
                return try consume(PQexecPrepared(conn, name, Int32(binds.count), values, lengths, formats, 0), statement: statement)
            } catch where error.sqlState == SQLState.featureNotSupported && error.message.contains("cached plan") {
                // A table's columns changed under the prepared statement (its result shape is fixed):
                // forget it. Outside a transaction, run the statement afresh; inside one, the transaction is
                // aborted and the error goes to the caller, whose retry prepares the new shape.
                prepared[key] = nil
                guard PQtransactionStatus(conn) == PQTRANS_IDLE else { throw error }
                if let result = PQexec(conn, "DEALLOCATE \(name)") { PQclear(result) }
                return try consume(PQexecParams(conn, sql, Int32(binds.count), types, values, lengths, formats, 0), statement: statement)
            }
        }
        return try consume(PQexecParams(conn, sql, Int32(binds.count), types, values, lengths, formats, 0), statement: statement)
    }

    /// The name of the prepared statement for `key`, preparing it on first use; `nil` once the cache is full
    /// (then the statement runs unprepared).
    private func preparedName(_ key: PreparedKey, statement: String) throws(PQError) -> String? {
        if let name = prepared[key] { return name }
        guard prepared.count < Self.maxPrepared else { return nil }
        preparedNames += 1
        let name = "eventoutbox_\(preparedNames)"
        let types = key.types.map { Oid($0) }
        _ = try consume(PQprepare(conn, name, key.sql, Int32(types.count), types), statement: statement)
        prepared[key] = name
        return name
    }

    /// Runs SQL text without parameters; may hold several statements (migrations, BEGIN/COMMIT).
    func executeScript(_ sql: String, statement: String? = nil) throws(PQError) {
        try ensureOpen(statement)
        _ = try consume(PQexec(conn, sql), statement: statement ?? PostgresURL.abbreviate(sql))
    }

    /// Quotes an identifier (for LISTEN channel names, which cannot be parameters).
    func escapeIdentifier(_ identifier: String) throws(PQError) -> String {
        try ensureOpen("LISTEN")
        guard let escaped = PQescapeIdentifier(conn, identifier, identifier.utf8.count) else {
            throw PQError(code: .invalidBind, message: "cannot quote identifier: \(lastErrorMessage)")
        }
        defer { PQfreemem(escaped) }
        return String(cString: escaped)
    }

    /// Returns the notifications that have arrived, waiting up to `timeoutMilliseconds` for the first one.
    func awaitNotifications(timeoutMilliseconds: Int32) throws(PQError) -> [PQNotification] {
        try ensureOpen("LISTEN")
        var received = try drainNotifications()
        if !received.isEmpty { return received }
        var descriptor = pollfd(fd: PQsocket(conn), events: Int16(POLLIN), revents: 0)
        guard descriptor.fd >= 0 else {
            throw PQError(code: .connectionLost, message: "connection has no socket: \(lastErrorMessage)")
        }
        let ready = poll(&descriptor, 1, timeoutMilliseconds)
        if ready < 0 && errno != EINTR {
            throw PQError(code: .connectionLost, message: "poll on the connection failed: errno \(errno)")
        }
        received = try drainNotifications()
        return received
    }

    private func drainNotifications() throws(PQError) -> [PQNotification] {
        guard PQconsumeInput(conn) == 1 else {
            throw PQError(code: .connectionLost, message: "reading notifications failed: \(lastErrorMessage)")
        }
        var notifications: [PQNotification] = []
        while let notify = PQnotifies(conn) {
            notifications.append(
                PQNotification(
                    channel: String(cString: notify.pointee.relname),
                    payload: String(cString: notify.pointee.extra),
                    senderProcessID: notify.pointee.be_pid
                )
            )
            PQfreemem(notify)
        }
        return notifications
    }

    /// Turns a `PGresult` into rows or a ``PQError`` and frees it.
    private func consume(_ result: OpaquePointer?, statement: String) throws(PQError) -> PostgresResult {
        guard let result else {
            throw PQError(
                code: isBroken ? .connectionLost : .server, message: lastErrorMessage, statement: statement)
        }
        defer { PQclear(result) }
        switch PQresultStatus(result) {
        case PGRES_COMMAND_OK, PGRES_TUPLES_OK, PGRES_EMPTY_QUERY:
            break
        default:
            func field(_ code: UInt8) -> String? {
                guard let value = PQresultErrorField(result, Int32(code)) else { return nil }
                return String(cString: value)
            }
            let message =
                field(UInt8(ascii: "M"))
                ?? String(cString: PQresultErrorMessage(result)).trimmingCharacters(in: .whitespacesAndNewlines)
            throw PQError(
                code: isBroken ? .connectionLost : .server,
                message: message.isEmpty ? lastErrorMessage : message,
                sqlState: field(UInt8(ascii: "C")),
                detail: field(UInt8(ascii: "D")),
                hint: field(UInt8(ascii: "H")),
                constraint: field(UInt8(ascii: "n")),
                statement: statement
            )
        }
        let columnCount = Int(PQnfields(result))
        let rowCount = Int(PQntuples(result))
        let columns = PQColumns(
            names: (0..<columnCount).map { String(cString: PQfname(result, Int32($0))) },
            types: (0..<columnCount).map { PQType(oid: UInt32(PQftype(result, Int32($0)))) }
        )
        var rows: [PQRow] = []
        rows.reserveCapacity(rowCount)
        for row in 0..<Int32(rowCount) {
            var cells: [String?] = []
            cells.reserveCapacity(columnCount)
            for column in 0..<Int32(columnCount) {
                if PQgetisnull(result, row, column) == 1 {
                    cells.append(nil)
                } else {
                    let length = Int(PQgetlength(result, row, column))
                    let bytes = UnsafeRawBufferPointer(start: PQgetvalue(result, row, column), count: length)
                    cells.append(String(decoding: bytes, as: UTF8.self))
                }
            }
            rows.append(PQRow(columns: columns, cells: cells))
        }
        let affected = Int(String(cString: PQcmdTuples(result))) ?? 0
        return PostgresResult(rows: rows, affectedRows: affected)
    }
}

/// Rows of a statement plus the count the server reported for INSERT/UPDATE/DELETE.
struct PostgresResult {
    var rows: [PQRow]
    var affectedRows: Int
}

/// Cancels the statement running on a connection (`PQcancel`), callable from any thread while the
/// connection's own thread waits for the server. A cancel that arrives after the statement finished may hit
/// the connection's next statement: PostgreSQL's cancel protocol cannot tell them apart.
final class PostgresCanceller: @unchecked Sendable {
    // PQcancel is thread-safe for a PGcancel object; the lock only guards its freeing.
    private let lock = NSLock()
    private var cancel: OpaquePointer?

    init(_ cancel: OpaquePointer?) { self.cancel = cancel }

    deinit { if let cancel { PQfreeCancel(cancel) } }

    /// Asks the server to cancel the running statement; it then fails with SQLSTATE 57014.
    func cancelRunningStatement() {
        lock.lock()
        defer { lock.unlock() }
        guard let cancel else { return }
        var errorText = [CChar](repeating: 0, count: 256)
        _ = PQcancel(cancel, &errorText, Int32(errorText.count))
    }
}

extension Array where Element == String {
    /// Calls `body` with a NULL-terminated array of C strings (libpq's keyword/value lists).
    func withCStrings<R>(_ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
        let pointers = map { strdup($0) }
        defer { pointers.forEach { free($0) } }
        let terminated: [UnsafePointer<CChar>?] = pointers.map { UnsafePointer($0) } + [nil]
        return terminated.withUnsafeBufferPointer { body($0.baseAddress!) }
    }
}
