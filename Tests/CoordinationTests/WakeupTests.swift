import Coordination
import Testing

/// The wake-up of one waiting loop: no signal is lost, a wait without one lasts its timeout.
@Suite struct WakeupTests {
    @Test func signalBeforeTheWaitIsKeptAsOne() async {
        let wakeup = Wakeup()
        wakeup.signal()
        wakeup.signal()
        let start = ContinuousClock.now
        await wakeup.wait(timeout: .seconds(3600))
        #expect(ContinuousClock.now - start < .seconds(60), "a signal sent before the wait was lost")
        // The two signals counted as one: the next wait lasts its timeout.
        let second = ContinuousClock.now
        await wakeup.wait(timeout: .milliseconds(50))
        #expect(ContinuousClock.now - second >= .milliseconds(50))
    }

    @Test func signalWakesTheWaiter() async {
        let wakeup = Wakeup()
        let woken = await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await wakeup.wait(timeout: .seconds(3600))
                return true
            }
            group.addTask {
                // Signals until the waiter returns: whether it waits yet or not, a signal reaches it.
                while !Task.isCancelled {
                    wakeup.signal()
                    try? await Task.sleep(for: .milliseconds(10))
                }
                return false
            }
            group.addTask {
                try? await Task.sleep(for: .seconds(60))
                return false
            }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        #expect(woken, "the waiter did not wake at a signal")
    }

    @Test func cancellationEndsTheWait() async {
        let wakeup = Wakeup()
        let waiter = Task { await wakeup.wait(timeout: .seconds(3600)) }
        waiter.cancel()
        let start = ContinuousClock.now
        await waiter.value
        #expect(ContinuousClock.now - start < .seconds(60))
    }
}
