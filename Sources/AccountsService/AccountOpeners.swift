import Synchronization

/// Who opened each account this process has seen: the actor of the account's first event. Events are
/// append-only (a trigger refuses UPDATE and DELETE), so an opener never changes and is kept without expiry, so
/// that an authenticated command costs no statement beyond its own. Bounded: past `capacity` accounts, everything
/// is forgotten at once and looked up again as needed.
final class AccountOpeners: Sendable {
    let capacity: Int
    private let known = Mutex<[String: String]>([:])
    /// Look-ups that went to the database (for tests).
    private let lookUps = Atomic<Int>(0)

    init(capacity: Int = 100_000) {
        self.capacity = capacity
    }

    var databaseLookUps: Int { lookUps.load(ordering: .relaxed) }

    /// The opener of `account`, from memory or else from `lookUp` (`nil`: no such account, which is not kept).
    func opener(of account: String, lookUp: () async throws -> String?) async throws -> String? {
        if let opener = known.withLock({ $0[account] }) { return opener }
        lookUps.add(1, ordering: .relaxed)
        guard let opener = try await lookUp() else { return nil }
        remember(account, openedBy: opener)
        return opener
    }

    /// Keeps `opener` for `account` (an account this process just opened, or one looked up).
    func remember(_ account: String, openedBy opener: String) {
        known.withLock { known in
            if known.count >= capacity { known.removeAll(keepingCapacity: true) }
            known[account] = opener
        }
    }
}
