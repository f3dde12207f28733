/// An error from PostgreSQL or from this client: what failed, in which statement, and what the server said.
///
/// `description` names the statement, the server message and hint, but never bound values nor the server's
/// DETAIL line (which quotes row values, e.g. `Key (email)=(kim@example.com) already exists`), so logging
/// an error or storing it as a dead letter's reason does not leak data. `debugDescription` adds the detail,
/// for a developer at a terminal.
public struct PQError: Error, CustomStringConvertible, CustomDebugStringConvertible, Sendable {
    /// What kind of failure this is. Compare with the static values (`.server`, `.connectionFailed`, ...).
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }
        public var description: String { name }

        /// Could not open a connection (bad URL, server down, authentication failed).
        public static let connectionFailed = Code("connectionFailed")
        /// The connection broke while in use (server restarted, network dropped).
        public static let connectionLost = Code("connectionLost")
        /// The server rejected the statement; ``PQError/sqlState`` says why.
        public static let server = Code("server")
        /// A value to bind cannot be sent (for example text with a NUL byte).
        public static let invalidBind = Code("invalidBind")
        /// A result value cannot be decoded into the requested Swift type.
        public static let decoding = Code("decoding")
        /// The pool was shut down.
        public static let poolClosed = Code("poolClosed")
        /// Waited too long (for a pooled connection, for a notification).
        public static let timeout = Code("timeout")
        /// A statement that should return a row returned none.
        public static let noRow = Code("noRow")
        /// A pool had no connection free and already as many callers waiting as it lets wait.
        public static let poolBusy = Code("poolBusy")
    }

    public var code: Code
    /// The five-character SQLSTATE from the server, e.g. `23505` for a unique violation.
    public var sqlState: String?
    /// The primary message (from the server when there is one).
    public var message: String
    /// The server's DETAIL line, if any.
    public var detail: String?
    /// The server's HINT line, if any.
    public var hint: String?
    /// The constraint the server named, if any (unique and foreign-key violations).
    public var constraint: String?
    /// The statement's name as the caller gave it, or the start of its SQL.
    public var statement: String?

    public init(
        code: Code, message: String, sqlState: String? = nil, detail: String? = nil, hint: String? = nil,
        constraint: String? = nil, statement: String? = nil
    ) {
        self.code = code
        self.message = message
        self.sqlState = sqlState
        self.detail = detail
        self.hint = hint
        self.constraint = constraint
        self.statement = statement
    }

    /// `true` for failures that a new connection can cure (server restart, dropped network).
    public var isConnectionProblem: Bool {
        code == .connectionLost || code == .connectionFailed
            || (sqlState.map { $0.hasPrefix(SQLState.connectionExceptionClass) || SQLState.serverGoingAway.contains($0) } ?? false)
    }

    /// `true` when retrying the same transaction may succeed (serialization failure, deadlock, lost connection).
    /// `true` when the database was too busy to serve in time: no pooled connection became free (or too many
    /// callers wait), or a statement ran past `statement_timeout` (SQLSTATE 57014). A later try may succeed.
    public var isOverloaded: Bool { code == .timeout || code == .poolBusy || sqlState == SQLState.queryCanceled }

    public var isRetriable: Bool {
        isConnectionProblem || sqlState == SQLState.serializationFailure || sqlState == SQLState.deadlockDetected
    }

    /// `true` for SQLSTATE 23505 (unique violation).
    public var isUniqueViolation: Bool { sqlState == SQLState.uniqueViolation }

    public var description: String {
        var text = "PostgreSQL \(code)"
        if let sqlState { text += " [SQLSTATE \(sqlState)]" }
        if let statement { text += " in statement '\(statement)'" }
        text += ": \(message)"
        if let constraint { text += " (constraint: \(constraint))" }
        if let hint { text += " (hint: \(hint))" }
        return text
    }

    /// ``description`` plus the server's DETAIL line, which may quote row values.
    public var debugDescription: String {
        description + (detail.map { " (detail: \($0))" } ?? "")
    }
}
