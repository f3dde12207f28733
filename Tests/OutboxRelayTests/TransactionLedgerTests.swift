import Foundation
import LibPQ
import Testing

@testable import OutboxRelay

@Suite("TransactionLedger: what a WAL relay may confirm")
struct TransactionLedgerTests {
    @Test("a transaction is confirmable once committed and every message is acknowledged, in commit order")
    func prefixOnly() {
        var ledger = TransactionLedger(confirmed: PostgresLSN(10))
        let first = ledger.begin(commitTime: Date())
        ledger.sent(in: first)
        ledger.sent(in: first)
        ledger.commit(endLSN: PostgresLSN(100))
        let second = ledger.begin(commitTime: Date())
        ledger.sent(in: second)
        ledger.commit(endLSN: PostgresLSN(200))
        #expect(ledger.confirmable == PostgresLSN(10))
        ledger.settled(in: second)  // the later transaction first: nothing moves
        #expect(ledger.confirmable == PostgresLSN(10))
        ledger.settled(in: first)
        #expect(ledger.confirmable == PostgresLSN(10))
        ledger.settled(in: first)
        #expect(ledger.confirmable == PostgresLSN(200))
        #expect(ledger.unsettledTransactions == 0)
    }

    @Test("a transaction whose messages are all acknowledged before its commit arrives waits for the commit")
    func waitsForCommit() {
        var ledger = TransactionLedger(confirmed: .zero)
        let open = ledger.begin(commitTime: Date())
        ledger.sent(in: open)
        ledger.settled(in: open)
        #expect(ledger.confirmable == .zero)
        ledger.caughtUp(to: PostgresLSN(500))  // inside a transaction: not idle
        #expect(ledger.confirmable == .zero)
        ledger.commit(endLSN: PostgresLSN(300))
        #expect(ledger.confirmable == PostgresLSN(300))
    }

    @Test("transactions without outbox rows confirm at their commit; keepalives move an idle ledger only")
    func emptyAndIdle() {
        var ledger = TransactionLedger(confirmed: .zero)
        let busy = ledger.begin(commitTime: Date(timeIntervalSince1970: 1))
        ledger.sent(in: busy)
        ledger.commit(endLSN: PostgresLSN(50))
        _ = ledger.begin(commitTime: Date())
        ledger.commit(endLSN: PostgresLSN(60))
        ledger.caughtUp(to: PostgresLSN(90))
        #expect(ledger.confirmable == .zero)
        #expect(ledger.oldestUnsettledCommitTime == Date(timeIntervalSince1970: 1))
        ledger.settled(in: busy)
        #expect(ledger.confirmable == PostgresLSN(60))
        ledger.caughtUp(to: PostgresLSN(90))
        #expect(ledger.confirmable == PostgresLSN(90))
        ledger.caughtUp(to: PostgresLSN(70))
        #expect(ledger.confirmable == PostgresLSN(90))
        #expect(ledger.oldestUnsettledCommitTime == nil)
    }
}
