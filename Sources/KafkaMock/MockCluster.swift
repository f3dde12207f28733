import CRdKafka
import KafkaClient
import Foundation
import Logging

/// librdkafka's built-in mock Kafka cluster (`rdkafka_mock.h`): real brokers speaking the Kafka protocol
/// on 127.0.0.1, with fault injection. It is the test broker of this project, since no Apache Kafka runs here.
///
/// The cluster lives as long as this object. Its brokers are numbered 1...N.
public final class MockCluster: @unchecked Sendable {
    // `rd_kafka_mock_*` calls are thread-safe: they post operations to the cluster's own thread.
    private let handle: RDKafkaHandle
    private let cluster: OpaquePointer

    /// Comma-separated `host:port` list for `bootstrap.servers`.
    public let bootstrapServers: String
    public let brokerCount: Int

    /// Starts a cluster of `brokers` brokers on ephemeral loopback ports.
    public init(brokers: Int = 3, logger: Logger = Logger(label: "eventoutbox.kafka.mock")) throws {
        precondition(brokers >= 1, "a mock cluster needs at least one broker")
        // The handle only hosts the cluster and never connects; quiet its "no bootstrap.servers" warning.
        let conf = try RDKafkaConfig.make(["log_level": "3"])
        handle = try RDKafkaHandle(type: RD_KAFKA_PRODUCER, conf: conf, context: RDKafkaContext(logger: logger))
        guard let cluster = rd_kafka_mock_cluster_new(handle.pointer, Int32(brokers)) else {
            throw KafkaError(code: .invalidArgument, message: "librdkafka could not start a mock cluster of \(brokers) brokers")
        }
        self.cluster = cluster
        self.brokerCount = brokers
        bootstrapServers = String(cString: rd_kafka_mock_cluster_bootstraps(cluster))
    }

    deinit {
        // Joins the cluster's thread; kept off the cooperative pool like rd_kafka_destroy (see RDKafkaHandle).
        let cluster = UnsafeSendablePointer(self.cluster)
        let handle = self.handle
        let thread = Thread {
            rd_kafka_mock_cluster_destroy(cluster.value)
            withExtendedLifetime(handle) {}
        }
        thread.start()
    }

    /// Creates a topic directly in the cluster.
    public func createTopic(_ name: String, partitions: Int32, replicationFactor: Int32 = 1) throws {
        let error = rd_kafka_mock_topic_create(cluster, name, partitions, replicationFactor)
        guard error == RD_KAFKA_RESP_ERR_NO_ERROR else {
            throw KafkaError(error, context: "mock cluster cannot create topic '\(name)'")
        }
    }

    /// Makes a broker close its connections and refuse new ones, as if it had crashed.
    ///
    /// librdkafka closes the broker's listening socket and binds its port again at once, without listening, so
    /// the port stays the broker's while it is down. Had another socket been given the port in between, the mock
    /// would abort the whole process (`rdkafka_mock.c`: "Failed to-create mock broker listener"); a connection
    /// held across the call keeps the port bound (``BrokerPortHold``), and no child process of this one may hold a
    /// copy of the listening socket then (``SpawnGuard``).
    public func setBrokerDown(_ brokerID: Int32) throws {
        guard let port = port(of: brokerID) else {
            throw KafkaError(code: .invalidArgument, message: "mock cluster has no broker \(brokerID) (brokers 1...\(brokerCount))")
        }
        // Closed only after the call returns: by then the mock has bound the port again.
        let hold = try BrokerPortHold(port: port)
        try withExtendedLifetime(hold) {
            try SpawnGuard.shared.excludingSpawns {
                try check(rd_kafka_mock_broker_set_down(cluster, brokerID), "set broker \(brokerID) down")
            }
        }
    }

    /// Makes a broker accept connections again.
    public func setBrokerUp(_ brokerID: Int32) throws {
        try check(rd_kafka_mock_broker_set_up(cluster, brokerID), "set broker \(brokerID) up")
    }

    /// The port of broker `brokerID`: librdkafka lists the brokers in `bootstrapServers` in the order of
    /// their ids, 1...N.
    public func port(of brokerID: Int32) -> UInt16? {
        let servers = bootstrapServers.split(separator: ",")
        guard brokerID >= 1, Int(brokerID) <= servers.count else { return nil }
        return servers[Int(brokerID) - 1].split(separator: ":").last.flatMap { UInt16($0) }
    }

    /// Sets every broker down (the whole cluster unreachable).
    public func setAllBrokersDown() throws {
        for id in 1...brokerCount { try setBrokerDown(Int32(id)) }
    }

    /// Sets every broker up again.
    public func setAllBrokersUp() throws {
        for id in 1...brokerCount { try setBrokerUp(Int32(id)) }
    }

    /// The next requests of kind `api`, on any broker, fail with these errors in turn.
    public func pushRequestErrors(_ api: KafkaAPI, _ errors: [KafkaError.Code]) {
        let raw = errors.map { rd_kafka_resp_err_t(rawValue: $0.rawValue) }
        rd_kafka_mock_push_request_errors_array(cluster, api.rawValue, raw.count, raw)
    }

    /// Drops errors still queued for `api`.
    public func clearRequestErrors(_ api: KafkaAPI) {
        rd_kafka_mock_clear_request_errors(cluster, api.rawValue)
    }

    /// Delays every response of a broker by `milliseconds` (0: no delay), as a slow network or broker would.
    public func setRoundTrip(broker brokerID: Int32, milliseconds: Int32) throws {
        try check(rd_kafka_mock_broker_set_rtt(cluster, brokerID, Int32(milliseconds)), "set the round trip of broker \(brokerID)")
    }

    private func check(_ error: rd_kafka_resp_err_t, _ what: String) throws {
        guard error == RD_KAFKA_RESP_ERR_NO_ERROR else { throw KafkaError(error, context: "mock cluster cannot \(what)") }
    }
}

/// A Kafka protocol request kind (ApiKey), for fault injection.
public struct KafkaAPI: Hashable, Sendable {
    public let rawValue: Int16
    public init(rawValue: Int16) { self.rawValue = rawValue }

    public static let produce = KafkaAPI(rawValue: 0)
    public static let fetch = KafkaAPI(rawValue: 1)
    public static let listOffsets = KafkaAPI(rawValue: 2)
    public static let metadata = KafkaAPI(rawValue: 3)
    public static let offsetCommit = KafkaAPI(rawValue: 8)
    public static let offsetFetch = KafkaAPI(rawValue: 9)
    public static let findCoordinator = KafkaAPI(rawValue: 10)
    public static let joinGroup = KafkaAPI(rawValue: 11)
    public static let heartbeat = KafkaAPI(rawValue: 12)
    public static let initProducerID = KafkaAPI(rawValue: 22)
}
