import Foundation
import KafkaClient
import KafkaMock
import TestSupport
import Testing

@Suite("kafka-mock-cluster --control: faults on demand from outside")
struct MockClusterControlTests {
    @Test("commands parse; anything else is an error that shows the syntax")
    func parsing() throws {
        #expect(try MockClusterCommand(parsing: "broker 2 down") == .brokerDown(2))
        #expect(try MockClusterCommand(parsing: "  BROKER 3 up ") == .brokerUp(3))
        #expect(try MockClusterCommand(parsing: "all down") == .allDown)
        #expect(try MockClusterCommand(parsing: "all up") == .allUp)
        #expect(
            try MockClusterCommand(parsing: "errors Produce 5 NOT_LEADER_FOR_PARTITION")
                == .errors(.produce, count: 5, code: .notLeaderForPartition))
        #expect(try MockClusterCommand(parsing: "clear produce") == .clearErrors(.produce))
        #expect(try MockClusterCommand(parsing: "rtt 2 200ms") == .roundTrip(broker: 2, milliseconds: 200))
        for bad in ["", "broker two down", "broker 0 down", "all sideways", "errors Produce 5 NO_SUCH_ERROR", "errors Nope 5 REQUEST_TIMED_OUT",
                    "errors Produce -1 REQUEST_TIMED_OUT", "rtt 1 fast", "reboot"] {
            #expect(throws: MockClusterCommandError.self, "\(bad)") { try MockClusterCommand(parsing: bad) }
        }
        let error = #expect(throws: MockClusterCommandError.self) { try MockClusterCommand(parsing: "reboot") }
        #expect(error?.description.contains("broker N down") == true)
    }

    @Test("a running kafka-mock-cluster process takes commands from its pipe, answers each, and the faults are real")
    func process() async throws {
        let cluster = try await MockClusterProcess.start(brokers: 1, topics: [("t", 1)])
        let producer = try KafkaProducer(
            configuration: KafkaConfiguration(bootstrapServers: cluster.bootstrapServers, properties: ["message.timeout.ms": "1500"]))
        #expect(try await producer.send(KafkaOutgoingMessage(topic: "t", key: "k", value: "before")).isDelivered)

        try await cluster.command("errors Produce 1 MSG_SIZE_TOO_LARGE")
        #expect(try await producer.send(KafkaOutgoingMessage(topic: "t", key: "k", value: "refused")).error?.code == .messageSizeTooLarge)
        try await cluster.command("all down")
        #expect(try await producer.send(KafkaOutgoingMessage(topic: "t", key: "k", value: "while down")).error?.code == .messageTimedOut)
        try await cluster.command("all up")
        // The client reconnects with its own backoff: sends fail (time out) until it has.
        try await waitUntil("a send succeeds once the brokers are up") {
            try await producer.send(KafkaOutgoingMessage(topic: "t", key: "k", value: "after")).isDelivered
        }
        let noSuchBroker = await #expect(throws: TestSetupError.self) { try await cluster.command("broker 9 down") }
        #expect(noSuchBroker?.description.contains("error: cannot run 'broker 9 down'") == true, "\(String(describing: noSuchBroker))")
        let notACommand = await #expect(throws: TestSetupError.self) { try await cluster.command("reboot everything") }
        #expect(notACommand?.description.contains("not a command") == true, "\(String(describing: notACommand))")
        #expect(cluster.answers().count == 5)
        await producer.close()
        await cluster.stop()
    }

    @Test("the control pipe exists as a FIFO by the time the bootstrap file appears, on every start")
    func pipeBeforeBootstrapFile() async throws {
        // A reader that waits for the bootstrap file and then opens the pipe for writing must never find the path
        // missing (or create a plain file there, which then keeps the cluster from starting).
        for _ in 1...5 {
            let cluster = try await MockClusterProcess.start(brokers: 1, topics: [])
            var status = stat()
            #expect(stat(cluster.folder + "/control", &status) == 0, "no control pipe when the bootstrap file appeared")
            #expect(status.st_mode & S_IFMT == S_IFIFO, "the control path is not a FIFO")
            await cluster.stop()
        }
    }
}
