import BankDomain
import EventSourcing
import EventStorePostgresNIO
import EventStoreSQL
import Foundation
import Logging
import PostgresNIO

/// An example service on postgres-nio: bank deposits that also keep a receipt in a table of the service's own.
///
/// Each deposit is one postgres-nio transaction: the receipt row, the account's `MoneyDeposited` event and its
/// outbox row. A reference used twice violates the receipts' primary key and rolls the event back with it, so a
/// retried request never deposits twice; a concurrent change of the account is a `ConcurrencyConflict`, after
/// which the whole transaction runs again on the new state. The account itself is the bank's event-sourced
/// `Account` (BankDomain): the same events, topics and read models as `accounts-service`, which uses libpq.
public struct Ledger: Sendable {
    public let client: PostgresClient
    public let store: PostgresNIOEventStore
    public let logger: Logger

    /// - Parameter topic: where the relay publishes the accounts' events (the bank's topic unless told).
    public init(client: PostgresClient, topic: String = BankEvents.topic, logger: Logger = Logger(label: "ledger")) {
        self.client = client
        store = PostgresNIOEventStore(routing: OutboxRouting(topicByCategory: [Account.category: topic]))
        self.logger = logger
    }

    /// Makes the service's own table. (`eventoutbox migrate` makes the event store's; a real service runs this
    /// from its migration tool.)
    public func createTables() async throws {
        try await client.query(
            """
            CREATE TABLE IF NOT EXISTS ledger_receipts (
                reference text PRIMARY KEY, account_id text NOT NULL, amount bigint NOT NULL, account_version bigint NOT NULL)
            """, logger: logger)
    }

    /// Opens an account and returns its id.
    public func open(owner: String) async throws -> String {
        let accountID = UUID().uuidString.lowercased()
        _ = try await client.withConnection { connection in
            try await store.append(
                [NewEvent(AccountOpened(owner: owner, initialDeposit: 0))], to: accountID, category: Account.category,
                expectedVersion: .noStream, on: connection, logger: logger)
        }
        return accountID
    }

    /// Deposits `amount` once per `reference`, and returns the balance after it.
    /// - Throws: ``LedgerError`` for an unknown account, an amount that is not positive, or a reference already used.
    public func deposit(_ amount: Int64, to accountID: String, reference: String) async throws -> Int64 {
        guard amount > 0 else { throw LedgerError.invalidAmount(amount) }
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await client.withConnection { connection in
                    try await connection.withTransaction(logger: logger) { tx in
                        let (account, version) = try await load(accountID, on: tx)
                        guard account.isOpen else { throw LedgerError.noAccount(accountID) }
                        let inserted = try await tx.query(
                            """
                            INSERT INTO ledger_receipts (reference, account_id, amount, account_version)
                            VALUES (\(reference), \(accountID), \(amount), \(version + 1)) ON CONFLICT (reference) DO NOTHING
                            RETURNING 1
                            """, logger: logger)
                        var isNew = false
                        for try await _ in inserted { isNew = true }
                        guard isNew else { throw LedgerError.duplicateReference(reference) }
                        try await store.append(
                            [NewEvent(MoneyDeposited(amount: amount, description: "receipt \(reference)"))],
                            to: accountID, category: Account.category, expectedVersion: .exact(version), on: tx, logger: logger)
                        return account.balance + amount
                    }
                }
            } catch let error as PostgresTransactionError {
                // postgres-nio wraps what the transaction's body threw; a conflict means: reload and decide again.
                if error.closureError is ConcurrencyConflict, attempt < 20 { continue }
                throw error.closureError ?? error
            }
        }
    }

    /// The account now, and its version.
    public func account(_ accountID: String) async throws -> (Account, Int64) {
        try await client.withConnection { try await load(accountID, on: $0) }
    }

    private func load(_ accountID: String, on connection: PostgresConnection) async throws -> (Account, Int64) {
        var account = Account()
        var version: Int64 = 0
        for recorded in try await store.readStream(accountID, on: connection, logger: logger) {
            try account.apply(try BankEvents.registry.decode(recorded))
            version = recorded.streamVersion
        }
        return (account, version)
    }
}

/// A deposit the ledger refused without writing anything.
public enum LedgerError: Error, Equatable, CustomStringConvertible {
    case invalidAmount(Int64)
    case noAccount(String)
    case duplicateReference(String)

    public var description: String {
        switch self {
        case .invalidAmount(let amount): "a deposit must be positive (got \(amount))"
        case .noAccount(let id): "no account '\(id)'"
        case .duplicateReference(let reference): "reference '\(reference)' was deposited already; nothing was written again"
        }
    }
}
