import BlockingIO
import Foundation

/// The outcome of running one of the project's executables.
public struct ToolRun: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    /// The process was still running at the caller's deadline and was killed (SIGKILL).
    public var timedOut = false
}

/// The project's built executables (`bank`, `eventoutbox`, `outbox-relay`, ...), found through
/// `EVENTOUTBOX_BIN_DIR`, which `scripts/test` sets to `swift build --show-bin-path`.
public enum Tools {
    public static func path(_ name: String) throws -> String {
        guard let dir = ProcessInfo.processInfo.environment["EVENTOUTBOX_BIN_DIR"], !dir.isEmpty else {
            throw MissingTestServer(variable: "EVENTOUTBOX_BIN_DIR")
        }
        return dir + "/" + name
    }

    /// Starts an executable with extra environment; the caller waits for or kills it. Its output goes to
    /// `output`, replaced, or added to the end with `appending`.
    public static func start(
        _ name: String, _ arguments: [String], environment: [String: String] = [:], output: URL? = nil, appending: Bool = false
    ) throws -> ChildProcess {
        let process = ChildProcess()
        process.executableURL = URL(fileURLWithPath: try path(name))
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        if let output {
            if !appending || !FileManager.default.fileExists(atPath: output.path) {
                // A file that cannot be made fails the next line, with its path.
                _ = FileManager.default.createFile(atPath: output.path, contents: nil)
            }
            let handle = try FileHandle(forWritingTo: output)
            handle.seekToEndOfFile()
            process.standardOutput = handle
            process.standardError = handle
        }
        try process.run()
        return process
    }

    /// Runs an executable to completion and captures its output. With a `timeout`, a process still running then
    /// is killed and the result says so (``ToolRun/timedOut``): for commands that must end on their own.
    public static func run(
        _ name: String, _ arguments: [String], environment: [String: String] = [:], timeout: Duration? = nil
    ) async throws -> ToolRun {
        let process = ChildProcess()
        process.executableURL = URL(fileURLWithPath: try path(name))
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        // Read both pipes while the process runs so a full pipe never blocks it; on threads of their own,
        // since these reads block until the process exits.
        let outReader = SerialThread(name: "tool-stdout")
        let errReader = SerialThread(name: "tool-stderr")
        defer {
            outReader.stop()
            errReader.stop()
        }
        let killed = Locked(false)
        let killer = timeout.map { timeout in
            Task {
                try await Task.sleep(for: timeout)
                if process.isRunning {
                    killed.withLock { $0 = true }
                    kill(process.processIdentifier, SIGKILL)
                }
            }
        }
        defer { killer?.cancel() }
        async let stdout = outReader.run { out.fileHandleForReading.readDataToEndOfFile() }
        async let stderr = errReader.run { err.fileHandleForReading.readDataToEndOfFile() }
        let (o, e) = await (stdout, stderr)
        await outReader.run { process.waitUntilExit() }
        return ToolRun(
            status: process.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
            stderr: String(decoding: e, as: UTF8.self), timedOut: killed.value)
    }

    /// Runs a command found on `PATH` (a tool the test script installed: docker-compose, curl, Python modules)
    /// in `directory`, to completion; standard output and error together.
    ///
    /// The wait happens on a thread of its own: the whole suite shares two cooperative threads, and a tool that
    /// ran there (Schemathesis for a minute, kubernetes-validate for seconds) once stalled every other test in
    /// the process at the same time (no log line for 17 s, then timeouts in unrelated suites).
    public static func command(_ arguments: [String], in directory: URL) async throws -> (status: Int32, output: String) {
        let process = ChildProcess()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        process.currentDirectoryURL = directory
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let waiter = SerialThread(name: "tool-command")
        defer { waiter.stop() }
        let output = await waiter.run { () -> Data in
            let output = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return output
        }
        return (process.terminationStatus, String(decoding: output, as: UTF8.self))
    }
}

/// Reading a Prometheus text exposition (a `/metrics` answer).
public enum Exposition {
    /// Families with a `# TYPE` line and no `# HELP` line before it.
    public static func familiesWithoutHelp(_ text: String) -> [String] {
        var helped: Set<String> = []
        var missing: [String] = []
        for line in text.split(separator: "\n") {
            let words = line.split(separator: " ")
            guard words.count >= 3, words[0] == "#" else { continue }
            if words[1] == "HELP" { helped.insert(String(words[2])) }
            if words[1] == "TYPE" && !helped.contains(String(words[2])) { missing.append(String(words[2])) }
        }
        return missing
    }

    /// The value of the sample `name` (with its labels as written, e.g. `x_count` or `x{a="b"}`), if served.
    public static func value(_ name: String, in text: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") }
    }
}
