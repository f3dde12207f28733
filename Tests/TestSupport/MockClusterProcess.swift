import Foundation

/// A `kafka-mock-cluster` process of one test's own, driven through its `--control` pipe the way an operator
/// rehearsing an outage would: `broker 2 down`, `all up`, ... Its folder holds the pipe, the bootstrap file and
/// the process's output.
public final class MockClusterProcess {
    public let bootstrapServers: String
    public let folder: String
    private let process: ChildProcess
    private var log: String { folder + "/cluster.log" }
    private var control: String { folder + "/control" }

    /// Starts the cluster with `topics` (name and partitions) created, and waits until it serves.
    public static func start(brokers: Int = 3, topics: [(String, Int)]) async throws -> MockClusterProcess {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("cluster")).path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let process = try Tools.start(
            "kafka-mock-cluster",
            ["--brokers", String(brokers), "--bootstrap-file", folder + "/bootstrap", "--control", folder + "/control"]
                + topics.flatMap { ["--topic", "\($0.0):\($0.1)"] },
            output: URL(fileURLWithPath: folder + "/cluster.log"))
        try await waitUntil("kafka-mock-cluster writes its bootstrap file") {
            guard process.isRunning else {
                throw TestSetupError( "kafka-mock-cluster exited: \(Self.read(folder + "/cluster.log"))")
            }
            return FileManager.default.fileExists(atPath: folder + "/bootstrap")
        }
        let servers = try String(contentsOfFile: folder + "/bootstrap", encoding: .utf8)
        return MockClusterProcess(bootstrapServers: servers, folder: folder, process: process)
    }

    private init(bootstrapServers: String, folder: String, process: ChildProcess) {
        self.bootstrapServers = bootstrapServers
        self.folder = folder
        self.process = process
    }

    // A test that fails before stop() leaves no cluster behind.
    deinit { if process.isRunning { process.terminate() } }

    /// Sends one control command and waits for its answer; throws unless the answer is `ok: <command>`.
    public func command(_ line: String) async throws {
        let answersBefore = answers().count
        // Non-blocking open: it fails (ENXIO) while the cluster is between two writers, instead of hanging
        // this thread if the cluster has died.
        var descriptor: Int32 = -1
        try await waitUntil("the control pipe of kafka-mock-cluster opens for writing") {
            guard process.isRunning else { throw TestSetupError( "kafka-mock-cluster exited: \(Self.read(log))") }
            descriptor = open(control, O_WRONLY | O_NONBLOCK)
            return descriptor >= 0
        }
        let bytes = Array((line + "\n").utf8)
        let written = write(descriptor, bytes, bytes.count)
        close(descriptor)
        guard written == bytes.count else { throw TestSetupError( "cannot write '\(line)' to \(control): errno \(errno)") }
        try await waitUntil("kafka-mock-cluster answers '\(line)'") { answers().count > answersBefore }
        let answer = answers()[answersBefore]
        guard answer == "ok: \(line)" else { throw TestSetupError( "kafka-mock-cluster refused '\(line)': \(answer)") }
    }

    /// The cluster's answers so far, in order.
    public func answers() -> [String] {
        Self.read(log).split(separator: "\n").map(String.init).filter { $0.hasPrefix("ok: ") || $0.hasPrefix("error: ") }
    }

    /// Stops the cluster and removes its folder.
    public func stop() async {
        if process.isRunning { process.terminate() }
        try? await waitUntil("kafka-mock-cluster stops") { !process.isRunning }
        try? FileManager.default.removeItem(atPath: folder)
    }

    private static func read(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }
}
