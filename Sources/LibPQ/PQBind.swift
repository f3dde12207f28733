import Foundation

/// A value bound to a `$n` placeholder. Values always travel separately from the SQL text, so no
/// quoting or escaping is ever needed (or possible).
public enum PQBind: Sendable, Hashable {
    case null
    case text(String)
    case int32(Int32)
    case int64(Int64)
    case bool(Bool)
    case uuid(UUID)
    case timestamp(Date)
    /// JSON text for a `jsonb` parameter; the server validates it.
    case jsonb(String)
    case bytea([UInt8])
    /// A `bigint[]` parameter (e.g. `WHERE id = ANY($1)` or `unnest($1, $2)`): one statement of fixed shape
    /// for any number of values, so one prepared statement serves every batch.
    case int64Array([Int64])
    /// An `int[]` parameter.
    case int32Array([Int32])
    /// A `text[]` parameter; any text (quotes, backslashes, commas, braces) arrives unchanged.
    case textArray([String])
    /// A `timestamptz[]` parameter.
    case timestampArray([Date])

    /// Convenience for `Int`.
    public static func int(_ value: Int) -> PQBind { .int64(Int64(value)) }

    /// `.null` when `value` is nil, else `.text(value)`.
    public static func text(_ value: String?) -> PQBind { value.map(PQBind.text) ?? .null }

    /// The type OID sent with the parameter; the server casts it to the column type on assignment.
    var typeOID: UInt32 {
        switch self {
        case .null: return 0
        case .text: return PQType.text.oid
        case .int32: return PQType.int4.oid
        case .int64: return PQType.int8.oid
        case .bool: return PQType.bool.oid
        case .uuid: return PQType.uuid.oid
        case .timestamp: return PQType.timestamptz.oid
        case .jsonb: return PQType.jsonb.oid
        case .bytea: return PQType.bytea.oid
        case .int64Array: return PQType.int8Array.oid
        case .int32Array: return PQType.int4Array.oid
        case .textArray: return PQType.textArray.oid
        case .timestampArray: return PQType.timestamptzArray.oid
        }
    }

    /// Wire form: bytes and whether they are binary (only `bytea` is). `nil` means SQL NULL.
    func wireValue(parameter: Int) throws(PQError) -> (bytes: [UInt8], binary: Bool)? {
        func textBytes(_ string: String) throws(PQError) -> [UInt8] {
            let bytes = Array(string.utf8)
            if bytes.contains(0) {
                throw PQError(
                    code: .invalidBind,
                    message: "parameter $\(parameter) contains a NUL byte, which PostgreSQL text cannot store; "
                        + "strip it or send the value as bytea"
                )
            }
            return bytes
        }
        switch self {
        case .null: return nil
        case .text(let value), .jsonb(let value): return (try textBytes(value), false)
        case .int32(let value): return (Array(String(value).utf8), false)
        case .int64(let value): return (Array(String(value).utf8), false)
        case .bool(let value): return (Array((value ? "t" : "f").utf8), false)
        case .uuid(let value): return (Array(value.uuidString.utf8), false)
        case .timestamp(let value): return (Array(PostgresTimestamp.format(value).utf8), false)
        case .bytea(let value): return (value, true)
        case .int64Array(let values): return (Self.arrayLiteral(values), false)
        case .int32Array(let values): return (Self.arrayLiteral(values), false)
        case .textArray(let values):
            // Every element double-quoted, with `"` and `\` escaped by a backslash: the array input syntax.
            var bytes: [UInt8] = [UInt8(ascii: "{")]
            for (index, value) in values.enumerated() {
                if index > 0 { bytes.append(UInt8(ascii: ",")) }
                bytes.append(UInt8(ascii: "\""))
                for byte in try textBytes(value) {
                    if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") { bytes.append(UInt8(ascii: "\\")) }
                    bytes.append(byte)
                }
                bytes.append(UInt8(ascii: "\""))
            }
            bytes.append(UInt8(ascii: "}"))
            return (bytes, false)
        case .timestampArray(let values):
            // The timestamp text has a space: quoted.
            var bytes: [UInt8] = [UInt8(ascii: "{")]
            for (index, value) in values.enumerated() {
                if index > 0 { bytes.append(UInt8(ascii: ",")) }
                bytes.append(UInt8(ascii: "\""))
                bytes.append(contentsOf: PostgresTimestamp.format(value).utf8)
                bytes.append(UInt8(ascii: "\""))
            }
            bytes.append(UInt8(ascii: "}"))
            return (bytes, false)
        }
    }
}

extension PQBind {
    /// The text form of an integer array, `{1,2,3}`; integers need no quoting.
    fileprivate static func arrayLiteral<Integer: FixedWidthInteger>(_ values: [Integer]) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "{")]
        bytes.reserveCapacity(values.count * 8 + 2)
        for (index, value) in values.enumerated() {
            if index > 0 { bytes.append(UInt8(ascii: ",")) }
            bytes.append(contentsOf: String(value).utf8)
        }
        bytes.append(UInt8(ascii: "}"))
        return bytes
    }
}

/// The PostgreSQL types this client decodes by name.
public struct PQType: Hashable, Sendable, CustomStringConvertible {
    public let oid: UInt32
    public init(oid: UInt32) { self.oid = oid }

    public static let bool = PQType(oid: 16)
    public static let bytea = PQType(oid: 17)
    public static let int8 = PQType(oid: 20)
    public static let int2 = PQType(oid: 21)
    public static let int4 = PQType(oid: 23)
    public static let text = PQType(oid: 25)
    public static let json = PQType(oid: 114)
    public static let varchar = PQType(oid: 1043)
    public static let timestamptz = PQType(oid: 1184)
    public static let timestamp = PQType(oid: 1114)
    public static let numeric = PQType(oid: 1700)
    public static let uuid = PQType(oid: 2950)
    public static let jsonb = PQType(oid: 3802)
    public static let int4Array = PQType(oid: 1007)
    public static let int8Array = PQType(oid: 1016)
    public static let textArray = PQType(oid: 1009)
    public static let timestamptzArray = PQType(oid: 1185)

    public var description: String {
        switch self {
        case .bool: "bool"
        case .bytea: "bytea"
        case .int8: "int8"
        case .int2: "int2"
        case .int4: "int4"
        case .text: "text"
        case .json: "json"
        case .varchar: "varchar"
        case .timestamptz: "timestamptz"
        case .timestamp: "timestamp"
        case .numeric: "numeric"
        case .uuid: "uuid"
        case .jsonb: "jsonb"
        case .int4Array: "int4[]"
        case .int8Array: "int8[]"
        case .textArray: "text[]"
        case .timestamptzArray: "timestamptz[]"
        default: "oid \(oid)"
        }
    }
}
