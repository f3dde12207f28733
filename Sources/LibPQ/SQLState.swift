/// The SQLSTATE codes the toolkit acts on, by name (PostgreSQL's Appendix A), so that no module spells a raw code.
public enum SQLState {
    public static let serializationFailure = "40001"
    public static let deadlockDetected = "40P01"
    public static let uniqueViolation = "23505"
    public static let numericValueOutOfRange = "22003"
    /// A statement cancelled: `statement_timeout`, or a cancel request.
    public static let queryCanceled = "57014"
    /// For example a replication slot that another process is streaming.
    public static let objectInUse = "55006"
    public static let lockNotAvailable = "55P03"
    /// The server is shutting down or restarting: `admin_shutdown`, `crash_shutdown`, `cannot_connect_now`.
    public static let serverGoingAway: Set = ["57P01", "57P02", "57P03"]
    /// Class 08: connection exceptions.
    public static let connectionExceptionClass = "08"
    public static let undefinedTable = "42P01"
    /// For example "cached plan must not change result type" after a migration.
    public static let featureNotSupported = "0A000"
    /// Class 42: syntax errors and access rule violations (a handler's SQL that does not fit the schema).
    public static let syntaxErrorOrAccessRuleViolationClass = "42"
}
