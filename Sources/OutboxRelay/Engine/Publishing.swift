import EventStore
import KafkaClient
import Logging
import Metrics
import OutboxRelayStore
import LibPQ
import Synchronization

/// What handing one record to the producer came to.
enum SendOutcome: Equatable {
    case queued
    /// Kafka will never take this record (too large, invalid): it becomes a dead letter.
    case refusedForGood(KafkaError)
    /// Refused for another reason (the producer failed, a transaction state): this producer sends nothing more.
    case refused(KafkaError)
}

extension KafkaProducer {
    /// Enqueues `message` under `messageID`. While librdkafka's own queue is full (its limits lie below the
    /// relay's in-flight bound), waits for delivery reports to drain it: the relay's back-pressure, written once
    /// for both engines.
    func send(_ message: KafkaOutgoingMessage, messageID: UInt64) async throws -> SendOutcome {
        while true {
            do {
                try enqueue(message, messageID: messageID)
                return .queued
            } catch let error as KafkaError where error.code == .queueFull {
                try await Task.sleep(for: .milliseconds(1))
            } catch let error as KafkaError {
                return error.isPermanentForRecord ? .refusedForGood(error) : .refused(error)
            } catch {
                return .refused(KafkaError(code: .invalidArgument, message: "cannot enqueue message \(messageID): \(error)"))
            }
        }
    }
}

/// The counters and metrics both engines keep, each in one place.
extension OutboxRelay {
    func recordPublished(_ count: Int) {
        guard count > 0 else { return }
        counters.published.add(count, ordering: .relaxed)
        metrics.published.increment(by: count)
    }

    /// A delivery that failed for a reason a new attempt may fix (dead letters count too, see below).
    func recordFailedDelivery() {
        counters.failed.add(1, ordering: .relaxed)
        metrics.deliveryErrors.increment()
    }

    /// A row Kafka will never take, now set aside in the database.
    func recordDeadLetter(_ row: OutboxRow, _ error: KafkaError) {
        recordFailedDelivery()
        metrics.deadLettered.increment()
        logger.error(
            "outbox row moved to dead letters; later events of its stream are held back until it is retried",
            metadata: [
                "outbox.id": "\(row.id)", "event.id": "\(row.eventID)", "stream.id": "\(row.streamID)",
                "stream.version": "\(row.streamVersion)", "kafka.error": "\(error)",
            ])
    }

    /// An outbox row that cannot be read (only a hand-written row could be one) must not stall the outbox:
    /// it goes to dead letters, if it is still in the outbox, and its stream waits behind it.
    func deadLetterUnreadable(_ id: Int64, _ reason: String, on connection: PQConnection) async throws {
        let moved = try await table.moveToDeadLetters(id, error: reason, on: connection)
        metrics.deadLettered.increment()
        logger.error(
            moved
                ? "outbox row cannot be read; moved to dead letters, its stream is held back"
                : "outbox row cannot be read and is no longer in the outbox; it is not published",
            metadata: ["outbox.id": "\(id)", "error": "\(reason)"])
    }

    func recordProducerRestart() {
        counters.producerRestarts.add(1, ordering: .relaxed)
        metrics.producerRestarts.increment()
    }
}
