import Synchronization

/// A graceful stop asked of a long-running loop (a relay, one of its engines, a projection consumer): once
/// made, it stays made, and every task sleeping on it wakes at once. Loops read ``isRequested`` at their
/// decision points; a wait between rounds is ``sleep(for:)``, so no one polls a flag on a timer.
///
/// Graceful, unlike task cancellation: in-flight deliveries still get their reports and marks after the
/// request. Cancellation of the sleeping task also ends a sleep early.
public final class StopRequest: Sendable {
    private struct State {
        var requested = false
        var nextWaiter = 0
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
    }
    private let state = Mutex(State())
    /// A stop of the parent (the relay's) stops this one (an engine's) too.
    private let parent: StopRequest?

    /// A request of its own; with a `parent` (the relay's, for one of its engines), also requested when the parent is.
    public init(parent: StopRequest? = nil) { self.parent = parent }

    /// Whether the stop was asked for, of this one or of its parent.
    public var isRequested: Bool { state.withLock { $0.requested } || parent?.isRequested == true }

    /// Tasks sleeping on this request itself now (for tests).
    public var sleeperCount: Int { state.withLock { $0.waiters.count } }

    /// Asks for the stop and wakes every sleeper (its children's too). Callable from any thread; later calls do nothing.
    public func request() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.requested = true
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Returns after `duration`, at once when the stop is (or was already) requested, or when the task is
    /// cancelled.
    public func sleep(for duration: Duration) async {
        guard !isRequested else { return }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { try? await Task.sleep(for: duration) }
            var request: StopRequest? = self
            while let next = request {
                group.addTask { await next.waitForRequest() }
                request = next.parent
            }
            await group.next()
            group.cancelAll()
        }
    }

    private func waitForRequest() async {
        let id = state.withLock { state -> Int in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                // A cancellation that ran its handler before this found no waiter; the task's flag is set by then.
                let resumeNow = state.withLock { state -> Bool in
                    if state.requested || Task.isCancelled { return true }
                    state.waiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }
}
