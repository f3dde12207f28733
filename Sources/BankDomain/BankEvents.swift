import EventSourcing

/// An account was opened. Amounts everywhere are integer minor units (cents), never floating point.
public struct AccountOpened: DomainEvent, Hashable {
    public static let eventType = "AccountOpened"
    public var owner: String
    public var initialDeposit: Int64
    public init(owner: String, initialDeposit: Int64) {
        self.owner = owner
        self.initialDeposit = initialDeposit
    }
}

/// Money was paid in. Schema v2 added `description`; v1 rows are upcast with an empty one.
public struct MoneyDeposited: DomainEvent, Hashable {
    public static let eventType = "MoneyDeposited"
    public static let schemaVersion = 2
    public var amount: Int64
    public var description: String
    public init(amount: Int64, description: String) {
        self.amount = amount
        self.description = description
    }
}

/// Money was paid out.
public struct MoneyWithdrawn: DomainEvent, Hashable {
    public static let eventType = "MoneyWithdrawn"
    public var amount: Int64
    public var description: String
    public init(amount: Int64, description: String) {
        self.amount = amount
        self.description = description
    }
}

/// A withdrawal was refused. Recorded for the audit trail; it changes no balance.
public struct WithdrawalRejected: DomainEvent, Hashable {
    public static let eventType = "WithdrawalRejected"
    public var amount: Int64
    public var reason: String
    public var balanceAtTime: Int64
    public init(amount: Int64, reason: String, balanceAtTime: Int64) {
        self.amount = amount
        self.reason = reason
        self.balanceAtTime = balanceAtTime
    }
}

/// Registry, routing and topic of the bank domain.
public enum BankEvents {
    /// Kafka topic of all account events.
    public static let topic = "bank.accounts"

    /// All bank event types, with the `MoneyDeposited` v1 → v2 upcaster.
    public static let registry: EventRegistry = {
        var registry = EventRegistry()
        registry.register(AccountOpened.self)
        registry.register(MoneyDeposited.self)
        registry.register(MoneyWithdrawn.self)
        registry.register(WithdrawalRejected.self)
        registry.register(
            Upcaster(eventType: MoneyDeposited.eventType, fromVersion: 1) { json in
                var upgraded = json
                if upgraded["description"] == nil { upgraded["description"] = .string("") }
                return upgraded
            })
        return registry
    }()
}
