import Foundation

/// Helpers for showing connection strings and SQL in messages.
enum PostgresURL {
    /// The URL with any password replaced by `***`, for error messages and logs.
    ///
    /// It reads the connection string the way libpq does, so that every spelling libpq takes as a password is
    /// hidden: in a URL, the user info's password and any query parameter whose name, percent-decoded, names a
    /// password (`?passwor%64=X`, `?%70assword=X`); in the keyword form, `password = X` with or without spaces
    /// around `=`, quoted or not. A final scan hides whatever follows `password` and `=` anywhere, in any case,
    /// for strings libpq would refuse (they still reach error messages). Works on the bytes, not on
    /// characters: a combining mark must not glue itself to a delimiter and hide the password from the search.
    static func redacted(_ conninfo: String) -> String {
        var text = RedactedBytes(Array(conninfo.utf8))
        if text.isURL {
            text.hideURLPasswords()
        } else {
            text.hideKeywordPasswords()
        }
        text.hideAnyPasswordAssignment()
        return "'" + String(decoding: text.bytes, as: UTF8.self) + "'"
    }

    /// The first line of a statement, shortened, used as its name when the caller gave none.
    static func abbreviate(_ sql: String) -> String {
        let squeezed = sql.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        return squeezed.count > 60 ? String(squeezed.prefix(57)) + "..." : squeezed
    }
}

/// A connection string's bytes with password values replaced by `***`.
private struct RedactedBytes {
    var bytes: [UInt8]
    /// The URL form: its query's values end at `&`; keyword values do not.
    let isURL: Bool
    static let stars = Array("***".utf8)

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
        isURL = bytes.starts(with: "postgresql://".utf8) || bytes.starts(with: "postgres://".utf8)
    }

    static func isSpace(_ byte: UInt8) -> Bool { byte == 0x20 || (0x09...0x0d).contains(byte) }

    static func namesPassword(_ name: [UInt8]) -> Bool {
        String(decoding: name, as: UTF8.self).lowercased().contains("password")
    }

    /// Replaces `range` with `***`; returns the index just after the stars.
    mutating func hide(_ range: Range<Int>) -> Int {
        bytes.replaceSubrange(range, with: Self.stars)
        return range.lowerBound + Self.stars.count
    }

    /// `postgresql://user:secret@host/db?password=secret&passwor%64=secret`.
    mutating func hideURLPasswords() {
        let authorityStart = bytes.firstRange(of: Array("://".utf8))!.upperBound
        // The user info runs to the last "@": a password may hold "@" or "/" (unencoded, libpq refuses it, but
        // the message must not show it); hiding too much of a query is harmless.
        if let at = bytes[authorityStart...].lastIndex(of: UInt8(ascii: "@")),
            let colon = bytes[authorityStart..<at].firstIndex(of: UInt8(ascii: ":"))
        {
            _ = hide((colon + 1)..<at)
        }
        // Every parameter, wherever a "?" or "&" starts one: an "@" or "?" in the query (libpq refuses some such
        // strings, but they still reach error messages) must not hide a parameter from this scan.
        var index = authorityStart
        while index < bytes.count {
            guard bytes[index] == UInt8(ascii: "?") || bytes[index] == UInt8(ascii: "&") else {
                index += 1
                continue
            }
            let start = index + 1
            let end = bytes[start...].firstIndex { $0 == UInt8(ascii: "&") || $0 == UInt8(ascii: "?") } ?? bytes.count
            if let equals = bytes[start..<end].firstIndex(of: UInt8(ascii: "=")),
                Self.namesPassword(Self.percentDecoded(bytes[start..<equals]))
            {
                // The value runs to the next "&" (a "?" inside a value is part of it).
                let valueEnd = bytes[(equals + 1)...].firstIndex(of: UInt8(ascii: "&")) ?? bytes.count
                index = hide((equals + 1)..<valueEnd)
            } else {
                index = end
            }
        }
    }

    static func percentDecoded(_ slice: ArraySlice<UInt8>) -> [UInt8] {
        var out: [UInt8] = []
        var index = slice.startIndex
        while index < slice.endIndex {
            if slice[index] == UInt8(ascii: "%"), index + 2 < slice.endIndex,
                let value = UInt8(String(decoding: slice[(index + 1)...(index + 2)], as: UTF8.self), radix: 16)
            {
                out.append(value)
                index += 3
            } else {
                out.append(slice[index])
                index += 1
            }
        }
        return out
    }

    /// `host=h password = 'it\'s secret' port=5432`, parsed as libpq's conninfo_parse does: a keyword, optional
    /// spaces, `=`, optional spaces, then a value that is quoted (to the closing quote) or runs to a space, with
    /// backslash escapes in both. Stops where libpq would report an error.
    mutating func hideKeywordPasswords() {
        var index = 0
        while index < bytes.count {
            while index < bytes.count, Self.isSpace(bytes[index]) { index += 1 }
            guard index < bytes.count else { return }
            let nameStart = index
            while index < bytes.count, bytes[index] != UInt8(ascii: "="), !Self.isSpace(bytes[index]) { index += 1 }
            let name = Array(bytes[nameStart..<index])
            while index < bytes.count, Self.isSpace(bytes[index]) { index += 1 }
            guard index < bytes.count, bytes[index] == UInt8(ascii: "=") else { return }
            index += 1
            while index < bytes.count, Self.isSpace(bytes[index]) { index += 1 }
            let valueEnd = Self.valueEnd(bytes, from: index, stopsAtAmpersand: false)
            index = Self.namesPassword(name) && valueEnd > index ? hide(index..<valueEnd) : valueEnd
        }
    }

    /// Where a keyword-form value starting at `start` ends (just past a closing quote, or at a space).
    static func valueEnd(_ bytes: [UInt8], from start: Int, stopsAtAmpersand: Bool) -> Int {
        var index = start
        if index < bytes.count, bytes[index] == UInt8(ascii: "'") {
            index += 1
            while index < bytes.count, bytes[index] != UInt8(ascii: "'") {
                index += bytes[index] == UInt8(ascii: "\\") ? 2 : 1
            }
            return min(index + 1, bytes.count)
        }
        while index < bytes.count, !isSpace(bytes[index]), !(stopsAtAmpersand && bytes[index] == UInt8(ascii: "&")) {
            index += bytes[index] == UInt8(ascii: "\\") ? 2 : 1
        }
        return min(index, bytes.count)
    }

    /// Whatever follows `password`, optional spaces and `=`, anywhere and in any case.
    mutating func hideAnyPasswordAssignment() {
        let word = Array("password".utf8)
        var from = 0
        while from + word.count <= bytes.count {
            guard let found = (from...(bytes.count - word.count)).first(where: { start in
                (0..<word.count).allSatisfy { offset in
                    let byte = bytes[start + offset]
                    return (byte >= 65 && byte <= 90 ? byte + 32 : byte) == word[offset]
                }
            }) else { return }
            var index = found + word.count
            while index < bytes.count, Self.isSpace(bytes[index]) { index += 1 }
            guard index < bytes.count, bytes[index] == UInt8(ascii: "=") else {
                from = found + 1
                continue
            }
            index += 1
            while index < bytes.count, Self.isSpace(bytes[index]) { index += 1 }
            let end = Self.valueEnd(bytes, from: index, stopsAtAmpersand: isURL)
            // Already hidden (or empty): go on after it.
            if bytes[index..<end].elementsEqual(Self.stars) || end == index {
                from = max(end, found + 1)
            } else {
                from = hide(index..<end)
            }
        }
    }
}
