import ArgumentParser
import BankAccount
import CommandLineSupport
import EventSourcing
import EventStore
import Foundation
import LibPQ

@main
struct BankCommand: SubcommandGroup {
    static func main() async { await mainReadingEnvironment() }

    static let configuration = CommandConfiguration(
        commandName: "bank",
        abstract: "The reference bank-account service: event-sourced accounts in PostgreSQL.",
        discussion: """
            Every command appends events (and their outbox rows, for Kafka) in one transaction. Amounts are \
            integers in minor units (cents). A withdrawal above the balance is recorded as WithdrawalRejected \
            and exits with status 3.

            The database comes from --database-url or EVENTOUTBOX_DATABASE_URL; create the tables once with \
            `eventoutbox migrate`.

            Example:
              id=$(bank open --owner Kim --initial 10000)
              bank deposit "$id" 2500 --description salary
              bank withdraw "$id" 99999          # rejected, recorded
              bank balance "$id" --at-version 2  # time travel
              bank history "$id"
            """ + "\n\n" + EnvironmentOptions.help("bank balance", example: "json", "true"),
        version: EventOutboxVersion.current,
        subcommands: [Open.self, Deposit.self, Withdraw.self, Balance.self, History.self]
    )
}

struct GlobalOptions: ParsableArguments {
    @OptionGroup var database: DatabaseOption

    @Flag(help: "Print machine-readable JSON.")
    var json = false

    func bank() throws -> Bank {
        Bank(store: EventStore(pool: try database.pool()))
    }

    func print<Value: Encodable>(json value: Value, text: String) throws {
        if json {
            Swift.print(String(decoding: try EventJSON.encoder.encode(value), as: UTF8.self))
        } else {
            Swift.print(text)
        }
    }
}

struct Open: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Open an account; prints its id.")
    @OptionGroup var options: GlobalOptions
    @Option(help: "The account owner's name.") var owner: String
    // Unconditional: "--initial -1" is a negative deposit to refuse with its reason, not a missing value.
    @Option(parsing: .unconditional, help: "Initial deposit in minor units.") var initial: Int64 = 0

    func run() async throws {
        try await reportingFailures {
            let id = try await options.bank().open(owner: owner, initialDeposit: initial, metadata: .cli)
            try options.print(json: ["accountId": id], text: id)
        }
    }
}

struct Deposit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Pay money in; prints the new balance.")
    @OptionGroup var options: GlobalOptions
    @Argument(help: "Account id.") var account: String
    @Argument(help: "Amount in minor units (> 0).") var amount: Int64
    @Option(help: "What the money is for.") var description: String = ""

    func run() async throws {
        try await reportingFailures {
            let balance = try await options.bank().deposit(account, amount: amount, description: description, metadata: .cli)
            try options.print(json: ["accountId": .string(account), "balance": JSONValue.integer(balance)], text: "balance \(balance)")
        }
    }
}

struct Withdraw: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pay money out; a withdrawal above the balance is recorded as rejected and exits with status 3.")
    @OptionGroup var options: GlobalOptions
    @Argument(help: "Account id.") var account: String
    @Argument(help: "Amount in minor units (> 0).") var amount: Int64
    @Option(help: "What the money is for.") var description: String = ""

    func run() async throws {
        var rejected = false
        try await reportingFailures {
            switch try await options.bank().withdraw(account, amount: amount, description: description, metadata: .cli) {
            case .accepted(let balance):
                try options.print(
                    json: ["accountId": .string(account), "accepted": .bool(true), "balance": JSONValue.integer(balance)],
                    text: "balance \(balance)")
            case .rejected(let reason, let balance):
                rejected = true
                try options.print(
                    json: ["accountId": .string(account), "accepted": .bool(false), "reason": .string(reason),
                           "balance": JSONValue.integer(balance)],
                    text: "rejected: \(reason) (recorded in the account's history)")
            }
        }
        if rejected { throw ExitCode(3) }
    }
}

struct Balance: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the balance, now or at a past moment (--at) or stream version (--at-version).")
    @OptionGroup var options: GlobalOptions
    @Argument(help: "Account id.") var account: String
    @Option(help: "A past moment, ISO 8601 (e.g. 2026-11-25T12:00:00Z).") var at: String?
    @Option(name: .customLong("at-version"), help: "A past stream version (1 = right after opening).") var version: Int64?

    func validate() throws {
        if at != nil && version != nil { throw ValidationError("give --at or --at-version, not both") }
        if let at, ISOTimestamp.parse(at) == nil {
            throw ValidationError("--at '\(at)' is not ISO 8601 (e.g. 2026-11-25T12:00:00Z)")
        }
        if let version, version < 1 { throw ValidationError("--at-version must be 1 or more") }
    }

    func run() async throws {
        try await reportingFailures {
            let state = try await options.bank().account(account, atVersion: version, asOf: at.flatMap(ISOTimestamp.parse))
            try options.print(
                json: ["accountId": .string(account), "owner": .string(state.state.owner),
                       "balance": .integer(state.state.balance), "version": JSONValue.integer(state.version)],
                text: "\(state.state.balance) (owner \(state.state.owner.terminalSafe), version \(state.version))")
        }
    }
}

struct History: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List every event of an account, rejected withdrawals included.")
    @OptionGroup var options: GlobalOptions
    @Argument(help: "Account id.") var account: String

    func run() async throws {
        try await reportingFailures {
            let history = try await options.bank().history(account)
            if options.json {
                let envelopes = try history.map { try OutboxEnvelope($0.recorded) }
                Swift.print(String(decoding: try EventJSON.encoder.encode(envelopes), as: UTF8.self))
                return
            }
            for (recorded, event) in history {
                let detail: String
                switch event {
                case let e as AccountOpened: detail = "owner \(e.owner), initial deposit \(e.initialDeposit)"
                case let e as MoneyDeposited: detail = "+\(e.amount)" + (e.description.isEmpty ? "" : " (\(e.description))")
                case let e as MoneyWithdrawn: detail = "-\(e.amount)" + (e.description.isEmpty ? "" : " (\(e.description))")
                case let e as WithdrawalRejected: detail = "\(e.amount) refused: \(e.reason)"
                default: detail = recorded.payload
                }
                Swift.print("\(recorded.streamVersion)\t\(ISOTimestamp.format(recorded.occurredAt))\t\(recorded.eventType.terminalSafe)\t\(detail.terminalSafe)")
            }
        }
    }
}

extension EventMetadata {
    /// Metadata of commands issued from this command line.
    static var cli: EventMetadata {
        EventMetadata(correlationID: UUID().uuidString.lowercased(), actor: "bank-cli:\(ProcessInfo.processInfo.userName)")
    }
}
