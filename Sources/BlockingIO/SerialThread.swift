import Foundation

/// A thread of its own that runs submitted jobs one at a time, in order.
///
/// For C calls that block (libpq waiting on the server, librdkafka's poll). Neither Swift's cooperative pool
/// nor libdispatch's worker pool may be used for them: on Linux both are small, bounded pools, and when
/// every worker is blocked in a call that waits for another task (a lock held by a transaction whose next
/// statement needs a worker), the process deadlocks. A dedicated thread per connection cannot starve.
public final class SerialThread: @unchecked Sendable {
    // `jobs` and `stopped` are guarded by `condition`.
    private let condition = NSCondition()
    private var jobs: [@Sendable () -> Void] = []
    private var stopped = false

    public init(name: String) {
        let thread = Thread { [condition] in
            while true {
                condition.lock()
                while self.jobs.isEmpty && !self.stopped { condition.wait() }
                if self.jobs.isEmpty && self.stopped {
                    condition.unlock()
                    return
                }
                let job = self.jobs.removeFirst()
                condition.unlock()
                job()
            }
        }
        thread.name = name
        thread.start()
    }

    /// Queues `job`; it runs after the jobs submitted before it.
    public func submit(_ job: @escaping @Sendable () -> Void) {
        condition.lock()
        precondition(!stopped, "job submitted to a stopped SerialThread")
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Runs `work` on the thread and returns its result to the suspended caller.
    public func run<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            submit { continuation.resume(returning: work()) }
        }
    }

    /// Lets the thread finish the queued jobs and exit.
    public func stop() {
        condition.lock()
        stopped = true
        condition.signal()
        condition.unlock()
    }
}
