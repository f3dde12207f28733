import EventStore
import Foundation
import KafkaClient
@testable import OutboxRelay
import OutboxRelayStore
import Testing

private func row(_ id: Int64, _ stream: String, _ version: Int64) -> OutboxRow {
    OutboxRow(
        id: id, eventID: UUID(), streamID: stream, streamVersion: version, topic: "t", key: stream, envelope: "{}",
        headers: [:], createdAt: Date())
}

private func report(_ row: OutboxRow, _ error: KafkaError? = nil, offset: Int64 = 0) -> KafkaDeliveryReport {
    KafkaDeliveryReport(messageID: UInt64(row.id), topic: "t", partition: 0, offset: error == nil ? offset : nil, error: error)
}

/// The ordering rules of the pipelined relay, without servers.
@Suite("publish pipeline (ordering rules, no servers)")
struct PublishPipelineTests {
    @Test("first versions and the version after the last one sent need no database check; anything else does")
    func whatNeedsChecking() {
        var pipeline = PublishPipeline()
        let first = [row(1, "a", 1), row(2, "a", 2), row(3, "b", 7)]
        #expect(pipeline.rangesToCheck(first) == [.init(streamID: "b", afterID: 0, beforeID: 3)])
        let admitted = pipeline.admit(first, holes: [])
        #expect(admitted.map(\.id) == [1, 2, 3])
        admitted.forEach { pipeline.sent($0) }
        #expect(pipeline.cursor == 3)
        // Next batch: a continues, b skips a version: only b is checked, from the last row sent.
        let next = [row(4, "a", 3), row(6, "b", 9)]
        #expect(pipeline.rangesToCheck(next) == [.init(streamID: "b", afterID: 3, beforeID: 6)])
    }

    @Test("a hole (an earlier row committed late) holds its stream back and asks for a rescan; others go on")
    func holeHoldsStream() {
        var pipeline = PublishPipeline()
        let rows = [row(10, "late", 2), row(11, "other", 1), row(12, "late", 3)]
        let admitted = pipeline.admit(rows, holes: ["late"])
        #expect(admitted.map(\.id) == [11])
        #expect(pipeline.needsRescan)
        #expect(pipeline.cursor == 12)
        admitted.forEach { pipeline.sent($0) }
        guard case .delivered = pipeline.record(report(admitted[0])) else { Issue.record("not delivered"); return }
        #expect(pipeline.isIdle)
        pipeline.rescan()
        #expect(pipeline.cursor == 0 && !pipeline.needsRescan)
        // The rescan finds the late row (id 5) first; then the stream flows in order.
        let again = [row(5, "late", 1), row(10, "late", 2), row(12, "late", 3)]
        #expect(pipeline.rangesToCheck(again).isEmpty)
        #expect(pipeline.admit(again, holes: []).map(\.id) == [5, 10, 12])
    }

    @Test("catching up behind the cursor while rows are in flight: the late row goes first, then its held stream")
    func catchUpWhileBusy() {
        var pipeline = PublishPipeline()
        let busy = row(1, "busy", 1)
        pipeline.admit([busy], holes: []).forEach { pipeline.sent($0) }
        // id 3 (late v1) was invisible when the cursor passed; late v2 (id 5) shows the hole.
        let admitted = pipeline.admit([row(4, "busy", 2), row(5, "late", 2)], holes: ["late"])
        admitted.forEach { pipeline.sent($0) }
        #expect(admitted.map(\.id) == [4])
        #expect(pipeline.needsRescan && !pipeline.isIdle)
        pipeline.beginCatchUp()
        #expect(!pipeline.needsRescan)
        #expect(pipeline.cursor == 5)
        // Behind the cursor, not in flight: the late row and the held one, in id order.
        let behind = [row(3, "late", 1), row(5, "late", 2)]
        #expect(pipeline.rangesToCheck(behind).isEmpty)
        #expect(pipeline.admit(behind, holes: []).map(\.id) == [3, 5])
        #expect(pipeline.cursor == 5)
    }

    @Test("ids a fetch skipped are looked at again until they turn up or expire; long runs are not tracked")
    func gaps() {
        var pipeline = PublishPipeline()
        let start = ContinuousClock.now
        pipeline.noteFetched([row(1, "a", 1), row(2, "b", 1)], after: 0, now: start)
        #expect(pipeline.gapsToRecheck(now: start).isEmpty, "a full scan's first row leaves no gap")
        pipeline.noteFetched([row(5, "a", 2), row(7, "c", 1)], after: 2, now: start)
        #expect(pipeline.gapsToRecheck(now: start) == [3, 4, 6])
        // Id 4 committed late: it turns up through the recheck and leaves the list.
        pipeline.noteFetched([row(4, "d", 1), row(8, "a", 3)], after: 7, now: start)
        #expect(pipeline.gapsToRecheck(now: start) == [3, 6])
        #expect(pipeline.gapsToRecheck(now: start + PublishPipeline.gapLifetime).isEmpty, "rolled-back ids expire")
        pipeline.noteFetched([row(5_000, "e", 1)], after: 8, now: start)
        #expect(pipeline.gapsToRecheck(now: start).isEmpty, "a long run of missing ids is not an open transaction")
        var partitioned = PublishPipeline(tracksGaps: false)
        partitioned.noteFetched([row(5, "a", 2), row(7, "c", 1)], after: 2, now: start)
        #expect(partitioned.gapsToRecheck(now: start).isEmpty)
    }

    @Test("after the first failed delivery nothing more is admitted; a permanent error dead-letters only the stream's first failure")
    func failureStopsThePipeline() {
        var pipeline = PublishPipeline()
        let rows = [row(1, "a", 1), row(2, "a", 2), row(3, "b", 1)]
        pipeline.admit(rows, holes: []).forEach { pipeline.sent($0) }
        let tooLarge = KafkaError(code: .messageSizeTooLarge, message: "too large")
        guard case .deadLetter(let dead, _) = pipeline.record(report(rows[0], tooLarge)) else {
            Issue.record("expected a dead letter")
            return
        }
        #expect(dead.id == 1)
        #expect(pipeline.failure?.code == .messageSizeTooLarge)
        guard case .retry = pipeline.record(report(rows[1], KafkaError(code: .purgedInFlight, message: "purged"))) else {
            Issue.record("a later row of a failed stream is retried, not dead-lettered")
            return
        }
        #expect(pipeline.admit([row(4, "c", 1)], holes: []).isEmpty)
        guard case .delivered = pipeline.record(report(rows[2])) else { Issue.record("b was delivered"); return }
        #expect(pipeline.orderViolations == 0)
        #expect(pipeline.isIdle)
    }

    @Test("a row stored after an earlier row of its stream failed is counted as an order violation")
    func orderViolationIsCounted() {
        var pipeline = PublishPipeline()
        let rows = [row(1, "a", 1), row(2, "a", 2)]
        pipeline.admit(rows, holes: []).forEach { pipeline.sent($0) }
        _ = pipeline.record(report(rows[0], KafkaError(code: .messageTimedOut, message: "timed out")))
        _ = pipeline.record(report(rows[1]))
        #expect(pipeline.orderViolations == 1)
    }

    @Test("a row refused before it is enqueued blocks its stream's later rows in this pass")
    func refusedRowBlocksStream() {
        var pipeline = PublishPipeline()
        let rows = [row(1, "a", 1), row(2, "a", 2), row(3, "b", 1)]
        let admitted = pipeline.admit(rows, holes: [])
        pipeline.refused(admitted[0])
        #expect(!pipeline.mayEnqueue(admitted[1]))
        #expect(pipeline.mayEnqueue(admitted[2]))
        #expect(pipeline.needsRescan)
        #expect(pipeline.admit([row(4, "a", 3)], holes: []).isEmpty)
    }

    @Test("reports of rows this pipeline never sent are ignored")
    func unknownReport() {
        var pipeline = PublishPipeline()
        guard case .unknown = pipeline.record(report(row(99, "x", 1))) else { Issue.record("expected unknown"); return }
    }
}

@Suite("partition ownership (no servers)")
struct PartitionOwnershipTests {
    @Test("each relay aims at ceil(partitions / relays), so every partition is covered")
    func target() {
        #expect(PartitionOwnership.target(partitions: 8, members: 1) == 8)
        #expect(PartitionOwnership.target(partitions: 8, members: 3) == 3)
        #expect(PartitionOwnership.target(partitions: 8, members: 2) == 4)
        #expect(PartitionOwnership.target(partitions: 2, members: 5) == 1)
        #expect(PartitionOwnership.target(partitions: 8, members: 0) == 8)
    }
}
