/// A Kafka record header. Kafka allows repeated names; order is kept.
public struct KafkaHeader: Sendable, Hashable {
    public var name: String
    public var value: [UInt8]?

    public init(name: String, value: [UInt8]?) {
        self.name = name
        self.value = value
    }

    public init(name: String, value: String) {
        self.init(name: name, value: Array(value.utf8))
    }

    /// The value as UTF-8 text, if it is valid UTF-8.
    public var stringValue: String? { value.flatMap { String(validating: $0, as: UTF8.self) } }
}

/// A record to produce.
public struct KafkaOutgoingMessage: Sendable {
    public var topic: String
    /// Records with the same key go to the same partition (librdkafka's default partitioner), in order.
    public var key: [UInt8]?
    public var value: [UInt8]?
    public var headers: [KafkaHeader]
    /// A fixed partition; `nil` lets the partitioner choose from the key.
    public var partition: Int32?

    public init(topic: String, key: [UInt8]?, value: [UInt8]?, headers: [KafkaHeader] = [], partition: Int32? = nil) {
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self.partition = partition
    }

    public init(topic: String, key: String?, value: String?, headers: [KafkaHeader] = []) {
        self.init(topic: topic, key: key.map { Array($0.utf8) }, value: value.map { Array($0.utf8) }, headers: headers)
    }
}

/// A record received by a ``KafkaConsumer``.
public struct KafkaMessage: Sendable {
    public var topic: String
    public var partition: Int32
    public var offset: Int64
    public var key: [UInt8]?
    public var value: [UInt8]?
    public var headers: [KafkaHeader]
    /// Milliseconds since the epoch, if the record has a timestamp.
    public var timestampMilliseconds: Int64?

    public var keyString: String? { key.flatMap { String(validating: $0, as: UTF8.self) } }
    public var valueString: String? { value.flatMap { String(validating: $0, as: UTF8.self) } }

    /// The first header with this name.
    public func header(_ name: String) -> KafkaHeader? { headers.first { $0.name == name } }
}

/// Where a produced record was stored, or why it was not.
public struct KafkaDeliveryReport: Sendable {
    /// The id the record was enqueued with (``KafkaProducer/enqueue(_:messageID:)``), so that a report
    /// handler can tell which record this is.
    public var messageID: UInt64
    public var topic: String
    public var partition: Int32
    /// The record's offset; `nil` when delivery failed.
    public var offset: Int64?
    /// Why delivery failed; `nil` on success.
    public var error: KafkaError?

    public var isDelivered: Bool { error == nil }

    public init(messageID: UInt64 = 0, topic: String, partition: Int32, offset: Int64?, error: KafkaError?) {
        self.messageID = messageID
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.error = error
    }
}

/// A position in a partition: the offset of the next record to read.
public struct KafkaTopicPartitionOffset: Sendable, Hashable {
    public var topic: String
    public var partition: Int32
    public var offset: Int64

    public init(topic: String, partition: Int32, offset: Int64) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
    }
}
