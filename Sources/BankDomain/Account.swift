import EventSourcing

/// A bank account's state, folded from its events.
public struct Account: Aggregate, Hashable {
    public static let category = "account"
    public static let stateSchemaVersion = 1

    public var isOpen = false
    public var owner = ""
    /// Minor units.
    public var balance: Int64 = 0
    public var depositCount = 0
    public var withdrawalCount = 0
    public var rejectedWithdrawalCount = 0

    public init() {}

    public mutating func apply(_ event: any DomainEvent) throws {
        switch event {
        case let opened as AccountOpened:
            isOpen = true
            owner = opened.owner
            balance = opened.initialDeposit
        case let deposited as MoneyDeposited:
            balance = try checked(balance.addingReportingOverflow(deposited.amount), "a deposit of \(deposited.amount)")
            depositCount += 1
        case let withdrawn as MoneyWithdrawn:
            balance = try checked(balance.subtractingReportingOverflow(withdrawn.amount), "a withdrawal of \(withdrawn.amount)")
            withdrawalCount += 1
        case is WithdrawalRejected:
            rejectedWithdrawalCount += 1
        default:
            throw UnexpectedEvent(aggregate: Self.category, eventType: type(of: event).eventType)
        }
    }

    /// The balance after `change`, or ``BalanceOutOfRange`` when it does not fit in `Int64`: an error to
    /// report, never a trap, wherever the events come from (a replay, an import).
    private func checked(_ result: (partialValue: Int64, overflow: Bool), _ change: String) throws -> Int64 {
        guard !result.overflow else { throw BalanceOutOfRange(owner: owner, balance: balance, change: change) }
        return result.partialValue
    }
}

/// An account's balance would leave the range the bank can hold (`Int64` minor units).
public struct BalanceOutOfRange: Error, CustomStringConvertible, Sendable, Equatable {
    public var owner: String
    public var balance: Int64
    public var change: String
    public init(owner: String, balance: Int64, change: String) {
        self.owner = owner
        self.balance = balance
        self.change = change
    }
    public var description: String {
        "the balance of \(owner)'s account (\(balance)) cannot take \(change): it would leave the range the bank can hold (±\(Int64.max) minor units)"
    }
}
