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
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("control")).path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let log = URL(fileURLWithPath: folder + "/out.log")
        let cluster = try Tools.start(
            "kafka-mock-cluster",
            ["--brokers", "1", "--topic", "t:1", "--bootstrap-file", folder + "/bootstrap", "--control", folder + "/control"], output: log)
        defer {
            cluster.terminate()
            cluster.waitUntilExit()
        }
        try await waitUntil("the cluster is up") { FileManager.default.fileExists(atPath: folder + "/bootstrap") }
        let brokers = try String(contentsOfFile: folder + "/bootstrap", encoding: .utf8)
        func command(_ line: String) async throws {
            let pipe = try FileHandle(forWritingTo: URL(fileURLWithPath: folder + "/control"))
            pipe.write(Data((line + "\n").utf8))
            try pipe.close()
            try await waitUntil("the cluster answers '\(line)'") {
                let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
                return output.contains("ok: \(line)") || output.contains("cannot run '\(line)'")
            }
        }
        let producer = try KafkaProducer(
            configuration: KafkaConfiguration(bootstrapServers: brokers, properties: ["message.timeout.ms": "1500"]))
        #expect(try await producer.send(KafkaOutgoingMessage(topic: "t", key: "k", value: "before")).isDelivered)

        try await command("errors Produce 1 MSG_SIZE_TOO_LARGE")
        #expect(try await producer.send(KafkaOutgoingMessage(topic: "t", key: "k", value: "refused")).error?.code == .messageSizeTooLarge)
        try await command("all down")
        #expect(try await producer.send(KafkaOutgoingMessage(topic: "t", key: "k", value: "while down")).error?.code == .messageTimedOut)
        try await command("all up")
        // The client reconnects with its own backoff: sends fail (time out) until it has.
        try await waitUntil("a send succeeds once the brokers are up") {
            try await producer.send(KafkaOutgoingMessage(topic: "t", key: "k", value: "after")).isDelivered
        }
        try await command("broker 9 down")
        #expect(try String(contentsOf: log, encoding: .utf8).contains("error: "))
        try await command("reboot everything")
        #expect(try String(contentsOf: log, encoding: .utf8).contains("cannot run 'reboot everything': not a command"))
        await producer.close()
    }
}
