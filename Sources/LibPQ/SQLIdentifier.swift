import Foundation

/// SQL identifiers (table, index names) that must be spliced into statements: identifiers cannot be bound
/// parameters.
public enum SQLIdentifier {
    /// `name` as a quoted identifier (`"name"`, inner quotes doubled): safe whatever the name holds.
    public static func quoted(_ name: String) -> String {
        "\"" + name.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }

    /// Whether `name` is a plain identifier: lower-case ASCII letters, digits and `_`, not starting with a digit,
    /// at most 63 bytes. Such a name means the same quoted or not (PostgreSQL folds unquoted names to lower
    /// case), so code that splices it unquoted cannot be misled by it.
    public static func isPlain(_ name: String) -> Bool {
        guard let first = name.utf8.first, name.utf8.count <= 63, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else {
            return false
        }
        return name.utf8.allSatisfy {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || $0 == UInt8(ascii: "_")
        }
    }
}
