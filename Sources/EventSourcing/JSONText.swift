import Foundation

/// JSON text written directly, for the few shapes written on every append (envelope, metadata, headers):
/// the same bytes as ``EventJSON/encoder`` (sorted keys, slashes unescaped) at a fraction of the cost of a
/// `JSONEncoder` pass. Tests compare both.
public enum JSONText {
    /// `value` as a JSON string literal, quoted and escaped.
    public static func string(_ value: String) -> String {
        var needsEscaping = false
        for byte in value.utf8 where byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") {
            needsEscaping = true
            break
        }
        guard needsEscaping else { return "\"" + value + "\"" }
        var text = "\""
        text.reserveCapacity(value.utf8.count + 8)
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": text += "\\\""
            case "\\": text += "\\\\"
            case "\n": text += "\\n"
            case "\r": text += "\\r"
            case "\t": text += "\\t"
            case "\u{08}": text += "\\b"
            case "\u{0C}": text += "\\f"
            case let control where control.value < 0x20:
                let hex = String(control.value, radix: 16)
                text += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: text.unicodeScalars.append(scalar)
            }
        }
        return text + "\""
    }

    /// An object from members already encoded as JSON, written in the order given (callers pass sorted keys).
    public static func object(_ members: [(key: String, json: String)]) -> String {
        "{" + members.map { string($0.key) + ":" + $0.json }.joined(separator: ",") + "}"
    }
}

extension EventMetadata {
    /// The metadata as ``EventJSON/encoder`` writes it (absent fields omitted, keys sorted).
    public var jsonText: String {
        JSONText.object(
            [("actor", actor), ("causationID", causationID), ("correlationID", correlationID), ("traceparent", traceparent)]
                .compactMap { key, value in value.map { (key, JSONText.string($0)) } })
    }
}

extension OutboxEnvelope {
    /// The envelope of an event about to be stored, as ``encoded()`` writes it, with the payload and metadata
    /// JSON spliced in as they will be stored (no decode and re-encode of the payload).
    public static func jsonText(
        eventID: UUID, streamID: String, streamVersion: Int64, eventType: String, schemaVersion: Int, occurredAt: Date,
        payloadJSON: String, metadataJSON: String
    ) -> String {
        JSONText.object([
            ("eventId", "\"" + eventID.uuidString.lowercased() + "\""),
            ("eventType", JSONText.string(eventType)),
            ("metadata", metadataJSON),
            ("occurredAt", "\"" + ISOTimestamp.format(occurredAt) + "\""),
            ("payload", payloadJSON),
            ("schemaVersion", String(schemaVersion)),
            ("streamId", JSONText.string(streamID)),
            ("streamVersion", String(streamVersion)),
        ])
    }
}

extension JSONText {
    /// Reads a flat JSON object whose values are all strings (`{"a": "1", "b": "x\"y"}`, as PostgreSQL prints
    /// a `jsonb` of headers); `nil` for anything else. A small scanner instead of `JSONDecoder`, which cost a
    /// relay a third of its CPU on this one column.
    public static func stringObject(_ text: String) -> [String: String]? {
        var text = text
        return text.withUTF8 { bytes in
            var scanner = JSONScanner(bytes: bytes)
            return scanner.object()
        }
    }

    /// The members of a JSON object, in order, each value as the byte range of its raw JSON text; `nil` if
    /// `bytes` is not one well-formed JSON object (nesting deeper than 256 levels counts as malformed).
    /// For reading a few fields of a document without building its whole tree.
    public static func members(of bytes: UnsafeBufferPointer<UInt8>) -> [(key: String, value: Range<Int>)]? {
        var scanner = JSONScanner(bytes: bytes)
        return scanner.members()
    }
}

/// A small JSON scanner over UTF-8 bytes, behind ``JSONText/stringObject(_:)`` and ``JSONText/members(of:)``.
private struct JSONScanner {
    let bytes: UnsafeBufferPointer<UInt8>
    var index = 0

    mutating func object() -> [String: String]? {
        guard expect(UInt8(ascii: "{")) else { return nil }
        var object: [String: String] = [:]
        if !expect(UInt8(ascii: "}")) {
            while true {
                guard let key = string(), expect(UInt8(ascii: ":")), let value = string() else { return nil }
                if object[key] == nil { object[key] = value }  // the first wins, as with JSONDecoder
                if expect(UInt8(ascii: ",")) { continue }
                guard expect(UInt8(ascii: "}")) else { return nil }
                break
            }
        }
        skipSpace()
        return index == bytes.count ? object : nil
    }

    mutating func members() -> [(key: String, value: Range<Int>)]? {
        guard expect(UInt8(ascii: "{")) else { return nil }
        var members: [(key: String, value: Range<Int>)] = []
        if !expect(UInt8(ascii: "}")) {
            while true {
                guard let key = string(), expect(UInt8(ascii: ":")) else { return nil }
                skipSpace()
                let start = index
                guard skipValue(depth: 1) else { return nil }
                members.append((key, start..<index))
                if expect(UInt8(ascii: ",")) { continue }
                guard expect(UInt8(ascii: "}")) else { return nil }
                break
            }
        }
        skipSpace()
        return index == bytes.count ? members : nil
    }

    /// Moves past one JSON value, checking its syntax; `false` if it is malformed.
    private mutating func skipValue(depth: Int) -> Bool {
        guard depth <= 256 else { return false }
        skipSpace()
        guard index < bytes.count else { return false }
        switch bytes[index] {
        case UInt8(ascii: "\""):
            return string() != nil
        case UInt8(ascii: "{"):
            index += 1
            if expect(UInt8(ascii: "}")) { return true }
            repeat {
                guard string() != nil, expect(UInt8(ascii: ":")), skipValue(depth: depth + 1) else { return false }
            } while expect(UInt8(ascii: ","))
            return expect(UInt8(ascii: "}"))
        case UInt8(ascii: "["):
            index += 1
            if expect(UInt8(ascii: "]")) { return true }
            repeat {
                guard skipValue(depth: depth + 1) else { return false }
            } while expect(UInt8(ascii: ","))
            return expect(UInt8(ascii: "]"))
        case UInt8(ascii: "t"): return literal("true")
        case UInt8(ascii: "f"): return literal("false")
        case UInt8(ascii: "n"): return literal("null")
        default: return number()
        }
    }

    private mutating func literal(_ word: StaticString) -> Bool {
        let count = word.utf8CodeUnitCount
        guard index + count <= bytes.count else { return false }
        for offset in 0..<count where bytes[index + offset] != word.utf8Start[offset] { return false }
        index += count
        return true
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    private mutating func number() -> Bool {
        func digits() -> Int {
            let start = index
            while index < bytes.count, bytes[index] >= UInt8(ascii: "0"), bytes[index] <= UInt8(ascii: "9") { index += 1 }
            return index - start
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: "-") { index += 1 }
        let first = index
        let integer = digits()
        guard integer > 0, integer == 1 || bytes[first] != UInt8(ascii: "0") else { return false }
        if index < bytes.count, bytes[index] == UInt8(ascii: ".") {
            index += 1
            guard digits() > 0 else { return false }
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E") {
            index += 1
            if index < bytes.count, bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-") { index += 1 }
            guard digits() > 0 else { return false }
        }
        return true
    }

    private mutating func skipSpace() {
        while index < bytes.count, bytes[index] == 0x20 || bytes[index] == 0x0A || bytes[index] == 0x0D || bytes[index] == 0x09 {
            index += 1
        }
    }

    private mutating func expect(_ byte: UInt8) -> Bool {
        skipSpace()
        guard index < bytes.count, bytes[index] == byte else { return false }
        index += 1
        return true
    }

    mutating func string() -> String? {
        guard expect(UInt8(ascii: "\"")) else { return nil }
        let start = index
        // Fast path: no escapes, the bytes are the string.
        while index < bytes.count, bytes[index] != UInt8(ascii: "\""), bytes[index] != UInt8(ascii: "\\"), bytes[index] >= 0x20 {
            index += 1
        }
        guard index < bytes.count else { return nil }
        if bytes[index] == UInt8(ascii: "\"") {
            defer { index += 1 }
            return String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self)
        }
        var decoded = Array(bytes[start..<index])
        while index < bytes.count {
            let byte = bytes[index]
            index += 1
            switch byte {
            case UInt8(ascii: "\""):
                return String(decoding: decoded, as: UTF8.self)
            case UInt8(ascii: "\\"):
                guard index < bytes.count else { return nil }
                let escaped = bytes[index]
                index += 1
                switch escaped {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): decoded.append(escaped)
                case UInt8(ascii: "b"): decoded.append(0x08)
                case UInt8(ascii: "f"): decoded.append(0x0C)
                case UInt8(ascii: "n"): decoded.append(0x0A)
                case UInt8(ascii: "r"): decoded.append(0x0D)
                case UInt8(ascii: "t"): decoded.append(0x09)
                case UInt8(ascii: "u"):
                    guard var scalar = hex4() else { return nil }
                    if (0xD800..<0xDC00).contains(scalar) {
                        // A surrogate pair: the low half must follow.
                        guard index + 1 < bytes.count, bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") else {
                            return nil
                        }
                        index += 2
                        guard let low = hex4(), (0xDC00..<0xE000).contains(low) else { return nil }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    }
                    guard let unicode = Unicode.Scalar(scalar) else { return nil }
                    decoded += Array(String(Character(unicode)).utf8)
                default: return nil
                }
            case ..<0x20: return nil
            default: decoded.append(byte)
            }
        }
        return nil
    }

    private mutating func hex4() -> UInt32? {
        guard index + 4 <= bytes.count else { return nil }
        var value: UInt32 = 0
        for byte in bytes[index..<index + 4] {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): value = value << 4 | UInt32(byte - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): value = value << 4 | UInt32(byte - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): value = value << 4 | UInt32(byte - UInt8(ascii: "A") + 10)
            default: return nil
            }
        }
        index += 4
        return value
    }
}
