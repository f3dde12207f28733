import BankDomain
import EventSourcing
import Foundation
import LibPQ
import Projections

/// The bank's read models. Both handlers take a batch and write its effects in set-based statements: a batch of
/// 200 events costs two or three statements, not 200.
public enum AccountProjections {
    /// `account_balances`: one row per account with its balance and the last version applied.
    public static let balances = Projection(
        name: "account_balances",
        tables: [
            .init(
                name: "account_balances",
                createSQL: """
                    CREATE TABLE {table} (
                        account_id   text        PRIMARY KEY,
                        owner        text        NOT NULL,
                        balance      bigint      NOT NULL,
                        last_version bigint      NOT NULL,
                        updated_at   timestamptz NOT NULL
                    )
                    """)
        ],
        applyBatch: { events, context in
            let changes = try BalanceChanges(events)
            let table = context.table("account_balances")
            let opened = changes.accounts.filter { changes.byAccount[$0]!.owner != nil }
            let existing = changes.accounts.filter { changes.byAccount[$0]!.owner == nil }
            if !opened.isEmpty {
                let rows = opened.map { changes.byAccount[$0]! }
                try await context.connection.execute(
                    "INSERT INTO \(table) (account_id, owner, balance, last_version, updated_at) "
                        + "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::timestamptz[])",
                    [.textArray(opened), .textArray(rows.map { $0.owner! }), .int64Array(rows.map(\.delta)),
                     .int64Array(rows.map(\.version)), .timestampArray(rows.map(\.at))],
                    statement: "balances: opened")
            }
            if !existing.isEmpty {
                let rows = existing.map { changes.byAccount[$0]! }
                try await context.connection.execute(
                    "UPDATE \(table) AS t SET balance = t.balance + u.delta, last_version = GREATEST(t.last_version, u.version), "
                        + "updated_at = u.at FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[]) "
                        + "AS u(account_id, delta, version, at) WHERE t.account_id = u.account_id",
                    [.textArray(existing), .int64Array(rows.map(\.delta)), .int64Array(rows.map(\.version)),
                     .timestampArray(rows.map(\.at))],
                    statement: "balances: changed")
            }
        })

    /// `daily_volume`: per UTC day, deposits and withdrawals (totals and counts) and rejected withdrawals. The
    /// totals are `numeric`: a day's sum of Int64 amounts can pass Int64.
    public static let dailyVolume = Projection(
        name: "daily_volume",
        tables: [
            .init(
                name: "daily_volume",
                createSQL: """
                    CREATE TABLE {table} (
                        day                 date    PRIMARY KEY,
                        deposits_total      numeric NOT NULL DEFAULT 0,
                        deposits_count      bigint  NOT NULL DEFAULT 0,
                        withdrawals_total   numeric NOT NULL DEFAULT 0,
                        withdrawals_count   bigint  NOT NULL DEFAULT 0,
                        rejected_count      bigint  NOT NULL DEFAULT 0
                    )
                    """,
                // Totals were bigint at first: one account opened with Int64.max made every later deposit of
                // that day overflow them. numeric sums cannot overflow.
                upgradeSQL: """
                    DO $$ BEGIN
                        IF (SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema()
                                AND table_name = '{table}' AND column_name = 'deposits_total') <> 'numeric' THEN
                            ALTER TABLE {table} ALTER COLUMN deposits_total TYPE numeric,
                                ALTER COLUMN withdrawals_total TYPE numeric, ALTER COLUMN deposits_count TYPE bigint,
                                ALTER COLUMN withdrawals_count TYPE bigint, ALTER COLUMN rejected_count TYPE bigint;
                        END IF;
                    END $$
                    """)
        ],
        applyBatch: { events, context in
            // One row per event that counts; PostgreSQL groups them by day.
            var at: [Date] = [], depositTotals: [Int64] = [], depositCounts: [Int32] = []
            var withdrawalTotals: [Int64] = [], withdrawalCounts: [Int32] = [], rejectedCounts: [Int32] = []
            func add(_ event: ProjectedEvent, deposit: Int64 = 0, deposits: Int32 = 0, withdrawal: Int64 = 0, withdrawals: Int32 = 0, rejected: Int32 = 0) {
                at.append(event.recorded.occurredAt)
                depositTotals.append(deposit)
                depositCounts.append(deposits)
                withdrawalTotals.append(withdrawal)
                withdrawalCounts.append(withdrawals)
                rejectedCounts.append(rejected)
            }
            for event in events {
                switch event.event {
                case let opened as AccountOpened where opened.initialDeposit > 0: add(event, deposit: opened.initialDeposit, deposits: 1)
                case let deposited as MoneyDeposited: add(event, deposit: deposited.amount, deposits: 1)
                case let withdrawn as MoneyWithdrawn: add(event, withdrawal: withdrawn.amount, withdrawals: 1)
                case is WithdrawalRejected: add(event, rejected: 1)
                default: break
                }
            }
            guard !at.isEmpty else { return }
            let table = context.table("daily_volume")
            try await context.connection.execute(
                "INSERT INTO \(table) AS t (day, deposits_total, deposits_count, withdrawals_total, withdrawals_count, rejected_count) "
                    + "SELECT (at AT TIME ZONE 'UTC')::date, sum(dt::numeric), sum(dc), sum(wt::numeric), sum(wc), sum(rc) "
                    + "FROM unnest($1::timestamptz[], $2::bigint[], $3::int[], $4::bigint[], $5::int[], $6::int[]) AS u(at, dt, dc, wt, wc, rc) "
                    + "GROUP BY 1 ON CONFLICT (day) DO UPDATE SET "
                    + "deposits_total = t.deposits_total + EXCLUDED.deposits_total, deposits_count = t.deposits_count + EXCLUDED.deposits_count, "
                    + "withdrawals_total = t.withdrawals_total + EXCLUDED.withdrawals_total, "
                    + "withdrawals_count = t.withdrawals_count + EXCLUDED.withdrawals_count, "
                    + "rejected_count = t.rejected_count + EXCLUDED.rejected_count",
                [.timestampArray(at), .int64Array(depositTotals), .int32Array(depositCounts), .int64Array(withdrawalTotals),
                 .int32Array(withdrawalCounts), .int32Array(rejectedCounts)],
                statement: "daily volume")
        })

    public static let all = [balances, dailyVolume]
}

/// A batch of bank events folded per account: what `account_balances` must change.
struct BalanceChanges {
    struct Change {
        /// Set when the batch opens the account (a new row); `nil` when it changes an existing one.
        var owner: String?
        /// The initial deposit plus deposits minus withdrawals in the batch.
        var delta: Int64 = 0
        var version: Int64 = 0
        var at = Date(timeIntervalSince1970: 0)
    }

    /// Accounts in first-seen order.
    private(set) var accounts: [String] = []
    private(set) var byAccount: [String: Change] = [:]

    /// - Throws: ``BalanceOutOfRange`` when the batch's amounts do not fit in `Int64`.
    init(_ events: [ProjectedEvent]) throws {
        for event in events {
            let amount: Int64
            var owner: String?
            switch event.event {
            case let opened as AccountOpened:
                amount = opened.initialDeposit
                owner = opened.owner
            case let deposited as MoneyDeposited: amount = deposited.amount
            case let withdrawn as MoneyWithdrawn:
                // Negated with a check: a hostile record could carry Int64.min.
                let negated = Int64(0).subtractingReportingOverflow(withdrawn.amount)
                guard !negated.overflow else {
                    throw BalanceOutOfRange(owner: event.recorded.streamID, balance: 0, change: "a withdrawal of \(withdrawn.amount)")
                }
                amount = negated.partialValue
            case is WithdrawalRejected: amount = 0
            default: continue
            }
            let id = event.recorded.streamID
            if byAccount[id] == nil { accounts.append(id) }
            var change = byAccount[id] ?? Change()
            if let owner { change.owner = owner }
            let sum = change.delta.addingReportingOverflow(amount)
            guard !sum.overflow else {
                throw BalanceOutOfRange(owner: change.owner ?? id, balance: change.delta, change: "\(amount) in one batch of events")
            }
            change.delta = sum.partialValue
            change.version = max(change.version, event.recorded.streamVersion)
            change.at = event.recorded.occurredAt
            byAccount[id] = change
        }
    }
}
