import CRdKafka

/// An error from librdkafka or from this wrapper: the librdkafka error code, its message, and what failed.
/// Two errors are equal when code, message and flags are.
public struct KafkaError: Error, CustomStringConvertible, Sendable, Equatable {
    /// A librdkafka error code (`rd_kafka_resp_err_t`), kept opaque so no C type leaks into the API.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        package let rawValue: Int32
        package init(rawValue: Int32) { self.rawValue = rawValue }
        package init(_ error: rd_kafka_resp_err_t) { self.rawValue = error.rawValue }

        /// librdkafka's name for the code, e.g. `_MSG_TIMED_OUT` or `MSG_SIZE_TOO_LARGE`.
        public var name: String {
            if self == .invalidConfiguration { return "INVALID_CONFIGURATION" }
            return String(cString: rd_kafka_err2name(rd_kafka_resp_err_t(rawValue: rawValue)))
        }
        public var description: String { name }

        public static let messageTimedOut = Code(RD_KAFKA_RESP_ERR__MSG_TIMED_OUT)
        public static let queueFull = Code(RD_KAFKA_RESP_ERR__QUEUE_FULL)
        public static let messageSizeTooLarge = Code(RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE)
        public static let transport = Code(RD_KAFKA_RESP_ERR__TRANSPORT)
        public static let allBrokersDown = Code(RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
        public static let unknownTopicOrPartition = Code(RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        public static let topicAlreadyExists = Code(RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
        public static let notLeaderForPartition = Code(RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION)
        public static let notEnoughReplicas = Code(RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS)
        public static let requestTimedOut = Code(RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT)
        public static let illegalGeneration = Code(RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION)
        public static let unknownMemberID = Code(RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID)
        public static let outOfOrderSequenceNumber = Code(RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER)
        public static let purgedQueue = Code(RD_KAFKA_RESP_ERR__PURGE_QUEUE)
        public static let purgedInFlight = Code(RD_KAFKA_RESP_ERR__PURGE_INFLIGHT)
        public static let timedOut = Code(RD_KAFKA_RESP_ERR__TIMED_OUT)
        public static let invalidArgument = Code(RD_KAFKA_RESP_ERR__INVALID_ARG)
        public static let fatal = Code(RD_KAFKA_RESP_ERR__FATAL)
        public static let noOffset = Code(RD_KAFKA_RESP_ERR__NO_OFFSET)
        public static let invalidMessage = Code(RD_KAFKA_RESP_ERR_INVALID_MSG)
        public static let recordListTooLarge = Code(RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE)
        public static let invalidRecord = Code(RD_KAFKA_RESP_ERR_INVALID_RECORD)
        public static let invalidTopic = Code(RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION)
        public static let topicAuthorizationFailed = Code(RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
        /// A newer producer with the same `transactional.id` has initialized: this one can commit nothing more.
        public static let fenced = Code(RD_KAFKA_RESP_ERR__FENCED)
        public static let producerFenced = Code(RD_KAFKA_RESP_ERR_PRODUCER_FENCED)
        public static let invalidProducerEpoch = Code(RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH)
        /// Reading a partition reached its end (``KafkaPartitionReader``).
        public static let partitionEOF = Code(RD_KAFKA_RESP_ERR__PARTITION_EOF)
        /// Not a librdkafka code: a property name or value that librdkafka rejected, or a malformed
        /// `key=value`. Distinct from ``invalidArgument`` (a call librdkafka refused).
        public static let invalidConfiguration = Code(rawValue: -10_001)
        /// Not a librdkafka code: the client was closed.
        public static let closed = Code(RD_KAFKA_RESP_ERR__DESTROY)
    }

    public var code: Code
    /// librdkafka's message for this error, plus context from this wrapper.
    public var message: String
    /// librdkafka says the error is fatal: the client must be recreated.
    public var isFatal: Bool
    /// librdkafka says the operation may succeed if retried.
    public var isRetriable: Bool
    /// librdkafka says the current transaction must be aborted (the producer itself can go on).
    public var requiresAbort: Bool

    public init(code: Code, message: String, isFatal: Bool = false, isRetriable: Bool = false, requiresAbort: Bool = false) {
        self.code = code
        self.message = message
        self.isFatal = isFatal
        self.isRetriable = isRetriable
        self.requiresAbort = requiresAbort
    }

    /// A newer producer with this producer's `transactional.id` took over: it must never commit again.
    public var isFenced: Bool { [.fenced, .producerFenced, .invalidProducerEpoch].contains(code) }

    package init(_ error: rd_kafka_resp_err_t, context: String) {
        self.init(
            code: Code(error),
            message: "\(context): \(String(cString: rd_kafka_err2str(error)))",
            isRetriable: Self.retriableCodes.contains(Code(error))
        )
    }

    /// Takes ownership of an `rd_kafka_error_t` and destroys it.
    init(consuming error: OpaquePointer, context: String) {
        defer { rd_kafka_error_destroy(error) }
        self.init(
            code: Code(rd_kafka_error_code(error)),
            message: "\(context): \(String(cString: rd_kafka_error_string(error)))",
            isFatal: rd_kafka_error_is_fatal(error) != 0,
            isRetriable: rd_kafka_error_is_retriable(error) != 0,
            requiresAbort: rd_kafka_error_txn_requires_abort(error) != 0
        )
    }

    private static let retriableCodes: Set<Code> = [
        .messageTimedOut, .queueFull, .transport, .allBrokersDown, .notLeaderForPartition, .notEnoughReplicas,
        .requestTimedOut, .timedOut,
    ]

    /// `true` when sending the same record again can never succeed (too large, invalid, not authorized).
    public var isPermanentForRecord: Bool { Self.permanentRecordCodes.contains(code) }

    private static let permanentRecordCodes: Set<Code> = [
        .messageSizeTooLarge, .invalidMessage, .recordListTooLarge, .invalidRecord, .invalidTopic,
        .topicAuthorizationFailed,
    ]

    public var description: String { "Kafka error \(code.name): \(message)" }
}
