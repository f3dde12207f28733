import Coordination
import Testing

/// A graceful stop: sleeps end at the request (or cancellation), never by polling.
@Suite struct StopRequestTests {
    /// Runs `body`, failing if it has not returned within `seconds` (a hung sleeper must fail, not hang the suite).
    private func within(_ seconds: Int, _ what: Comment, _ body: @escaping @Sendable () async -> Void) async {
        let finished = await withTaskGroup(of: Bool.self) { group in
            group.addTask { await body(); return true }
            group.addTask { try? await Task.sleep(for: .seconds(seconds)); return false }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        #expect(finished, what)
    }

    private func waitUntilSleeping(_ request: StopRequest, count: Int) async {
        let deadline = ContinuousClock.now + .seconds(30)
        while request.sleeperCount < count && ContinuousClock.now < deadline { await Task.yield() }
        #expect(request.sleeperCount == count, "the sleepers never started waiting")
    }

    @Test func requestWakesEverySleeperAndItsChildren() async {
        let relay = StopRequest()
        let engine = StopRequest(parent: relay)
        await within(30, "the sleepers did not wake at the request") {
            await withTaskGroup(of: Void.self) { group in
                group.addTask { await relay.sleep(for: .seconds(3600)) }
                group.addTask { await relay.sleep(for: .seconds(3600)) }
                group.addTask { await engine.sleep(for: .seconds(3600)) }
                await waitUntilSleeping(relay, count: 3)
                #expect(engine.sleeperCount == 1)
                relay.request()
            }
        }
        #expect(relay.isRequested && engine.isRequested)
        #expect(relay.sleeperCount == 0 && engine.sleeperCount == 0)
    }

    @Test func childRequestLeavesTheParentRunning() async {
        let relay = StopRequest()
        let engine = StopRequest(parent: relay)
        await within(30, "the engine's sleep did not end at its own request") {
            async let sleeping: Void = engine.sleep(for: .seconds(3600))
            await waitUntilSleeping(engine, count: 1)
            engine.request()
            await sleeping
        }
        #expect(engine.isRequested)
        #expect(!relay.isRequested)
    }

    @Test func sleepAfterTheRequestReturnsAtOnce() async {
        let request = StopRequest()
        request.request()
        request.request()
        await within(30, "a sleep after the request waited") { await request.sleep(for: .seconds(3600)) }
        #expect(request.sleeperCount == 0)
    }

    @Test func cancellationEndsASleepWithoutRequestingTheStop() async {
        let request = StopRequest()
        await within(30, "cancellation did not end the sleep") {
            let sleeper = Task { await request.sleep(for: .seconds(3600)) }
            await waitUntilSleeping(request, count: 1)
            sleeper.cancel()
            await sleeper.value
        }
        #expect(!request.isRequested)
        #expect(request.sleeperCount == 0)
    }

    @Test func sleepWithoutARequestLastsItsDuration() async {
        let request = StopRequest()
        let start = ContinuousClock.now
        await request.sleep(for: .milliseconds(50))
        #expect(ContinuousClock.now - start >= .milliseconds(50))
        #expect(!request.isRequested && request.sleeperCount == 0)
    }
}
