import EventSourcing
import EventStore
import Foundation

/// A command the bank refuses without recording anything (invalid input, unknown account).
public struct BankError: Error, CustomStringConvertible, Sendable, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// What became of a withdrawal.
public enum WithdrawalOutcome: Sendable, Equatable {
    case accepted(balance: Int64)
    /// Recorded as ``WithdrawalRejected``; the balance is unchanged.
    case rejected(reason: String, balance: Int64)
}

/// The bank's commands and queries over event-sourced accounts.
public struct Bank: Sendable {
    public let repository: AggregateRepository<Account>

    public init(repository: AggregateRepository<Account>) {
        self.repository = repository
    }

    /// A bank on this event store, with the bank registry; its events go to `topic`.
    public init(store: EventStore, snapshotInterval: Int = 100, topic: String = BankEvents.topic) {
        var store = store
        store.routing = OutboxRouting(defaultTopic: topic)
        self.init(repository: AggregateRepository(store: store, registry: BankEvents.registry, snapshotInterval: snapshotInterval))
    }

    /// Opens an account and returns its id (a new UUID, lowercase; also its stream id).
    public func open(owner: String, initialDeposit: Int64 = 0, metadata: EventMetadata = .init()) async throws -> String {
        let owner = owner.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !owner.isEmpty else { throw BankError("owner must not be empty") }
        guard initialDeposit >= 0 else { throw BankError("initial deposit must not be negative (got \(initialDeposit))") }
        let id = UUID().uuidString.lowercased()
        try await repository.save(
            id, [NewEvent(AccountOpened(owner: owner, initialDeposit: initialDeposit), metadata: metadata)],
            after: VersionedState(state: Account(), version: 0))
        return id
    }

    /// Deposits `amount` (> 0) and returns the new balance.
    public func deposit(_ accountID: String, amount: Int64, description: String = "", metadata: EventMetadata = .init())
        async throws -> Int64
    {
        guard amount > 0 else { throw BankError("deposit amount must be positive (got \(amount))") }
        let result = try await repository.execute(accountID, metadata: metadata) { current in
            guard current.state.isOpen else { throw BankError("no account '\(accountID)'") }
            guard !current.state.balance.addingReportingOverflow(amount).overflow else {
                throw BankError(
                    "deposit refused: a balance of \(current.state.balance) plus \(amount) exceeds the largest balance the bank can hold (\(Int64.max) minor units)")
            }
            return [MoneyDeposited(amount: amount, description: description)]
        }
        return result.state.state.balance
    }

    /// Withdraws `amount` (> 0) if the balance covers it; otherwise records a ``WithdrawalRejected``.
    public func withdraw(_ accountID: String, amount: Int64, description: String = "", metadata: EventMetadata = .init())
        async throws -> WithdrawalOutcome
    {
        guard amount > 0 else { throw BankError("withdrawal amount must be positive (got \(amount))") }
        let result = try await repository.execute(accountID, metadata: metadata, maxAttempts: 100) { current in
            guard current.state.isOpen else { throw BankError("no account '\(accountID)'") }
            if current.state.balance < amount {
                return [
                    WithdrawalRejected(
                        amount: amount,
                        reason: "insufficient funds: balance \(current.state.balance), requested \(amount)",
                        balanceAtTime: current.state.balance)
                ]
            }
            return [MoneyWithdrawn(amount: amount, description: description)]
        }
        let balance = result.state.state.balance
        if let rejected = result.events.first as? WithdrawalRejected {
            return .rejected(reason: rejected.reason, balance: balance)
        }
        return .accepted(balance: balance)
    }

    /// The account now, at a past version, or as it was at a past moment.
    public func account(_ accountID: String, atVersion version: Int64? = nil, asOf date: Date? = nil) async throws
        -> VersionedState<Account>
    {
        if let version, version < 1 { throw BankError("a version is 1 or more (got \(version))") }
        let state: VersionedState<Account>
        if let version {
            state = try await repository.load(accountID, atVersion: version)
        } else if let date {
            state = try await repository.load(accountID, asOf: date)
        } else {
            state = try await repository.load(accountID)
        }
        if state.isNew {
            let exists = try await repository.store.currentVersion(of: accountID) > 0
            throw BankError(exists ? "account '\(accountID)' did not exist yet at that point" : "no account '\(accountID)'")
        }
        if let version, version != state.version {
            throw BankError("account '\(accountID)' has versions 1 to \(state.version); there is no version \(version)")
        }
        if let date, date > Date() {
            throw BankError("\(ISOTimestamp.format(date)) is in the future: time travel goes back, not forward")
        }
        return state
    }

    /// Every event of the account, rejected withdrawals included, decoded.
    public func history(_ accountID: String) async throws -> [(recorded: RecordedEvent, event: any DomainEvent)] {
        let events = try await repository.store.readStream(accountID)
        guard !events.isEmpty else { throw BankError("no account '\(accountID)'") }
        return try events.map { ($0, try repository.registry.decode($0)) }
    }
}
