import EventStore
import Foundation
import KafkaClient
@testable import OutboxRelay
import OutboxRelayStore
import Testing

private func row(_ id: Int64, _ stream: String = "s", _ version: Int64 = 1) -> OutboxRow {
    OutboxRow(
        id: id, eventID: UUID(), streamID: stream, streamVersion: version, topic: "t", key: stream, envelope: "{}",
        headers: [:], createdAt: Date())
}

private let timedOut = KafkaError(code: .requestTimedOut, message: "injected")
private let tooLarge = KafkaError(code: .messageSizeTooLarge, message: "too large")
private let purged = KafkaError(code: .purgedInFlight, message: "purged")

/// The at-least-once engine's decisions for one producer, without servers.
@Suite("pipelined generation (the at-least-once engine's rules, no servers)")
struct PipelinedGenerationTests {
    @Test("sends while there is room; a full pipeline waits for reports; a report makes room again")
    func backPressure() {
        var generation = PipelinedGeneration(maxInFlight: 2)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .send(room: 2))
        generation.queued(row(1), messageID: 1)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .send(room: 1))
        generation.queued(row(2), messageID: 2)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .waitForReports)
        #expect(generation.report(messageID: 1)?.id == 1)
        #expect(generation.apply(.delivered(.init(id: 1, partition: 0, offset: 0))) == nil)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .send(room: 1))
        #expect(generation.published == 1)
        #expect(generation.report(messageID: 1) == nil, "a second report of the same row is no row of this producer")
    }

    @Test("a retriable failure: nothing more is sent, one purge, the remaining reports are awaited, then a restart with backoff")
    func retriableFailure() {
        var generation = PipelinedGeneration(maxInFlight: 10)
        for id in 1...3 { generation.queued(row(Int64(id)), messageID: UInt64(id)) }
        _ = generation.report(messageID: 1)
        #expect(generation.apply(.retry(timedOut)) == nil)
        #expect(!generation.maySend)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .drain(purge: true))
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .drain(purge: false), "purged once")
        // The purge's own reports are not failures of their own.
        for id in 2...3 {
            _ = generation.report(messageID: UInt64(id))
            #expect(generation.apply(.retry(purged)) == nil)
        }
        #expect(generation.retriableFailures == 1)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .end(.failed(timedOut, backoff: true)))
    }

    @Test("a dead letter whose stream has nothing later in flight: the producer goes on")
    func deadLetterGoesOn() throws {
        var generation = PipelinedGeneration(maxInFlight: 10)
        generation.queued(row(1), messageID: 1)
        let reported = generation.report(messageID: 1)
        let failed = try #require(reported)
        let deadLetter = generation.apply(.deadLetter(failed, tooLarge, restart: false))
        #expect(deadLetter?.0.id == 1 && deadLetter?.1 == tooLarge)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .send(room: 10))
    }

    @Test("a dead letter with later rows of its stream in flight: a new producer at once, without backoff")
    func deadLetterRestarts() throws {
        var generation = PipelinedGeneration(maxInFlight: 10)
        generation.queued(row(1, "s", 1), messageID: 1)
        generation.queued(row(2, "s", 2), messageID: 2)
        let reported = generation.report(messageID: 1)
        let failed = try #require(reported)
        #expect(generation.apply(.deadLetter(failed, tooLarge, restart: true)) != nil)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .drain(purge: true))
        _ = generation.report(messageID: 2)
        _ = generation.apply(.retry(purged))
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .end(.failed(tooLarge, backoff: false)))
    }

    @Test("a fatal producer error or a refused enqueue ends the producer with backoff, even with nothing in flight")
    func producerFailures() {
        let fatal = KafkaError(code: .fatal, message: "desynchronized", isFatal: true)
        var generation = PipelinedGeneration(maxInFlight: 10)
        generation.failedFatally(fatal)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .end(.failed(fatal, backoff: true)))

        var refusing = PipelinedGeneration(maxInFlight: 10)
        refusing.refused(timedOut)
        #expect(refusing.next(stopping: false, shutdownTimeout: .seconds(1)) == .end(.failed(timedOut, backoff: true)))
    }

    @Test("a failure of the source stops sending and ends the producer once its reports are in")
    func sourceFailure() {
        var generation = PipelinedGeneration(maxInFlight: 10)
        generation.queued(row(1), messageID: 1)
        generation.sourceFailed(CancellationError())
        #expect(!generation.maySend)
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .drain(purge: true))
        _ = generation.report(messageID: 1)
        _ = generation.apply(.delivered(.init(id: 1, partition: 0, offset: 5)))
        #expect(generation.next(stopping: false, shutdownTimeout: .seconds(1)) == .end(.sourceFailed))
    }

    @Test("a stop waits for the reports until the shutdown deadline, then purges once; it ends once nothing is in flight")
    func shutdownDeadline() {
        var generation = PipelinedGeneration(maxInFlight: 10)
        generation.queued(row(1), messageID: 1)
        let start = ContinuousClock.now
        #expect(generation.next(stopping: true, shutdownTimeout: .seconds(5), now: start) == .drain(purge: false))
        #expect(generation.next(stopping: true, shutdownTimeout: .seconds(5), now: start + .seconds(4)) == .drain(purge: false))
        #expect(generation.next(stopping: true, shutdownTimeout: .seconds(5), now: start + .seconds(5)) == .drain(purge: true))
        #expect(generation.next(stopping: true, shutdownTimeout: .seconds(5), now: start + .seconds(6)) == .drain(purge: false))
        _ = generation.report(messageID: 1)
        #expect(generation.apply(.retry(purged)) == nil)
        #expect(generation.next(stopping: true, shutdownTimeout: .seconds(5), now: start + .seconds(6)) == .end(.stopped))
        #expect(generation.retriableFailures == 0)
    }
}
