import Foundation

/// Helpers for showing connection strings and SQL in messages.
enum PostgresURL {
    /// The URL with any password replaced by `***`, for error messages and logs.
    static func redacted(_ conninfo: String) -> String {
        var text = conninfo
        // postgresql://user:secret@host/db
        if let scheme = text.range(of: "://"), let at = text[scheme.upperBound...].firstIndex(of: "@") {
            let credentials = text[scheme.upperBound..<at]
            if let colon = credentials.firstIndex(of: ":") {
                text.replaceSubrange(text.index(after: colon)..<at, with: "***")
            }
        }
        // password=secret (key/value form or URL query)
        if let range = text.range(of: "password=") {
            let end = text[range.upperBound...].firstIndex(where: { $0 == " " || $0 == "&" }) ?? text.endIndex
            text.replaceSubrange(range.upperBound..<end, with: "***")
        }
        return "'\(text)'"
    }

    /// The first line of a statement, shortened, used as its name when the caller gave none.
    static func abbreviate(_ sql: String) -> String {
        let squeezed = sql.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        return squeezed.count > 60 ? String(squeezed.prefix(57)) + "..." : squeezed
    }
}
