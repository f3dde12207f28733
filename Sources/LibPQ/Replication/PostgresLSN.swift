/// A position in PostgreSQL's write-ahead log (`pg_lsn`), written `16/B374D848` by the server.
public struct PostgresLSN: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var value: UInt64

    public init(_ value: UInt64) { self.value = value }

    /// Parses the server's text form (`XXX/XXX`, two hexadecimal halves); `nil` if `text` is not one.
    public init?(_ text: String) {
        let halves = text.split(separator: "/", omittingEmptySubsequences: false)
        guard halves.count == 2, !halves[0].isEmpty, !halves[1].isEmpty, halves[0].count <= 8, halves[1].count <= 8,
            let high = UInt64(halves[0], radix: 16), let low = UInt64(halves[1], radix: 16)
        else { return nil }
        value = high << 32 | low
    }

    /// The start of the log; as a replication start point it means "where the slot stands".
    public static let zero = PostgresLSN(0)

    public var description: String {
        String(value >> 32, radix: 16, uppercase: true) + "/" + String(value & 0xFFFF_FFFF, radix: 16, uppercase: true)
    }

    public static func < (lhs: PostgresLSN, rhs: PostgresLSN) -> Bool { lhs.value < rhs.value }
}
