import EventSourcing
import Foundation
import PostgresClient
import Projections

/// The bank's read models.
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
        ]
    ) { event, recorded, context in
        let table = context.table("account_balances")
        let common: [PostgresBind] = [.text(recorded.streamID), .int64(recorded.streamVersion), .timestamp(recorded.occurredAt)]
        switch event {
        case let opened as AccountOpened:
            try await context.connection.execute(
                "INSERT INTO \(table) (account_id, last_version, updated_at, owner, balance) VALUES ($1, $2, $3, $4, $5)",
                common + [.text(opened.owner), .int64(opened.initialDeposit)], statement: "balances: opened")
        case let deposited as MoneyDeposited:
            try await context.connection.execute(
                "UPDATE \(table) SET balance = balance + $4, last_version = GREATEST(last_version, $2), updated_at = $3 WHERE account_id = $1",
                common + [.int64(deposited.amount)], statement: "balances: deposited")
        case let withdrawn as MoneyWithdrawn:
            try await context.connection.execute(
                "UPDATE \(table) SET balance = balance - $4, last_version = GREATEST(last_version, $2), updated_at = $3 WHERE account_id = $1",
                common + [.int64(withdrawn.amount)], statement: "balances: withdrawn")
        case is WithdrawalRejected:
            try await context.connection.execute(
                "UPDATE \(table) SET last_version = GREATEST(last_version, $2), updated_at = $3 WHERE account_id = $1",
                common, statement: "balances: rejected")
        default:
            break
        }
    }

    /// `daily_volume`: per UTC day, deposits and withdrawals (totals and counts) and rejected withdrawals.
    public static let dailyVolume = Projection(
        name: "daily_volume",
        tables: [
            .init(
                name: "daily_volume",
                createSQL: """
                    CREATE TABLE {table} (
                        day                 date   PRIMARY KEY,
                        deposits_total      bigint NOT NULL DEFAULT 0,
                        deposits_count      int    NOT NULL DEFAULT 0,
                        withdrawals_total   bigint NOT NULL DEFAULT 0,
                        withdrawals_count   int    NOT NULL DEFAULT 0,
                        rejected_count      int    NOT NULL DEFAULT 0
                    )
                    """)
        ]
    ) { event, recorded, context in
        let column: (total: String?, count: String, amount: Int64)
        switch event {
        case let opened as AccountOpened where opened.initialDeposit > 0:
            column = ("deposits_total", "deposits_count", opened.initialDeposit)
        case let deposited as MoneyDeposited: column = ("deposits_total", "deposits_count", deposited.amount)
        case let withdrawn as MoneyWithdrawn: column = ("withdrawals_total", "withdrawals_count", withdrawn.amount)
        case is WithdrawalRejected: column = (nil, "rejected_count", 0)
        default: return
        }
        let table = context.table("daily_volume")
        let totalSet = column.total.map { ", \($0) = \(table).\($0) + $2" } ?? ""
        let totalInsert = column.total.map { ", \($0)" } ?? ""
        let totalValue = column.total == nil ? "" : ", $2"
        try await context.connection.execute(
            "INSERT INTO \(table) AS \(table) (day, \(column.count)\(totalInsert)) VALUES (($1::timestamptz AT TIME ZONE 'UTC')::date, 1\(totalValue)) "
                + "ON CONFLICT (day) DO UPDATE SET \(column.count) = \(table).\(column.count) + 1\(totalSet)",
            [.timestamp(recorded.occurredAt), .int64(column.amount)], statement: "daily volume")
    }

    public static let all = [balances, dailyVolume]
}
