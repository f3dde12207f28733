import LibPQ

/// Turns errors that newcomers meet first into advice.
public enum OperatorAdvice {
    /// A message for an error at the command line: what failed and what to do.
    public static func explain(_ error: any Error) -> String {
        if let error = error as? PQError {
            switch (error.code, error.sqlState) {
            case (_, SQLState.undefinedTable?):
                return "\(error)\nThe event store tables are missing: run `eventoutbox migrate` first."
            case (.connectionFailed, _):
                return "\(error)\nCheck --database-url / EVENTOUTBOX_DATABASE_URL and that PostgreSQL is running."
            default:
                return "\(error)"
            }
        }
        return "\(error)"
    }
}
