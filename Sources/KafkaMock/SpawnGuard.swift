#if canImport(Glibc)
import Glibc
#endif

/// Keeps a child process from inheriting a mock broker's listening socket at the moment the broker is set down.
///
/// A child gets a copy of every descriptor when it is cloned and drops it only when its close-from action or
/// its exec runs. If a broker is set down in between, librdkafka closes the listening socket, but the child's
/// copy keeps it listening, so the mock's immediate re-bind of the port fails and librdkafka aborts the whole
/// process ("Failed to-create mock broker listener", seen once in a fresh-clone run, with no other socket on the
/// port). Spawning holds this lock shared (many at once), ``MockCluster/setBrokerDown(_:)`` exclusively: a
/// broker goes down only while no child is between its clone and its exec.
public final class SpawnGuard: @unchecked Sendable {
    /// The one guard of this process: every spawn and every broker set down in it.
    public static let shared = SpawnGuard()

    // A pthread lock: it is held across posix_spawn, a blocking call, never across an await.
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    private init() {
        lock = .allocate(capacity: 1)
        // Writers first: with readers preferred (glibc's default), a set-down could wait as long as the suite keeps
        // spawning, on a thread of Swift's two-thread cooperative pool. Now it waits for the spawns under way only.
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        pthread_rwlockattr_setkind_np(&attributes, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(lock, &attributes)
        pthread_rwlockattr_destroy(&attributes)
    }

    /// Runs `spawn` (which must return only once the child has exec'd, as `posix_spawn` does) beside other spawns.
    public func spawning<T>(_ spawn: () throws -> T) rethrows -> T {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try spawn()
    }

    /// Runs `body` while no spawn is in progress.
    func excludingSpawns<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }
}
