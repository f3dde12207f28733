import EventSourcing
import ArgumentParser
import Dispatch
import Foundation
import KafkaClient
import KafkaMock

@main
struct KafkaMockClusterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kafka-mock-cluster",
        abstract: "Run librdkafka's mock Kafka cluster as a process, for tests and demos.",
        discussion: """
            Starts N mock brokers on 127.0.0.1 (ephemeral ports) that speak the Kafka protocol, so that any \
            Kafka client (the relay, consumers, kcat) can connect over TCP. Data lives in memory and is gone \
            when the process stops. Stop it with SIGTERM or Ctrl-C.

            With --control PATH it also takes fault-injection commands from a named pipe (FIFO, created if \
            missing), one per line, and answers each on standard output with `ok: <command>` or `error: <why>`:
              broker N down | broker N up        a broker closes its connections and refuses new ones, or returns
              all down | all up                  every broker
              errors API COUNT ERROR_NAME        the next COUNT requests of API fail with that librdkafka error
              clear API                          drop the errors still queued for API
              rtt N MILLISECONDSms               delay every response of broker N (0ms: none)
            API is one of Produce, Fetch, ListOffsets, Metadata, OffsetCommit, OffsetFetch, FindCoordinator, \
            JoinGroup, Heartbeat, InitProducerId; ERROR_NAME as librdkafka names it (NOT_LEADER_FOR_PARTITION, \
            REQUEST_TIMED_OUT, MSG_SIZE_TOO_LARGE, ...).

            Example:
              kafka-mock-cluster --brokers 3 --topic bank.accounts:6 --bootstrap-file /tmp/kafka.bootstrap \
                  --control /tmp/kafka.control
              kcat -b "$(cat /tmp/kafka.bootstrap)" -L
              echo "broker 2 down" > /tmp/kafka.control     # rehearse an outage while real clients run
              echo "errors Produce 5 NOT_LEADER_FOR_PARTITION" > /tmp/kafka.control
            """,
        version: EventOutboxVersion.current
    )

    @Option(help: "Number of brokers (ids 1...N).")
    var brokers: Int = 3

    @Option(
        name: .customLong("topic"),
        help: ArgumentHelp("Create a topic at start, as NAME:PARTITIONS (repeatable).", valueName: "name:partitions"))
    var topics: [TopicSpec] = []

    @Option(help: "Write the bootstrap servers to this file once the cluster (and its --control pipe) is ready; written atomically.")
    var bootstrapFile: String?

    @Option(help: ArgumentHelp("Take fault-injection commands from this named pipe (created if missing); see above.", valueName: "path"))
    var control: String?

    func validate() throws {
        guard brokers >= 1 else { throw ValidationError("--brokers must be at least 1 (got \(brokers))") }
    }

    func run() throws {
        let cluster = try MockCluster(brokers: brokers)
        for topic in topics {
            try cluster.createTopic(topic.name, partitions: topic.partitions, replicationFactor: 1)
        }
        // The pipe first: the bootstrap file says "ready", and a reader that then opens --control for writing
        // must find the FIFO, not create a plain file of that name.
        var createdPipe = false
        if let control {
            createdPipe = try ControlPipe.prepare(control)
            ControlPipe.serve(control, cluster)
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
        if let control, createdPipe { unlink(control) }
    }
}

/// The `--control` named pipe: commands in, one answer per command on standard output.
enum ControlPipe {
    /// Creates the FIFO unless one is there; returns whether it created it.
    static func prepare(_ path: String) throws -> Bool {
        var status = stat()
        if stat(path, &status) == 0 {
            guard status.st_mode & S_IFMT == S_IFIFO else {
                throw ValidationError("--control \(path) exists and is not a named pipe")
            }
            return false
        }
        guard mkfifo(path, 0o600) == 0 else { throw ValidationError("cannot create the named pipe \(path): errno \(errno)") }
        return true
    }

    /// Reads commands on a thread of its own for as long as the process runs; writers may come and go.
    static func serve(_ path: String, _ cluster: MockCluster) {
        let thread = Thread {
            while true {
                // Blocks until a writer opens the pipe; end of file means the writer closed it.
                guard let file = fopen(path, "r") else {
                    answer("error: cannot open \(path): errno \(errno)")
                    return
                }
                var line: UnsafeMutablePointer<CChar>?
                var capacity = 0
                while getline(&line, &capacity, file) >= 0, let line {
                    let text = String(cString: line).trimmingCharacters(in: .whitespacesAndNewlines)
                    guard !text.isEmpty, !text.hasPrefix("#") else { continue }
                    do {
                        let command = try MockClusterCommand(parsing: text)
                        do {
                            try cluster.apply(command)
                            answer("ok: \(text)")
                        } catch {
                            answer("error: cannot run '\(text)': \(error)")
                        }
                    } catch {
                        answer("error: \(error)")
                    }
                }
                free(line)
                fclose(file)
            }
        }
        thread.name = "control"
        thread.start()
    }

    private static func answer(_ text: String) {
        FileHandle.standardOutput.write(Data((text + "\n").utf8))
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
