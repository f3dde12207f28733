import Foundation
import KafkaMock
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A child process started with `posix_spawn`, with the part of Foundation's `Process` API the tests use.
///
/// Why not `Foundation.Process`: on Linux, Swift 6.3's `Process.run()` lists `/proc/self/fd` and copies 256
/// bytes of each directory entry, reading past glibc's buffer; when that buffer ends at an unmapped page the
/// whole test process dies ("Bad pointer dereference" in `Process.run()`, swift-corelibs-foundation#5472,
/// fixed after 6.3). The suite spawns hundreds of processes while it holds hundreds of descriptors, and a
/// fresh clone's run died that way. This spawns directly: the child's descriptors above 2 are closed by
/// `posix_spawn_file_actions_addclosefrom_np`, its signal mask emptied and its signals set to their defaults.
public final class ChildProcess: @unchecked Sendable {
    // Configuration, set before `run()` by one task (as with `Process`).
    public var executableURL: URL?
    public var arguments: [String] = []
    /// `nil`: the parent's environment.
    public var environment: [String: String]?
    public var currentDirectoryURL: URL?
    /// A `Pipe` or a `FileHandle` (as with `Process`); `nil`: the parent's.
    public var standardOutput: Any?
    public var standardError: Any?

    private let state = Mutex<State>(State())

    private struct State {
        var pid: pid_t = 0
        /// The raw wait status once the child was reaped.
        var status: Int32?
    }

    public init() {}

    public var processIdentifier: Int32 { state.withLock { $0.pid } }

    /// Starts the child. The write ends of pipes given as its output are closed here, as `Process` does, so
    /// that reading them ends when the child exits.
    public func run() throws {
        guard let executable = executableURL?.path else { throw ChildProcessError("no executableURL") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (target, output) in [(Int32(1), standardOutput), (Int32(2), standardError)] {
            if let fd = Self.descriptor(output) { posix_spawn_file_actions_adddup2(&actions, fd, target) }
        }
        guard let closeFrom = GlibcSpawn.addCloseFrom, closeFrom(&actions, 3) == 0 else {
            throw ChildProcessError("posix_spawn_file_actions_addclosefrom_np (glibc 2.34+) is not available")
        }
        if let directory = currentDirectoryURL?.path {
            guard let changeDirectory = GlibcSpawn.addChangeDirectory, changeDirectory(&actions, directory) == 0 else {
                throw ChildProcessError("posix_spawn_file_actions_addchdir_np (glibc 2.29+) is not available")
            }
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        var allSignals = sigset_t()
        sigfillset(&allSignals)
        posix_spawnattr_setsigdefault(&attributes, &allSignals)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let environment = (environment ?? ProcessInfo.processInfo.environment).map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in environment { free(pointer) }
        }
        var pid: pid_t = 0
        // posix_spawn returns once the child has exec'd, so no copy of a mock broker's socket outlives the guard.
        let result = SpawnGuard.shared.spawning { posix_spawn(&pid, executable, &actions, &attributes, argv, environment) }
        guard result == 0 else { throw ChildProcessError("cannot start \(executable): \(String(cString: strerror(result)))") }
        state.withLock { $0.pid = pid }
        for output in [standardOutput, standardError] {
            if let pipe = output as? Pipe { try? pipe.fileHandleForWriting.close() }
        }
    }

    /// Whether the child has not exited yet (reaps it once it has).
    public var isRunning: Bool {
        state.withLock { state in
            guard state.pid > 0, state.status == nil else { return false }
            var status: Int32 = 0
            if waitpid(state.pid, &status, WNOHANG) == state.pid { state.status = status }
            return state.status == nil
        }
    }

    /// Blocks until the child exits.
    public func waitUntilExit() {
        let pid = processIdentifier
        guard pid > 0 else { return }
        while isRunning {
            var status: Int32 = 0
            let reaped = waitpid(pid, &status, 0)
            if reaped == pid {
                state.withLock { $0.status = $0.status ?? status }
            } else if reaped == -1 && errno != EINTR {
                return
            }
        }
    }

    /// The exit status, or the number of the signal that ended the child (as `Process` reports it).
    public var terminationStatus: Int32 {
        guard let status = state.withLock({ $0.status }) else { return 0 }
        let signal = status & 0x7F
        return signal == 0 ? (status >> 8) & 0xFF : signal
    }

    /// Sends SIGTERM.
    public func terminate() {
        let pid = processIdentifier
        if pid > 0 && isRunning { kill(pid, SIGTERM) }
    }

    private static func descriptor(_ output: Any?) -> Int32? {
        if let pipe = output as? Pipe { return pipe.fileHandleForWriting.fileDescriptor }
        if let handle = output as? FileHandle { return handle.fileDescriptor }
        return nil
    }
}

/// glibc's spawn extensions, which Swift's Glibc module does not declare (they need `_GNU_SOURCE`).
enum GlibcSpawn {
    typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    typealias ChangeDirectory = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32

    static let addCloseFrom: CloseFrom? = symbol("posix_spawn_file_actions_addclosefrom_np")
    static let addChangeDirectory: ChangeDirectory? = symbol("posix_spawn_file_actions_addchdir_np")

    private static func symbol<T>(_ name: String) -> T? {
        guard let pointer = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else { return nil }
        return unsafeBitCast(pointer, to: T.self)
    }
}

public struct ChildProcessError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}
