import Foundation
import LibPQ

/// How far a WAL relay may confirm its replication slot: past a transaction only when Kafka has
/// acknowledged every one of its messages, and every earlier transaction's too.
///
/// Transactions arrive whole and in commit order (`begin`, inserts, `commit`). Each gets a sequence number;
/// messages sent to Kafka are counted against it and settled by delivery reports, in any order. The
/// confirmable position is the commit end of the longest fully settled prefix, so a crash re-sends from the
/// first transaction with anything unsettled and never skips one (at-least-once).
struct TransactionLedger {
    private struct Transaction {
        var outstanding = 0
        var endLSN: PostgresLSN?
        var commitTime: Date
    }

    private var transactions: [UInt64: Transaction] = [:]
    /// The oldest transaction not yet confirmable.
    private var first: UInt64 = 0
    private var next: UInt64 = 0
    /// The transaction between its `begin` and `commit`, if any.
    private var open: UInt64?
    /// Everything before this position is settled.
    private(set) var confirmable: PostgresLSN

    init(confirmed: PostgresLSN) { confirmable = confirmed }

    /// A transaction starts; returns its sequence number.
    mutating func begin(commitTime: Date) -> UInt64 {
        precondition(open == nil, "begin inside an open transaction")
        let sequence = next
        next += 1
        transactions[sequence] = Transaction(commitTime: commitTime)
        open = sequence
        return sequence
    }

    /// One more message of the open transaction went to Kafka.
    mutating func sent(in sequence: UInt64) {
        transactions[sequence, default: Transaction(commitTime: Date())].outstanding += 1
    }

    /// A message of transaction `sequence` is settled: stored by Kafka, or recorded as a dead letter.
    mutating func settled(in sequence: UInt64) {
        guard transactions[sequence] != nil else { return }
        transactions[sequence]!.outstanding -= 1
        advance()
    }

    /// The open transaction's commit: its end position is what confirming it means.
    mutating func commit(endLSN: PostgresLSN) {
        guard let sequence = open else { return }
        open = nil
        transactions[sequence]?.endLSN = endLSN
        advance()
    }

    /// A keepalive: the server has sent everything before `walEnd`. With nothing unsettled and no transaction
    /// open, that position is settled too (the WAL in between held nothing for this publication), so an idle
    /// slot does not keep old WAL.
    mutating func caughtUp(to walEnd: PostgresLSN) {
        guard transactions.isEmpty, open == nil, walEnd > confirmable else { return }
        confirmable = walEnd
    }

    /// Commit time of the oldest transaction not yet confirmable (`nil` when all are).
    var oldestUnsettledCommitTime: Date? { transactions[first]?.commitTime }

    /// Nothing received is unsettled and no transaction is open.
    var isIdle: Bool { transactions.isEmpty && open == nil }

    /// Transactions received and not yet confirmable.
    var unsettledTransactions: Int { transactions.count }

    private mutating func advance() {
        while let transaction = transactions[first], let end = transaction.endLSN, transaction.outstanding == 0 {
            transactions[first] = nil
            if end > confirmable { confirmable = end }
            first += 1
        }
    }
}
