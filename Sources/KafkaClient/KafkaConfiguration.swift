/// Settings for a Kafka client: the bootstrap servers plus any librdkafka property, by the names in
/// librdkafka's CONFIGURATION.md (`message.timeout.ms`, `linger.ms`, `security.protocol`, ...).
public struct KafkaConfiguration: Sendable {
    /// Comma-separated `host:port` list (`bootstrap.servers`).
    public var bootstrapServers: String
    /// librdkafka properties passed through unchanged; they override this wrapper's defaults.
    public var properties: [String: String]

    public init(bootstrapServers: String, properties: [String: String] = [:]) {
        self.bootstrapServers = bootstrapServers
        self.properties = properties
    }

    /// Parses `key=value` strings (as given by `--kafka-property`) into properties.
    /// - Throws: ``KafkaError`` naming the malformed entry.
    public static func parseProperties(_ entries: [String]) throws -> [String: String] {
        var properties: [String: String] = [:]
        for entry in entries {
            guard let equals = entry.firstIndex(of: "="), equals != entry.startIndex else {
                throw KafkaError(
                    code: .invalidConfiguration,
                    // Only the leading name is echoed: the rest may be a secret typed without its '='.
                    message: "Kafka property '\(entry.prefix { $0.isLetter || $0.isNumber || $0 == "." || $0 == "_" || $0 == "-" })...' is not of the form key=value (e.g. linger.ms=5)"
                )
            }
            properties[String(entry[..<equals])] = String(entry[entry.index(after: equals)...])
        }
        return properties
    }

    func merged(over defaults: [String: String]) -> [String: String] {
        var all = defaults
        all["bootstrap.servers"] = bootstrapServers
        for (key, value) in properties { all[key] = value }
        return all
    }
}
