@_spi(Testing) import KafkaClient
import TestSupport
import Testing

/// What releasing a consumer costs the process.
@Suite("releasing Kafka consumers (kafka-mock-cluster)")
struct ConsumerReleaseTests {
    /// librdkafka 2.0.2 never finishes destroying a consumer after a fatal error; its rdk:main thread then wakes
    /// every millisecond for the rest of the process. In one test process that starved every other test (seen
    /// as dozens of timeouts in unrelated suites, with the stuck destroy found in gdb).
    @Test("a consumer that hit a fatal error is released without a destroy that never returns")
    func fatalConsumerIsNotLeftDestroying() async throws {
        let brokers = try TestEnvironment.kafkaBrokers()
        let topic = uniqueName("fatalrelease")
        let producer = try KafkaProducer(configuration: .init(bootstrapServers: brokers))
        let report = try await producer.send(KafkaOutgoingMessage(topic: topic, key: "k", value: "v"))
        #expect(report.error == nil)
        var consumer: KafkaConsumer? = try KafkaConsumer(configuration: restartable(brokers), groupID: uniqueName("fatalrelease"))
        try consumer!.subscribe(topics: [topic])
        var received: [KafkaMessage] = []
        try await waitUntil("the consumer joined its group and read the record") {
            received += try await consumer!.poll(upTo: 10, timeout: .milliseconds(200))
            return !received.isEmpty
        }
        consumer!.raiseFatalErrorForTesting("test: fatal")
        await #expect(throws: KafkaError.self) {
            for _ in 0..<50 { _ = try await consumer!.poll(timeout: .milliseconds(100)) }
        }
        await consumer!.close()
        let name = consumer!.clientName
        let abandonedBefore = RDKafkaHandle.abandonedClientCount
        consumer = nil
        try await waitUntil("no destroy of \(name) still running", timeout: .seconds(20)) {
            !RDKafkaHandle.clientsBeingDestroyed.contains(name)
        }
        // Another test may abandon one of its own meanwhile: at least this one.
        #expect(RDKafkaHandle.abandonedClientCount >= abandonedBefore + 1)
        await producer.close()
    }
}
