import Foundation

/// One row of a result. Values arrive in PostgreSQL's text format and are decoded on request,
/// by column name or position, into any ``PQDecodable`` type.
public struct PQRow: Sendable {
    /// Column names and types, shared by all rows of one result.
    public let columns: PQColumns
    let cells: [String?]

    init(columns: PQColumns, cells: [String?]) {
        self.columns = columns
        self.cells = cells
    }

    /// Decodes a non-NULL column. Throws ``PQError/Code/decoding`` when the value is NULL or does not fit `T`.
    public func decode<T: PQDecodable>(_ type: T.Type = T.self, _ column: String) throws(PQError) -> T {
        guard let value = try decodeIfPresent(T.self, column) else {
            throw PQError(code: .decoding, message: "column '\(column)' is NULL; expected \(T.self)")
        }
        return value
    }

    /// Decodes a column that may be NULL.
    public func decodeIfPresent<T: PQDecodable>(_ type: T.Type = T.self, _ column: String) throws(PQError) -> T? {
        guard let index = columns.index(of: column) else {
            throw PQError(
                code: .decoding,
                message: "no column '\(column)' in result; columns are \(columns.names.joined(separator: ", "))"
            )
        }
        return try decodeIfPresent(T.self, at: index)
    }

    /// Decodes a non-NULL column by position (0-based).
    public func decode<T: PQDecodable>(_ type: T.Type = T.self, at index: Int) throws(PQError) -> T {
        guard let value = try decodeIfPresent(T.self, at: index) else {
            throw PQError(code: .decoding, message: "column \(index) is NULL; expected \(T.self)")
        }
        return value
    }

    /// Decodes a column that may be NULL, by position (0-based).
    public func decodeIfPresent<T: PQDecodable>(_ type: T.Type = T.self, at index: Int) throws(PQError) -> T? {
        guard cells.indices.contains(index) else {
            throw PQError(code: .decoding, message: "column index \(index) out of range (\(cells.count) columns)")
        }
        guard let text = cells[index] else { return nil }
        let columnType = columns.types[index]
        do {
            return try T(postgresText: text, type: columnType)
        } catch {
            throw PQError(
                code: .decoding,
                message: "column '\(columns.names[index])' (\(columnType)) cannot be decoded as \(T.self): \(error.reason)"
            )
        }
    }
}

/// Names and types of a result's columns.
public struct PQColumns: Sendable {
    public let names: [String]
    public let types: [PQType]

    func index(of name: String) -> Int? { names.firstIndex(of: name) }
}

/// Why a text value does not decode; wrapped into a ``PQError`` with the column name.
public struct PQDecodingFailure: Error, Sendable {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
}

/// A Swift type that can be read from a column in PostgreSQL's text format.
public protocol PQDecodable: Sendable {
    init(postgresText text: String, type: PQType) throws(PQDecodingFailure)
}

extension String: PQDecodable {
    public init(postgresText text: String, type: PQType) throws(PQDecodingFailure) { self = text }
}

extension Int64: PQDecodable {
    public init(postgresText text: String, type: PQType) throws(PQDecodingFailure) {
        guard let value = Int64(text) else { throw PQDecodingFailure("'\(text.prefix(40))' is not an integer") }
        self = value
    }
}

extension Int32: PQDecodable {
    public init(postgresText text: String, type: PQType) throws(PQDecodingFailure) {
        guard let value = Int32(text) else { throw PQDecodingFailure("'\(text.prefix(40))' is not a 32-bit integer") }
        self = value
    }
}

extension Int: PQDecodable {
    public init(postgresText text: String, type: PQType) throws(PQDecodingFailure) {
        guard let value = Int(text) else { throw PQDecodingFailure("'\(text.prefix(40))' is not an integer") }
        self = value
    }
}

extension Bool: PQDecodable {
    public init(postgresText text: String, type: PQType) throws(PQDecodingFailure) {
        switch text {
        case "t": self = true
        case "f": self = false
        default: throw PQDecodingFailure("'\(text.prefix(40))' is not a boolean")
        }
    }
}

extension UUID: PQDecodable {
    public init(postgresText text: String, type: PQType) throws(PQDecodingFailure) {
        guard let value = UUID(canonicalText: text) else { throw PQDecodingFailure("'\(text.prefix(40))' is not a uuid") }
        self = value
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case), as PostgreSQL prints a uuid. Foundation's
    /// `UUID(uuidString:)` goes through `sscanf` on Linux: a visible share of a relay's CPU.
    init?(canonicalText text: String) {
        var text = text
        let parsed: uuid_t? = text.withUTF8 { bytes -> uuid_t? in
            guard bytes.count == 36 else { return nil }
            var value: uuid_t = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
            var ok = true
            withUnsafeMutableBytes(of: &value) { out in
                var index = 0
                for byteIndex in 0..<16 {
                    if index == 8 || index == 13 || index == 18 || index == 23 {
                        guard bytes[index] == UInt8(ascii: "-") else { ok = false; return }
                        index += 1
                    }
                    guard let high = Self.hexValue(bytes[index]), let low = Self.hexValue(bytes[index + 1]) else { ok = false; return }
                    out[byteIndex] = high << 4 | low
                    index += 2
                }
            }
            return ok ? value : nil
        }
        guard let parsed else { return nil }
        self.init(uuid: parsed)
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}

extension Date: PQDecodable {
    public init(postgresText text: String, type: PQType) throws(PQDecodingFailure) {
        guard let value = PostgresTimestamp.parse(text) else {
            throw PQDecodingFailure("'\(text.prefix(40))' is not an ISO timestamp")
        }
        self = value
    }
}

extension Array: PQDecodable where Element == UInt8 {
    /// Decodes `bytea` from its hex text form (`\x0a1b...`).
    public init(postgresText text: String, type: PQType) throws(PQDecodingFailure) {
        let hex = Array(text.utf8)
        guard hex.count >= 2, hex[0] == UInt8(ascii: "\\"), hex[1] == UInt8(ascii: "x"), hex.count % 2 == 0 else {
            throw PQDecodingFailure("value is not bytea in hex format")
        }
        func nibble(_ c: UInt8) throws(PQDecodingFailure) -> UInt8 {
            switch c {
            case 48...57: return c - 48
            case 97...102: return c - 87
            case 65...70: return c - 55
            default: throw PQDecodingFailure("bad hex digit in bytea")
            }
        }
        var bytes = [UInt8]()
        bytes.reserveCapacity((hex.count - 2) / 2)
        var index = 2
        while index < hex.count {
            bytes.append(try nibble(hex[index]) << 4 | nibble(hex[index + 1]))
            index += 2
        }
        self = bytes
    }
}
