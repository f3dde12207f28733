import ArgumentParser
import Dispatch
import Foundation
import KafkaClient

@main
struct KafkaMockClusterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kafka-mock-cluster",
        abstract: "Run librdkafka's mock Kafka cluster as a process, for tests and demos.",
        discussion: """
            Starts N mock brokers on 127.0.0.1 (ephemeral ports) that speak the Kafka protocol, so that any \
            Kafka client (the relay, consumers, kcat) can connect over TCP. Data lives in memory and is gone \
            when the process stops. Stop it with SIGTERM or Ctrl-C.

            Example:
              kafka-mock-cluster --brokers 3 --topic bank.accounts:6 --bootstrap-file /tmp/kafka.bootstrap
              kcat -b "$(cat /tmp/kafka.bootstrap)" -L
            """
    )

    @Option(help: "Number of brokers (ids 1...N).")
    var brokers: Int = 3

    @Option(
        name: .customLong("topic"),
        help: ArgumentHelp("Create a topic at start, as NAME:PARTITIONS (repeatable).", valueName: "name:partitions"))
    var topics: [TopicSpec] = []

    @Option(help: "Write the bootstrap servers to this file once the cluster is ready (written atomically).")
    var bootstrapFile: String?

    func validate() throws {
        guard brokers >= 1 else { throw ValidationError("--brokers must be at least 1 (got \(brokers))") }
    }

    func run() throws {
        let cluster = try MockCluster(brokers: brokers)
        for topic in topics {
            try cluster.createTopic(topic.name, partitions: topic.partitions, replicationFactor: 1)
        }
        if let bootstrapFile {
            // Write then rename, so a reader never sees a half-written file.
            let temporary = bootstrapFile + ".tmp"
            try cluster.bootstrapServers.write(toFile: temporary, atomically: false, encoding: .utf8)
            guard rename(temporary, bootstrapFile) == 0 else {
                throw ValidationError("cannot write --bootstrap-file \(bootstrapFile): errno \(errno)")
            }
        }
        print(cluster.bootstrapServers)
        FileHandle.standardOutput.synchronizeFile()

        let stop = DispatchSemaphore(value: 0)
        var sources: [any DispatchSourceSignal] = []
        for signalNumber in [SIGTERM, SIGINT] {
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
            source.setEventHandler { stop.signal() }
            source.resume()
            sources.append(source)
        }
        stop.wait()
        sources.forEach { $0.cancel() }
        withExtendedLifetime(cluster) {}
        if let bootstrapFile { unlink(bootstrapFile) }
    }
}

struct TopicSpec: ExpressibleByArgument {
    var name: String
    var partitions: Int32

    init?(argument: String) {
        guard let colon = argument.lastIndex(of: ":"), let partitions = Int32(argument[argument.index(after: colon)...]),
            partitions >= 1, colon != argument.startIndex
        else { return nil }
        self.name = String(argument[..<colon])
        self.partitions = partitions
    }
}
