import EventStore
import KafkaClient
import OutboxRelayStore

/// The bookkeeping of one Kafka transaction of the exactly-once relay: which rows it sent, which reports came
/// back, and what to do next. Pure: the engine (``TransactionalPublisher``) does the I/O.
///
/// The progress record goes out only once every row of the transaction is acknowledged. So a progress record
/// that reached a partition always comes after all of its transaction's rows, even on a test broker that
/// shows records of aborted transactions (librdkafka's mock cluster), and a relay that reads it back never
/// marks a row Kafka does not hold.
struct TransactionRound {
    /// What the engine does next.
    enum Next {
        /// Reports are still missing.
        case wait
        /// Every row is stored (within the open transaction): send the progress record, then commit.
        case sendProgress([OutboxTable.Delivery])
        /// A row failed: abort, dead-letter `deadLetters` (rows Kafka will never accept), resume from the database.
        case abort(deadLetters: [OutboxRow], reason: KafkaError)

        var isWait: Bool { if case .wait = self { true } else { false } }
    }

    let label: String
    private var waiting: [UInt64: OutboxRow] = [:]
    private var delivered: [OutboxTable.Delivery] = []
    private var deadLetters: [OutboxRow] = []
    private var failure: KafkaError?

    init(label: String) { self.label = label }

    var sentCount: Int { waiting.count + delivered.count + deadLetters.count }

    /// A row was handed to the producer under `messageID`.
    mutating func sent(_ row: OutboxRow, messageID: UInt64) { waiting[messageID] = row }

    /// The producer refused a row at once; `permanent` when it never will accept it.
    mutating func refused(_ row: OutboxRow, _ error: KafkaError) {
        if error.isPermanentForRecord { deadLetters.append(row) }
        failure = failure ?? error
    }

    /// A delivery report; reports of other transactions (late purges) are ignored.
    mutating func record(_ report: KafkaDeliveryReport) {
        guard let row = waiting.removeValue(forKey: report.messageID) else { return }
        guard let error = report.error else {
            delivered.append(.init(id: row.id, partition: report.partition, offset: report.offset ?? -1))
            return
        }
        if error.isPermanentForRecord { deadLetters.append(row) }
        // A purge is the consequence of an earlier failure, not its cause.
        if failure == nil || failure!.code.isPurge { failure = error }
    }

    /// The producer failed as a whole (fatal error): nothing of this transaction can commit.
    mutating func abandon(_ error: KafkaError) { failure = failure ?? error }

    var next: Next {
        if let failure {
            // Wait for the other reports only if they are useful: a permanent refusal is known already.
            return .abort(deadLetters: deadLetters, reason: failure)
        }
        return waiting.isEmpty ? .sendProgress(delivered.sorted { $0.id < $1.id }) : .wait
    }
}

/// What the engine does after a transactional call failed.
enum TransactionFailureResponse: Equatable {
    /// Abort the transaction and resume from the database with the same producer.
    case abortAndResume
    /// The producer is done for (fenced, fatal, or its state unknown): a new one, after checking ownership.
    case replaceProducer

    init(_ error: KafkaError) {
        if error.isFatal || error.isFenced {
            self = .replaceProducer
        } else if error.requiresAbort || error.code.isPurge || error.isPermanentForRecord {
            self = .abortAndResume
        } else {
            // A commit that timed out may or may not have happened; only a new producer's init settles it (it
            // completes or aborts what is open), and the progress topic then says which.
            self = .replaceProducer
        }
    }
}
