import BlockingIO
import Foundation
import Synchronization
import TestSupport
import Testing

@Suite("SerialThread: one thread per blocking handle, and never a leaked one")
struct SerialThreadTests {
    /// Names of this process's threads (Linux: /proc/self/task/*/comm).
    static func threadNames() -> [String] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.compactMap { try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8) }
            .map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
    }

    @Test("jobs run in order on one named thread; stop() ends the thread after the queued jobs")
    func orderAndStop() async throws {
        let name = "st-" + String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let thread = SerialThread(name: name)
        let seen = Locked<[Int]>([])
        for n in 0..<100 { thread.submit { seen.withLock { $0.append(n) } } }
        let runsOnIt = await thread.run {
            (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(runsOnIt == name)
        #expect(seen.value == Array(0..<100))
        #expect(Self.threadNames().contains(name))
        thread.stop()
        try await waitUntil("the stopped thread exits") { !Self.threadNames().contains(name) }
    }

    @Test("a SerialThread dropped without stop() ends its thread (it used to leak it)")
    func droppedWithoutStop() async throws {
        let name = "st-" + String(UInt32.random(in: 0...UInt32.max), radix: 36)
        var thread: SerialThread? = SerialThread(name: name)
        #expect(await thread?.run { 42 } == 42)
        #expect(Self.threadNames().contains(name))
        thread = nil
        try await waitUntil("the dropped thread exits") { !Self.threadNames().contains(name) }
    }
}

@Suite("Duration conversions for the C libraries")
struct DurationConversionTests {
    @Test("milliseconds clamp to Int32 and never trap; seconds as a Double")
    func conversions() {
        #expect(Duration.seconds(1).clampedMilliseconds == 1000)
        #expect(Duration.milliseconds(1500).clampedMilliseconds == 1500)
        #expect(Duration.microseconds(999).clampedMilliseconds == 0)
        #expect(Duration.seconds(3_000_000).clampedMilliseconds == Int32.max)
        #expect(Duration.seconds(Int64.max).clampedMilliseconds == Int32.max)
        #expect(Duration.seconds(-5).clampedMilliseconds == 0)
        #expect(Duration.milliseconds(2500).inSeconds == 2.5)
    }
}
