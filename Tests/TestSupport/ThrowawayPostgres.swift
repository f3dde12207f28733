import BlockingIO
import Foundation
import KafkaMock

/// A PostgreSQL server of one test's own (initdb in a temporary folder, unix socket only), for tests that
/// crash and restart the server: the shared test server must stay up for the tests running beside them.
/// Uses the binaries `scripts/test` found (`EO_PG_BINDIR`); as root, runs them as the `postgres` user.
public final class ThrowawayPostgres: Sendable {
    public let directory: String
    /// `postgresql:///postgres?host=...&user=postgres`.
    public let url: String
    private let bindir: String
    private let serverOptions: String

    private init(directory: String, bindir: String, serverOptions: String) {
        self.directory = directory
        self.bindir = bindir
        self.serverOptions = serverOptions
        url = "postgresql:///postgres?host=\(directory)&user=postgres"
    }

    /// Creates and starts the server (with `wal_level = logical`).
    /// - Parameters:
    ///   - serverOptions: more `-c name=value` options (for example a TCP port and TLS).
    ///   - files: files copied into the server's folder first (by name, from a path), readable by the server only.
    public static func start(serverOptions: String = "", files: [String: String] = [:]) async throws -> ThrowawayPostgres {
        guard let bindir = ProcessInfo.processInfo.environment["EO_PG_BINDIR"], !bindir.isEmpty else {
            throw MissingTestServer(variable: "EO_PG_BINDIR")
        }
        let directory = "/tmp/" + uniqueName("pg")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
        let server = ThrowawayPostgres(directory: directory, bindir: bindir, serverOptions: serverOptions)
        for (name, source) in files {
            try FileManager.default.copyItem(atPath: source, toPath: directory + "/" + name)
            try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: directory + "/" + name)
        }
        if getuid() == 0 {
            try await server.command("/bin/chown", ["-R", "postgres", directory], asPostgres: false)
        }
        try await server.command(bindir + "/initdb", ["-D", directory + "/data", "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"])
        try await server.startServer()
        return server
    }

    private func startServer() async throws {
        try await command(
            bindir + "/pg_ctl",
            ["-D", directory + "/data", "-l", directory + "/server.log", "-w", "-t", "60", "-o",
             "-k \(directory) -c listen_addresses='' -c wal_level=logical -c max_replication_slots=8 -c max_wal_senders=8 \(serverOptions)",
             "start"])
    }

    /// Stops the server the way a crash does (`pg_ctl stop -m immediate`: no shutdown checkpoint, recovery on start).
    public func crash() async throws {
        try await command(bindir + "/pg_ctl", ["-D", directory + "/data", "-m", "immediate", "-w", "stop"])
    }

    /// Starts the server again after ``crash()``.
    public func restart() async throws { try await startServer() }

    /// Stops the server and removes its folder.
    public func remove() async {
        try? await command(bindir + "/pg_ctl", ["-D", directory + "/data", "-m", "immediate", "-w", "stop"])
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Runs a command to completion. Not through Foundation's `Process`: `pg_ctl start` leaves the server
    /// running with the descriptors it inherited, and `Process` would wait for those to close. Here the child
    /// closes every descriptor above stderr before it execs, and only its own exit is awaited.
    private func command(_ path: String, _ arguments: [String], asPostgres: Bool = true) async throws {
        let runAs = asPostgres && getuid() == 0 ? ["/usr/sbin/runuser", "-u", "postgres", "--"] : []
        let script = #"for fd in /proc/$$/fd/*; do fd=${fd##*/}; [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"; done; exec "$@" >/dev/null 2>&1"#
        let argv = ["/bin/bash", "-c", script, "bash"] + runAs + [path] + arguments
        let thread = SerialThread(name: "throwaway-postgres")
        defer { thread.stop() }
        let status: Int32 = await thread.run {
            var pid: pid_t = 0
            let cStrings = argv.map { strdup($0) }
            defer { cStrings.forEach { free($0) } }
            // Like ChildProcess: no descriptor above stderr reaches the child, and the spawn keeps clear of a mock
            // broker going down (SpawnGuard), whose listening socket a child must never hold.
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            guard let closeFrom = GlibcSpawn.addCloseFrom, closeFrom(&actions, 3) == 0 else { return -1 }
            let spawned = SpawnGuard.shared.spawning { posix_spawn(&pid, "/bin/bash", &actions, nil, cStrings + [nil], environ) }
            guard spawned == 0 else { return -1 }
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            return status
        }
        guard status == 0 else {
            let log = (try? String(contentsOfFile: directory + "/server.log", encoding: .utf8)) ?? ""
            throw ThrowawayPostgresError(
                description: "\(path) \(arguments.joined(separator: " ")) failed (wait status \(status)); server log: \(log.suffix(2000))")
        }
    }
}

public struct ThrowawayPostgresError: Error, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}
