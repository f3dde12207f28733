import Foundation

/// A thread of its own that runs submitted jobs one at a time, in order.
///
/// For C calls that block (libpq waiting on the server, librdkafka's poll). Neither Swift's cooperative pool
/// nor libdispatch's worker pool may be used for them: on Linux both are small, bounded pools, and when
/// every worker is blocked in a call that waits for another task (a lock held by a transaction whose next
/// statement needs a worker), the process deadlocks. A dedicated thread per connection cannot starve.
///
/// The thread ends after ``stop()``, or once the last reference to its `SerialThread` is gone, in both cases
/// after finishing the jobs already queued.
public final class SerialThread: Sendable {
    private let queue = JobQueue()

    public init(name: String) {
        // The thread holds the queue only, never `self`: dropping the last reference ends it (deinit).
        // Named from inside, through /proc (proc(5); Swift does not import pthread_setname_np): on Linux,
        // Foundation did not reliably pass a `Thread`'s name on to the system thread that `top -H`, gdb and
        // /proc show. Linux keeps 15 bytes.
        let systemName = String(decoding: Array(name.utf8.prefix(15)), as: UTF8.self)
        let thread = Thread { [queue] in
            #if os(Linux)
            if let comm = fopen("/proc/thread-self/comm", "w") {
                fputs(systemName, comm)
                fclose(comm)
            }
            #endif
            while let job = queue.next() { job() }
        }
        thread.start()
    }

    deinit { queue.close() }

    /// Queues `job`; it runs after the jobs submitted before it.
    public func submit(_ job: @escaping @Sendable () -> Void) {
        queue.add(job)
    }

    /// Runs `work` on the thread and returns its result to the suspended caller.
    public func run<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            submit { continuation.resume(returning: work()) }
        }
    }

    /// Lets the thread finish the queued jobs and exit.
    public func stop() { queue.close() }
}

/// The jobs of one ``SerialThread``, shared by its owner and the thread.
private final class JobQueue: @unchecked Sendable {
    // `jobs` and `closed` are guarded by `condition`.
    private let condition = NSCondition()
    private var jobs: [@Sendable () -> Void] = []
    private var closed = false

    func add(_ job: @escaping @Sendable () -> Void) {
        condition.lock()
        defer { condition.unlock() }
        precondition(!closed, "job submitted to a stopped SerialThread")
        jobs.append(job)
        condition.signal()
    }

    /// The next job, waiting for one; `nil` once closed and empty (the thread then ends).
    func next() -> (@Sendable () -> Void)? {
        condition.lock()
        defer { condition.unlock() }
        while jobs.isEmpty && !closed { condition.wait() }
        return jobs.isEmpty ? nil : jobs.removeFirst()
    }

    func close() {
        condition.lock()
        closed = true
        condition.signal()
        condition.unlock()
    }
}
