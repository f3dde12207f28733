import Foundation

/// Helpers for showing connection strings and SQL in messages.
enum PostgresURL {
    /// The URL with any password replaced by `***`, for error messages and logs. Works on the bytes, not on
    /// characters: a combining mark must not glue itself to a delimiter and hide the password from the search.
    static func redacted(_ conninfo: String) -> String {
        var bytes = Array(conninfo.utf8)
        let stars = Array("***".utf8)
        func find(_ needle: String, from start: Int, caseInsensitive: Bool = false) -> Int? {
            let pattern = Array(needle.utf8)
            guard pattern.count <= bytes.count else { return nil }
            var index = start
            while index + pattern.count <= bytes.count {
                let matches = (0..<pattern.count).allSatisfy { offset in
                    let byte = bytes[index + offset]
                    let lowered = caseInsensitive && byte >= 65 && byte <= 90 ? byte + 32 : byte
                    return lowered == pattern[offset]
                }
                if matches { return index }
                index += 1
            }
            return nil
        }
        // postgresql://user:secret@host/db. Up to the last "@": a password may hold "@" or "/" (unencoded, libpq
        // refuses it, but the message must not show it); hiding too much of a query is harmless.
        if let scheme = find("://", from: 0), let at = bytes[(scheme + 3)...].lastIndex(of: UInt8(ascii: "@")),
            let colon = bytes[(scheme + 3)..<at].firstIndex(of: UInt8(ascii: ":"))
        {
            bytes.replaceSubrange((colon + 1)..<at, with: stars)
        }
        // password=secret (key/value form or URL query): every occurrence, in any case (a mistyped key is still
        // someone's password).
        var from = 0
        while let key = find("password=", from: from, caseInsensitive: true) {
            let valueStart = key + 9
            var end = bytes[valueStart...].firstIndex { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "&") } ?? bytes.count
            if valueStart < bytes.count, bytes[valueStart] == UInt8(ascii: "'") {
                // A quoted key/value password ('a b', 'it\'s') runs to the closing quote, spaces and all.
                var index = valueStart + 1
                while index < bytes.count, bytes[index] != UInt8(ascii: "'") {
                    index += bytes[index] == UInt8(ascii: "\\") ? 2 : 1
                }
                end = min(index + 1, bytes.count)
            }
            bytes.replaceSubrange(valueStart..<end, with: stars)
            from = valueStart + stars.count
        }
        return "'" + String(decoding: bytes, as: UTF8.self) + "'"
    }

    /// The first line of a statement, shortened, used as its name when the caller gave none.
    static func abbreviate(_ sql: String) -> String {
        let squeezed = sql.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        return squeezed.count > 60 ? String(squeezed.prefix(57)) + "..." : squeezed
    }
}
