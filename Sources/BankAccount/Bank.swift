import EventSourcing
import EventStore
import EventStoreSQL
import Foundation

/// A command the bank refuses without recording anything (invalid input, unknown account).
public struct BankError: Error, CustomStringConvertible, Sendable, Equatable {
    /// What kind of refusal, for front ends that map it (an HTTP status, an exit code).
    public enum Kind: Sendable, Equatable {
        /// The command or query is malformed or out of range.
        case invalid
        /// The account, or the version or moment asked for, does not exist.
        case notFound
        /// Well-formed, but the account cannot take it (a balance past the largest the bank holds).
        case refused
    }

    public var message: String
    public var kind: Kind
    public init(_ message: String, kind: Kind = .invalid) {
        self.message = message
        self.kind = kind
    }
    public var description: String { message }
}

/// What became of a withdrawal.
public enum WithdrawalOutcome: Sendable, Equatable {
    case accepted(balance: Int64)
    /// Recorded as ``WithdrawalRejected``; the balance is unchanged.
    case rejected(reason: String, balance: Int64)
}

/// A command on an account.
public enum AccountCommand: Sendable, Equatable {
    case open(owner: String, initialDeposit: Int64)
    case deposit(amount: Int64, description: String)
    /// Refused for insufficient funds, it is still recorded (``WithdrawalRejected``).
    case withdraw(amount: Int64, description: String)
}

/// What a command did. Known before its events commit, so that writes that depend on it can commit with them.
public struct AccountCommandResult: Sendable, Equatable, Codable {
    public var accountID: String
    public var owner: String
    public var balance: Int64
    /// The account's version after the command: its number of events.
    public var version: Int64
    /// Why a withdrawal was refused (it is recorded as ``WithdrawalRejected``); `nil` otherwise.
    public var rejection: String?

    init(_ accountID: String, _ state: VersionedState<Account>, rejection: String?) {
        self.accountID = accountID
        owner = state.state.owner
        balance = state.state.balance
        version = state.version
        self.rejection = rejection
    }
}

/// The bank's commands and queries over event-sourced accounts.
public struct Bank: Sendable {
    public let repository: AggregateRepository<Account>

    public init(repository: AggregateRepository<Account>) {
        self.repository = repository
    }

    /// A bank on this event store, with the bank registry; its events go to `topic`.
    /// - Parameter cache: accounts whose latest state commands are decided on without a load (see `AggregateCache`);
    ///   `nil`: every command loads its account.
    public init(store: EventStore, snapshotInterval: Int = 100, topic: String = BankEvents.topic, cache: AggregateCache<Account>? = nil) {
        var store = store
        store.routing = OutboxRouting(defaultTopic: topic)
        self.init(repository: AggregateRepository(
            store: store, registry: BankEvents.registry, snapshotInterval: snapshotInterval, cache: cache))
    }

    /// Opens an account and returns its id (a new UUID, lowercase; also its stream id).
    public func open(owner: String, initialDeposit: Int64 = 0, metadata: EventMetadata = .init()) async throws -> String {
        try await execute(.open(owner: owner, initialDeposit: initialDeposit), metadata: metadata).accountID
    }

    /// Deposits `amount` (> 0) and returns the new balance.
    static let momentRange = Date(timeIntervalSince1970: 0)...Date(timeIntervalSince1970: 253_402_300_799)

    /// PostgreSQL's jsonb cannot hold U+0000: refused here with a reason, instead of failing at the insert.
    static func checkText(_ command: AccountCommand) throws {
        let (name, text): (String, String) = switch command {
        case .open(let owner, _): ("owner", owner)
        case .deposit(_, let description), .withdraw(_, let description): ("description", description)
        }
        if text.unicodeScalars.contains("\u{0}") { throw BankError("\(name) must not contain the NUL character (U+0000)") }
    }

    public func deposit(_ accountID: String, amount: Int64, description: String = "", metadata: EventMetadata = .init())
        async throws -> Int64
    {
        try await execute(.deposit(amount: amount, description: description), on: accountID, metadata: metadata).balance
    }

    /// Withdraws `amount` (> 0) if the balance covers it; otherwise records a ``WithdrawalRejected``.
    public func withdraw(_ accountID: String, amount: Int64, description: String = "", metadata: EventMetadata = .init())
        async throws -> WithdrawalOutcome
    {
        let result = try await execute(.withdraw(amount: amount, description: description), on: accountID, metadata: metadata)
        if let reason = result.rejection { return .rejected(reason: reason, balance: result.balance) }
        return .accepted(balance: result.balance)
    }

    /// Runs a command: validates it, decides its events from the account's current state (retrying on concurrent
    /// changes), and commits them with their outbox rows, and with `alsoWriting`'s statements (given the result,
    /// which is known before the commit) in the same transaction.
    /// - Parameter accountID: the account; `nil` for ``AccountCommand/open(owner:initialDeposit:)``, which makes one.
    /// - Throws: ``BankError`` for a command refused without recording anything (invalid amounts, unknown account).
    public func execute(
        _ command: AccountCommand, on accountID: String? = nil, metadata: EventMetadata = .init(),
        alsoWriting: @escaping @Sendable (AccountCommandResult) throws -> [TransactionalWrite] = { _ in [] }
    ) async throws -> AccountCommandResult {
        try Self.checkText(command)
        switch command {
        case .open(let owner, let initialDeposit):
            guard accountID == nil else { throw BankError("an account id is chosen by the bank when it opens the account") }
            let owner = owner.trimmingCharacters(in: .whitespacesAndNewlines)
            guard !owner.isEmpty else { throw BankError("owner must not be empty") }
            guard initialDeposit >= 0 else { throw BankError("initial deposit must not be negative (got \(initialDeposit))") }
            let id = UUID().uuidString.lowercased()
            let saved = try await repository.save(
                id, [NewEvent(AccountOpened(owner: owner, initialDeposit: initialDeposit), metadata: metadata)],
                after: VersionedState(state: Account(), version: 0)
            ) { try alsoWriting(AccountCommandResult(id, $0, rejection: nil)) }
            return AccountCommandResult(id, saved, rejection: nil)
        case .deposit(let amount, let description):
            guard let accountID else { throw BankError("a deposit needs an account id") }
            guard amount > 0 else { throw BankError("deposit amount must be positive (got \(amount))") }
            let result = try await repository.execute(
                accountID, metadata: metadata, alsoWriting: { state, _ in try alsoWriting(AccountCommandResult(accountID, state, rejection: nil)) }
            ) { current in
                guard current.state.isOpen else { throw BankError("no account '\(accountID)'", kind: .notFound) }
                guard !current.state.balance.addingReportingOverflow(amount).overflow else {
                    throw BankError(
                        "deposit refused: a balance of \(current.state.balance) plus \(amount) exceeds the largest balance the bank can hold (\(Int64.max) minor units)",
                        kind: .refused)
                }
                return [MoneyDeposited(amount: amount, description: description)]
            }
            return AccountCommandResult(accountID, result.state, rejection: nil)
        case .withdraw(let amount, let description):
            guard let accountID else { throw BankError("a withdrawal needs an account id") }
            guard amount > 0 else { throw BankError("withdrawal amount must be positive (got \(amount))") }
            @Sendable func rejection(_ events: [any DomainEvent]) -> String? { (events.first as? WithdrawalRejected)?.reason }
            let result = try await repository.execute(
                accountID, metadata: metadata, maxAttempts: 100,
                alsoWriting: { try alsoWriting(AccountCommandResult(accountID, $0, rejection: rejection($1))) }
            ) { current in
                guard current.state.isOpen else { throw BankError("no account '\(accountID)'", kind: .notFound) }
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
            return AccountCommandResult(accountID, result.state, rejection: rejection(result.events))
        }
    }

    /// The account now, at a past version, or as it was at a past moment.
    public func account(_ accountID: String, atVersion version: Int64? = nil, asOf date: Date? = nil) async throws
        -> VersionedState<Account>
    {
        if let version, version < 1 { throw BankError("a version is 1 or more (got \(version))") }
        // PostgreSQL's calendar and Foundation's disagree before 1582 (days off, then an overflow): a moment is
        // asked for within the span any event can have.
        if let date, !Self.momentRange.contains(date) {
            throw BankError("a moment is between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z (got \(ISOTimestamp.format(date)))")
        }
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
            throw BankError(exists ? "account '\(accountID)' did not exist yet at that point" : "no account '\(accountID)'", kind: .notFound)
        }
        if let version, version != state.version {
            throw BankError("account '\(accountID)' has versions 1 to \(state.version); there is no version \(version)", kind: .notFound)
        }
        if let date, date > Date() {
            throw BankError("\(ISOTimestamp.format(date)) is in the future: time travel goes back, not forward")
        }
        return state
    }

    /// Every event of the account, rejected withdrawals included, decoded.
    public func history(_ accountID: String) async throws -> [(recorded: RecordedEvent, event: any DomainEvent)] {
        let events = try await repository.store.readStream(accountID)
        guard !events.isEmpty else { throw BankError("no account '\(accountID)'", kind: .notFound) }
        return try events.map { ($0, try repository.registry.decode($0)) }
    }
}
