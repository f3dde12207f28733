/// Which Kafka topic an event goes to: by event type first, then by stream category, else the default.
public struct OutboxRouting: Sendable {
    /// Default: `events`.
    public var defaultTopic: String
    public var topicByCategory: [String: String]
    public var topicByEventType: [String: String]

    public init(defaultTopic: String = "events", topicByCategory: [String: String] = [:], topicByEventType: [String: String] = [:]) {
        self.defaultTopic = defaultTopic
        self.topicByCategory = topicByCategory
        self.topicByEventType = topicByEventType
    }

    public func topic(eventType: String, category: String) -> String {
        topicByEventType[eventType] ?? topicByCategory[category] ?? defaultTopic
    }
}
