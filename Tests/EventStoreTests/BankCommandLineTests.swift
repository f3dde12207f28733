import Foundation
import TestSupport
import Testing

@Suite("bank and eventoutbox executables (real PostgreSQL)")
struct BankCommandLineTests {
    @Test("open, deposit, withdraw (rejected too), balance at a past version, history, stream show")
    func endToEnd() async throws {
        let schema = try await TestSchema.create("cli")
        let env = ["EVENTOUTBOX_DATABASE_URL": schema.url]
        let missing = try await Tools.run("bank", ["open", "--owner", "Kim"], environment: env)
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("eventoutbox migrate"))

        #expect(try await Tools.run("eventoutbox", ["migrate"], environment: env).stdout.contains("applied migrations 1"))
        #expect(try await Tools.run("eventoutbox", ["migrate"], environment: env).stdout.contains("up to date"))

        let open = try await Tools.run("bank", ["open", "--owner", "Kim \"the saver\"", "--initial", "10000"], environment: env)
        #expect(open.status == 0, "\(open.stderr)")
        let id = open.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(UUID(uuidString: id) != nil)

        let deposit = try await Tools.run("bank", ["deposit", id, "2500", "--description", "salary 💶"], environment: env)
        #expect(deposit.stdout.contains("balance 12500"))
        let withdraw = try await Tools.run("bank", ["withdraw", id, "500", "--json"], environment: env)
        let json = try JSONSerialization.jsonObject(with: Data(withdraw.stdout.utf8)) as? [String: Any]
        #expect(json?["balance"] as? Int == 12000)
        #expect(json?["accepted"] as? Bool == true)

        let rejected = try await Tools.run("bank", ["withdraw", id, "99999"], environment: env)
        #expect(rejected.status == 3)
        #expect(rejected.stdout.contains("insufficient funds"))

        let zero = try await Tools.run("bank", ["deposit", id, "0"], environment: env)
        #expect(zero.status == 1)
        #expect(zero.stderr.contains("must be positive"))

        #expect(try await Tools.run("bank", ["balance", id], environment: env).stdout.hasPrefix("12000"))
        #expect(try await Tools.run("bank", ["balance", id, "--version", "2"], environment: env).stdout.hasPrefix("12500"))
        #expect(try await Tools.run("bank", ["balance", id, "--at", "2001-01-01T00:00:00Z"], environment: env).status == 1)
        // A version or moment the account never had is an error, not the current balance.
        let noSuchVersion = try await Tools.run("bank", ["balance", id, "--version", "999999"], environment: env)
        #expect(noSuchVersion.status == 1)
        #expect(noSuchVersion.stderr.contains("there is no version 999999"))
        #expect(noSuchVersion.stdout.isEmpty)
        let future = try await Tools.run("bank", ["balance", id, "--at", "2999-01-01T00:00:00Z"], environment: env)
        #expect(future.status == 1)
        #expect(future.stderr.contains("in the future"))
        // Near the top of Int64: refused with a reason, no trap, nothing written.
        let rich = try await Tools.run("bank", ["open", "--owner", "Rich", "--initial", String(Int64.max - 1)], environment: env)
        let richID = rich.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let overflow = try await Tools.run("bank", ["deposit", richID, "2"], environment: env)
        #expect(overflow.status == 1, "\(overflow.stderr)")
        #expect(overflow.stderr.contains("exceeds the largest balance"))
        #expect(try await Tools.run("bank", ["balance", richID], environment: env).stdout.hasPrefix(String(Int64.max - 1)))
        #expect(try await Tools.run("bank", ["balance", id, "--at", "yesterday"], environment: env).status != 0)

        let history = try await Tools.run("bank", ["history", id], environment: env)
        let lines = history.stdout.split(separator: "\n")
        #expect(lines.count == 4)
        #expect(lines.last?.contains("WithdrawalRejected") == true)
        let historyJSON = try await Tools.run("bank", ["history", id, "--json"], environment: env)
        let envelopes = try JSONSerialization.jsonObject(with: Data(historyJSON.stdout.utf8)) as? [[String: Any]]
        #expect(envelopes?.map { $0["eventType"] as? String } == ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn", "WithdrawalRejected"])

        let show = try await Tools.run("eventoutbox", ["stream", "show", id], environment: env)
        #expect(show.stdout.split(separator: "\n").count == 4)
        #expect(show.stdout.contains("MoneyDeposited v2"))
        #expect(try await Tools.run("bank", ["balance", "nope"], environment: env).stderr.contains("no account"))
        for tool in ["bank", "eventoutbox", "kafka-mock-cluster"] {
            let help = try await Tools.run(tool, ["--help"])
            #expect(help.status == 0)
            #expect(help.stdout.contains("USAGE"))
        }
        try await schema.drop()
    }
}
