import Foundation
#if canImport(Glibc)
import Glibc
#endif
import KafkaClient
import KafkaMock
import TestSupport
import Testing

/// librdkafka 2.0's mock cluster does not drop a member that left the group until its session times out
/// (default 45 s), so a restarted member waits for that; and a rebalance that is not a group's first waits
/// the session timeout less 1 s for members (rdkafka_mock_cgrp.c). A short session keeps both quick.
func restartable(_ brokers: String) -> KafkaConfiguration {
    KafkaConfiguration(bootstrapServers: brokers, properties: ["session.timeout.ms": "6000", "heartbeat.interval.ms": "500"])
}

@Suite("Kafka producer and consumer over TCP (kafka-mock-cluster)")
struct KafkaRoundTripTests {
    @Test("keys, headers and values arrive intact; records with the same key arrive in order")
    func producerToConsumer() async throws {
        let brokers = try TestEnvironment.kafkaBrokers()
        let topic = uniqueName("roundtrip")
        // The mock cluster creates a topic (4 partitions) when a producer first names it.
        let producer = try KafkaProducer(configuration: .init(bootstrapServers: brokers))
        let keys = ["account-1", "account-\"2\"", "🏦-3"]
        var promises: [KafkaDeliveryPromise] = []
        for index in 0..<90 {
            let key = keys[index % keys.count]
            promises.append(
                try producer.enqueue(
                    KafkaOutgoingMessage(
                        topic: topic, key: key, value: "{\"n\":\(index),\"text\":\"ünï \\\"q\\\"\"}",
                        headers: [
                            KafkaHeader(name: "event-id", value: "id-\(index)"),
                            KafkaHeader(name: "binary", value: [0, 255, 1]),
                            KafkaHeader(name: "empty", value: nil),
                        ])))
        }
        for promise in promises {
            let report = await promise.report()
            #expect(report.error == nil)
            #expect(report.offset != nil)
        }
        await producer.close()

        // A short session: the mock holds a group's rebalance for the session timeout less 1 s (44 s by default)
        // when a member's JoinGroup comes again, as it does on a busy machine.
        let consumer = try KafkaConsumer(configuration: restartable(brokers), groupID: uniqueName("group"))
        try consumer.subscribe(topics: [topic])
        var received: [KafkaMessage] = []
        try await waitUntil("90 records consumed", timeout: .seconds(90)) {
            if let message = try await consumer.poll(timeout: .milliseconds(200)) { received.append(message) }
            return received.count >= 90
        }
        await consumer.close()

        #expect(received.count == 90)
        for key in keys {
            let numbers = received.filter { $0.keyString == key }.map { message -> Int in
                let text = message.valueString ?? ""
                return Int(text.split(separator: ",")[0].dropFirst(5)) ?? -1
            }
            #expect(numbers == Array(stride(from: keys.firstIndex(of: key)!, to: 90, by: 3)))
            #expect(Set(received.filter { $0.keyString == key }.map(\.partition)).count == 1)
        }
        let first = try #require(received.first { $0.header("event-id")?.stringValue == "id-0" })
        #expect(first.keyString == keys[0])
        #expect(first.valueString == "{\"n\":0,\"text\":\"ünï \\\"q\\\"\"}")
        #expect(first.header("binary")?.value == [0, 255, 1])
        #expect(first.header("empty") != nil)
        #expect(first.header("empty")?.value == nil)
    }

    @Test("a consumer that committed offset N and restarts resumes at N")
    func resumesAtCommittedOffset() async throws {
        let brokers = try TestEnvironment.kafkaBrokers()
        let topic = uniqueName("resume")
        let group = uniqueName("group")
        let producer = try KafkaProducer(configuration: .init(bootstrapServers: brokers))
        for index in 0..<10 {
            let report = try await producer.send(
                .init(topic: topic, key: Array("k".utf8), value: Array("m\(index)".utf8), partition: 0))
            #expect(report.offset == Int64(index))
        }
        await producer.close()

        let first = try KafkaConsumer(configuration: restartable(brokers), groupID: group)
        try first.subscribe(topics: [topic])
        var seen: [KafkaMessage] = []
        try await waitUntil("first 5 records") {
            if let message = try await first.poll(timeout: .milliseconds(200)) { seen.append(message) }
            return seen.count >= 5
        }
        try await first.commit(seen[4])  // commits offset 5: the next record to read
        let committed = try await first.committed([KafkaTopicPartition(topic: topic, partition: 0)])
        #expect(committed.first?.offset == 5)
        await first.close()

        let second = try KafkaConsumer(configuration: restartable(brokers), groupID: group)
        try second.subscribe(topics: [topic])
        var resumed: KafkaMessage?
        try await waitUntil("a record after restart") {
            resumed = try await second.poll(timeout: .milliseconds(200))
            return resumed != nil
        }
        #expect(resumed?.offset == 5)
        #expect(resumed?.valueString == "m5")
        await second.close()
    }

    @Test("the group announces the partitions it assigns")
    func rebalanceEvents() async throws {
        let brokers = try TestEnvironment.kafkaBrokers()
        let topic = uniqueName("rebalance")
        let producer = try KafkaProducer(configuration: .init(bootstrapServers: brokers))
        #expect(try await producer.send(.init(topic: topic, key: "k", value: "creates the topic")).error == nil)
        await producer.close()
        let consumer = try KafkaConsumer(configuration: .init(bootstrapServers: brokers), groupID: uniqueName("group"))
        try consumer.subscribe(topics: [topic])
        let events = Task {
            for await event in consumer.rebalanceEvents {
                if case .assigned(let partitions) = event { return partitions }
            }
            return []
        }
        try await waitUntil("an assignment") {
            _ = try await consumer.poll(timeout: .milliseconds(100))
            return try await !consumer.assignment().isEmpty
        }
        await consumer.close()
        let assigned = await events.value
        #expect(Set(assigned) == Set((0..<4).map { KafkaTopicPartition(topic: topic, partition: $0) }))
    }

    @Test("topic creation against a broker without the CreateTopics API fails with a clear error, not a hang")
    func createTopicUnsupported() async throws {
        // librdkafka 2.0's mock cluster does not implement CreateTopics; a real broker does.
        let admin = try KafkaAdmin(configuration: .init(bootstrapServers: try TestEnvironment.kafkaBrokers()))
        let error = await #expect(throws: KafkaError.self) {
            try await admin.createTopic(uniqueName("admin"), partitions: 2, timeout: .seconds(1))
        }
        #expect(error?.description.contains("admin_") == true)
    }

    @Test("an unknown librdkafka property is refused with its name")
    func invalidProperty() throws {
        let error = #expect(throws: KafkaError.self) {
            try KafkaProducer(configuration: .init(bootstrapServers: "127.0.0.1:1", properties: ["no.such.thing": "1"]))
        }
        #expect(error?.description.contains("no.such.thing") == true)
        #expect(error?.code == .invalidConfiguration)
        #expect(KafkaError.Code.invalidConfiguration != .invalidArgument)
        #expect(KafkaError.Code.invalidConfiguration.name == "INVALID_CONFIGURATION")
        #expect(throws: KafkaError.self) { try KafkaConfiguration.parseProperties(["linger.ms"]) }
        #expect(try KafkaConfiguration.parseProperties(["a=b=c", "x="]) == ["a": "b=c", "x": ""])
    }

    @Test("a rejected property never shows a secret: mistyped names and credential properties hide the value")
    func rejectedPropertiesHideSecrets() throws {
        for (key, value) in [("sasl.pasword", "hunter2-s3cret"), ("linger.ms", "not-a-number")] {
            let error = #expect(throws: KafkaError.self) {
                try KafkaProducer(configuration: .init(bootstrapServers: "127.0.0.1:1", properties: [key: value]))
            }
            let text = "\(error.map { "\($0)" } ?? "")"
            #expect(text.contains(key))
            if key == "linger.ms" {
                #expect(text.contains("not-a-number"), "a plain setting's bad value is shown: \(text)")
            } else {
                #expect(!text.contains(value), "secret leaked: \(text)")
                #expect(text.contains("value hidden"))
            }
        }
        let malformed = #expect(throws: KafkaError.self) { try KafkaConfiguration.parseProperties(["sasl.password hunter2"]) }
        #expect(malformed?.code == .invalidConfiguration)
        #expect(malformed.map { "\($0)".contains("hunter2") } == false)
        #expect(malformed.map { "\($0)".contains("sasl.password") } == true)
    }
}

@Suite("Kafka faults (in-process mock cluster, clients over TCP)")
struct KafkaFaultTests {
    @Test("with the broker down, delivery fails with a clear error; once it is back, produce succeeds")
    func brokerDown() async throws {
        let cluster = try MockCluster(brokers: 1)
        let topic = uniqueName("faults")
        try cluster.createTopic(topic, partitions: 1)
        let producer = try KafkaProducer(
            configuration: .init(bootstrapServers: cluster.bootstrapServers, properties: ["message.timeout.ms": "1500"]))
        let before = try await producer.send(.init(topic: topic, key: "k", value: "before"))
        #expect(before.error == nil)

        try cluster.setBrokerDown(1)
        let during = try await producer.send(.init(topic: topic, key: "k", value: "during"))
        let error = try #require(during.error)
        #expect(error.code == .messageTimedOut)
        #expect(error.isRetriable)
        #expect(error.description.contains(topic))

        try cluster.setBrokerUp(1)
        var after: KafkaDeliveryReport?
        try await waitUntil("a delivery after the broker is back") {
            after = try await producer.send(.init(topic: topic, key: "k", value: "after"))
            return after?.error == nil
        }
        #expect(after?.offset ?? 0 >= 1)
        await producer.close()
    }

    @Test("a broker that is down refuses connections and keeps its port: no client can take it before it comes back")
    func brokerDownKeepsItsPort() async throws {
        let cluster = try MockCluster(brokers: 3)
        let ports = (1...3).compactMap { cluster.port(of: Int32($0)) }
        #expect(ports.count == 3 && Set(ports).count == 3, "\(cluster.bootstrapServers)")
        #expect(cluster.port(of: 0) == nil && cluster.port(of: 4) == nil)

        // Broker 2 has had no connection yet, so no TIME_WAIT socket holds its port: only the mock itself can.
        try cluster.setBrokerDown(2)
        // What a client's outgoing connection would need to be given the port as its own: a plain bind.
        #expect(try loopbackBind(ports[1]) == EADDRINUSE, "the port of a broker that is down stays taken")
        #expect(try loopbackConnect(ports[1]) == ECONNREFUSED, "broker 2 is down")
        #expect(try loopbackConnect(ports[0]) == 0 && loopbackConnect(ports[2]) == 0, "the others are not")

        try cluster.setBrokerUp(2)
        #expect(try loopbackConnect(ports[1]) == 0, "broker 2 is back on its port")
        try cluster.setAllBrokersDown()
        #expect(try ports.map(loopbackConnect) == [ECONNREFUSED, ECONNREFUSED, ECONNREFUSED])
        try cluster.setAllBrokersUp()
        #expect(try ports.map(loopbackConnect) == [0, 0, 0])
    }

    /// Connects to 127.0.0.1:`port`; 0 or the errno.
    private func loopbackConnect(_ port: UInt16) throws -> Int32 {
        try onLoopbackSocket(port) { socket, address, length in connect(socket, address, length) }
    }

    /// Binds 127.0.0.1:`port` without SO_REUSEADDR; 0 or the errno.
    private func loopbackBind(_ port: UInt16) throws -> Int32 {
        try onLoopbackSocket(port) { socket, address, length in bind(socket, address, length) }
    }

    private func onLoopbackSocket(
        _ port: UInt16, _ body: (Int32, UnsafePointer<sockaddr>, socklen_t) -> Int32
    ) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        return result == 0 ? 0 : errno
    }

    @Test("injected produce errors are retried by the idempotent producer without duplicates")
    func injectedErrorsAreRetried() async throws {
        let cluster = try MockCluster(brokers: 1)
        let topic = uniqueName("retry")
        try cluster.createTopic(topic, partitions: 1)
        let producer = try KafkaProducer(configuration: .init(bootstrapServers: cluster.bootstrapServers))
        _ = try await producer.send(.init(topic: topic, key: "k", value: "warm-up"))
        cluster.pushRequestErrors(.produce, [.notEnoughReplicas, .notEnoughReplicas])
        let report = try await producer.send(.init(topic: topic, key: "k", value: "retried"))
        #expect(report.error == nil)
        #expect(report.offset == 1)
        await producer.close()
    }

    @Test("closing a producer fails the records it could not deliver instead of leaving them waiting")
    func closeFailsUndelivered() async throws {
        let cluster = try MockCluster(brokers: 1)
        let topic = uniqueName("close")
        try cluster.createTopic(topic, partitions: 1)
        let producer = try KafkaProducer(configuration: .init(bootstrapServers: cluster.bootstrapServers))
        try cluster.setBrokerDown(1)
        let promise = try producer.enqueue(.init(topic: topic, key: "k", value: "stranded"))
        await producer.close(timeout: .milliseconds(200))
        let report = await promise.report()
        #expect(report.error != nil)
        #expect(throws: KafkaError.self) { try producer.enqueue(.init(topic: topic, key: "k", value: "late")) }
    }
}
