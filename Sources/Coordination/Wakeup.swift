import Synchronization

/// Wakes one waiting task: signals that arrive while nobody waits are kept (as one), so none is lost.
public final class Wakeup: Sendable {
    private struct State {
        var signaled = false
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())

    public init() {}

    /// Wakes the waiter, or the next one to wait. Callable from any thread, including C callbacks.
    public func signal() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            if let waiter = state.waiter {
                state.waiter = nil
                return waiter
            }
            state.signaled = true
            return nil
        }
        waiter?.resume()
    }

    /// Returns at the next signal (at once if one came since the last wait), after `timeout`, or on
    /// cancellation. One waiter at a time.
    public func wait(timeout: Duration) async {
        if state.withLock({ state in defer { state.signaled = false }; return state.signaled }) { return }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.waitForSignal() }
            group.addTask { try? await Task.sleep(for: timeout) }
            await group.next()
            group.cancelAll()
            self.signal()  // releases the signal waiter if the timer won
            await group.waitForAll()
            self.state.withLock { $0.signaled = false }
        }
    }

    private func waitForSignal() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow = state.withLock { state -> Bool in
                if state.signaled {
                    state.signaled = false
                    return true
                }
                precondition(state.waiter == nil, "Wakeup has one waiter at a time")
                state.waiter = continuation
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }
}
