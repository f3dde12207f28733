import BlockingIO
import CLibPQ
import Foundation

/// A logical replication stream from a slot with the `pgoutput` plugin: the changes of the tables in the
/// named publications, whole transactions in commit order.
///
/// Opens a `replication=database` connection and runs `START_REPLICATION SLOT ... LOGICAL`. The slot keeps
/// the server's WAL from its confirmed position on; ``confirm(_:received:requestingReply:)`` advances it, and a new stream resumes
/// there (or at `startLSN` if that is later). A slot streams to one connection at a time: a second start
/// fails with SQLSTATE 55006 while the first is connected.
///
/// Like ``PQConnection``, all libpq calls run on a thread of the stream's own; async callers are
/// suspended, never blocked.
public final class PostgresReplicationStream: @unchecked Sendable {
    // Only touched on `thread`.
    private let connection: ReplicationConnection
    private let thread: SerialThread

    private init(connection: ReplicationConnection, thread: SerialThread) {
        self.connection = connection
        self.thread = thread
    }

    deinit { thread.stop() }

    /// Connects and starts streaming.
    /// - Parameters:
    ///   - url: the database, as for ``PQConnection/connect(to:)``; its role needs the `REPLICATION`
    ///     attribute (or superuser).
    ///   - slot: an existing logical slot created with `pgoutput`.
    ///   - publications: the publications whose tables are streamed.
    ///   - startLSN: resume here if it is past the slot's confirmed position (what this client already has).
    /// - Throws: ``PQError``: `connectionFailed`; or `server` with SQLSTATE 42704 (no such slot),
    ///   55006 (the slot is streaming to another connection), 42501 (no replication privilege).
    public static func start(
        url: String, slot: String, publications: [String], startLSN: PostgresLSN = .zero
    ) async throws -> PostgresReplicationStream {
        try ReplicationNames.validate(slot, what: "replication slot")
        for publication in publications { try ReplicationNames.validate(publication, what: "publication") }
        let thread = SerialThread(name: "eventoutbox-replication")
        let command =
            "START_REPLICATION SLOT \(slot) LOGICAL \(startLSN) (proto_version '1', publication_names '\(publications.joined(separator: ","))')"
        do {
            let connection = try await thread.runLibPQ { () throws(PQError) in
                let connection = try ReplicationConnection.connect(url)
                try connection.startCopyBoth(command)
                return connection
            }
            return PostgresReplicationStream(connection: connection, thread: thread)
        } catch {
            thread.stop()
            throw error
        }
    }

    /// The messages the server has sent, at most `limit`; waits up to `timeout` for the first one. An empty
    /// array means nothing arrived in time.
    /// - Throws: ``PQError`` when the stream ends (server shut down, connection lost, slot dropped,
    ///   a publication missing).
    public func receive(limit: Int = 1000, timeout: Duration) async throws -> [ReplicationMessage] {
        let milliseconds = timeout.clampedMilliseconds
        return try await run { connection throws(PQError) in
            try connection.receive(limit: limit, timeoutMilliseconds: milliseconds).map { bytes throws(PQError) in
                try ReplicationMessage.decode(bytes)
            }
        }
    }

    /// Tells the server that everything before `lsn` is safely handled: the slot's confirmed position moves
    /// there, and the server may recycle the WAL before it. `received` (default: `lsn`) reports how far the
    /// client has read (`pg_stat_replication.write_lsn`). With `requestingReply`, the server answers with a
    /// keepalive at once (else an idle server sends one only every `wal_sender_timeout / 2`).
    public func confirm(_ lsn: PostgresLSN, received: PostgresLSN? = nil, requestingReply: Bool = false) async throws {
        let message = ReplicationMessage.statusUpdate(
            written: max(received ?? lsn, lsn), flushed: lsn, applied: lsn, replyRequested: requestingReply)
        try await run { connection throws(PQError) in try connection.send(message) }
    }

    /// Ends the stream and closes the connection; the slot is free for another client at once.
    public func close() async {
        _ = try? await run { connection throws(PQError) in connection.finish() }
    }

    private func run<T: Sendable>(_ work: @escaping @Sendable (ReplicationConnection) throws(PQError) -> T)
        async throws -> T
    {
        let connection = UnsafeTransfer(connection)
        return try await thread.runLibPQ { () throws(PQError) in try work(connection.value) }
    }
}

/// Replication slot and publication names as this package accepts them: what PostgreSQL allows for slot
/// names (lower-case letters, digits, underscores; at most 63), so they can stand unquoted in a command.
public enum ReplicationNames {
    public static func validate(_ name: String, what: String) throws(PQError) {
        guard !name.isEmpty, name.utf8.count <= 63,
            name.utf8.allSatisfy({ (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || $0 == UInt8(ascii: "_") })
        else {
            throw PQError(
                code: .invalidBind,
                message: "\(what) name '\(name)' is not allowed: use 1 to 63 lower-case letters, digits and underscores")
        }
    }
}

/// The `PGconn` of a replication stream (used on the stream's thread only).
private final class ReplicationConnection {
    private var conn: OpaquePointer?

    private init(conn: OpaquePointer) { self.conn = conn }

    deinit { finish() }

    static func connect(_ url: String) throws(PQError) -> ReplicationConnection {
        // `dbname` with expand_dbname = 1 takes a URL or key=value pairs; `replication=database` is added to it.
        let keywords = ["dbname", "replication"]
        let values = [url, "database"]
        let conn: OpaquePointer? = keywords.withCStrings { keywordPointers in
            values.withCStrings { valuePointers in PQconnectdbParams(keywordPointers, valuePointers, 1) }
        }
        guard let conn else {
            throw PQError(code: .connectionFailed, message: "libpq could not allocate a connection")
        }
        let connection = ReplicationConnection(conn: conn)
        guard PQstatus(conn) == CONNECTION_OK else {
            throw PQError(
                code: .connectionFailed,
                message: "could not open a replication connection to \(PostgresURL.redacted(url)): \(connection.lastErrorMessage)")
        }
        return connection
    }

    var lastErrorMessage: String {
        guard let conn else { return "connection closed" }
        return String(cString: PQerrorMessage(conn)).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    private func live(_ what: String) throws(PQError) -> OpaquePointer {
        guard let conn else { throw PQError(code: .connectionLost, message: "replication stream closed before \(what)") }
        return conn
    }

    func startCopyBoth(_ command: String) throws(PQError) {
        let conn = try live("START_REPLICATION")
        // Values are decoded in this session's settings: the same ones as every other connection's.
        if let settings = PQexec(conn, "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'") { PQclear(settings) }
        guard let result = PQexec(conn, command) else {
            throw PQError(code: .connectionLost, message: lastErrorMessage, statement: "START_REPLICATION")
        }
        defer { PQclear(result) }
        guard PQresultStatus(result) == PGRES_COPY_BOTH else { throw Self.error(result, conn, statement: "START_REPLICATION") }
    }

    /// Up to `limit` messages: all that are buffered or readable without waiting, or else the first to arrive
    /// within the timeout.
    func receive(limit: Int, timeoutMilliseconds: Int32) throws(PQError) -> [[UInt8]] {
        let conn = try live("receiving")
        var messages: [[UInt8]] = []
        var waited = false
        while messages.count < limit {
            var buffer: UnsafeMutablePointer<CChar>?
            let length = PQgetCopyData(conn, &buffer, 1)
            if length > 0, let buffer {
                messages.append(Array(UnsafeRawBufferPointer(start: buffer, count: Int(length))))
                PQfreemem(buffer)
                continue
            }
            if length == 0 {
                // Nothing complete is buffered: read what the socket has (waiting only while there is nothing yet).
                if messages.isEmpty && waited { break }
                var descriptor = pollfd(fd: PQsocket(conn), events: Int16(POLLIN), revents: 0)
                let ready = poll(&descriptor, 1, messages.isEmpty ? timeoutMilliseconds : 0)
                if ready < 0 && errno != EINTR {
                    throw PQError(code: .connectionLost, message: "poll on the replication connection failed: errno \(errno)")
                }
                waited = true
                if ready == 0 { break }
                guard PQconsumeInput(conn) == 1 else {
                    throw PQError(code: .connectionLost, message: "replication stream lost: \(lastErrorMessage)")
                }
                continue
            }
            // -1: the server ended the copy (its error, if any, is in the next result); -2: connection error.
            if length == -1, let result = PQgetResult(conn) {
                defer { PQclear(result) }
                if PQresultStatus(result) != PGRES_COMMAND_OK { throw Self.error(result, conn, statement: "replication stream") }
            }
            throw PQError(code: .connectionLost, message: "replication stream ended: \(lastErrorMessage)")
        }
        return messages
    }

    func send(_ message: [UInt8]) throws(PQError) {
        let conn = try live("sending a status update")
        let sent = message.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { PQputCopyData(conn, $0.baseAddress, Int32($0.count)) }
        }
        guard sent == 1, PQflush(conn) == 0 else {
            throw PQError(code: .connectionLost, message: "sending a status update failed: \(lastErrorMessage)")
        }
    }

    func finish() {
        if let conn { PQfinish(conn) }
        conn = nil
    }

    private static func error(_ result: OpaquePointer, _ conn: OpaquePointer, statement: String) -> PQError {
        func field(_ code: UInt8) -> String? {
            guard let value = PQresultErrorField(result, Int32(code)) else { return nil }
            return String(cString: value)
        }
        let message = field(UInt8(ascii: "M")) ?? String(cString: PQerrorMessage(conn)).trimmingCharacters(in: .whitespacesAndNewlines)
        return PQError(
            code: PQstatus(conn) == CONNECTION_OK ? .server : .connectionLost, message: message,
            sqlState: field(UInt8(ascii: "C")), detail: field(UInt8(ascii: "D")), hint: field(UInt8(ascii: "H")),
            statement: statement)
    }
}
