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
            balance += deposited.amount
            depositCount += 1
        case let withdrawn as MoneyWithdrawn:
            balance -= withdrawn.amount
            withdrawalCount += 1
        case is WithdrawalRejected:
            rejectedWithdrawalCount += 1
        default:
            throw UnexpectedEvent(aggregate: Self.category, eventType: type(of: event).eventType)
        }
    }
}
