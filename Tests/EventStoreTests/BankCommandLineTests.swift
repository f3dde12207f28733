import EventSourcing
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import LibPQ
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

        let dryRun = try await Tools.run("eventoutbox", ["migrate", "--dry-run"], environment: env).stdout
        #expect(dryRun.contains("missing: event-store 1 (events, outbox, snapshots)"), "\(dryRun)")
        let migrated = try await Tools.run("eventoutbox", ["migrate"], environment: env).stdout
        #expect(migrated.contains("applied migration event-store 1"), "\(migrated)")
        #expect(migrated.contains("applied migration outbox-relay 2"), "\(migrated)")
        #expect(try await Tools.run("eventoutbox", ["migrate", "--dry-run"], environment: env).stdout.contains("up to date"))
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
        #expect(try await Tools.run("bank", ["balance", id, "--at-version", "2"], environment: env).stdout.hasPrefix("12500"))
        #expect(try await Tools.run("bank", ["balance", id, "--at", "2001-01-01T00:00:00Z"], environment: env).status == 1)
        // A version or moment the account never had is an error, not the current balance.
        let noSuchVersion = try await Tools.run("bank", ["balance", id, "--at-version", "999999"], environment: env)
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

    @Test("every executable prints the toolkit's version (one place in the code) and exits 0")
    func versions() async throws {
        for tool in ["bank", "eventoutbox", "outbox-relay", "account-projector", "accounts-service", "eventoutbox-bench", "kafka-mock-cluster"] {
            let run = try await Tools.run(tool, ["--version"])
            #expect(run.status == 0 && run.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == EventOutboxVersion.current, "\(tool): \(run.stdout) \(run.stderr)")
        }
    }

    @Test("bad input of every kind a user can type: non-zero exit, the reason first on stderr, nothing written, no secret printed")
    func badInput() async throws {
        let schema = try await TestSchema.create("cli")
        let env = ["EVENTOUTBOX_DATABASE_URL": schema.url]
        #expect(try await Tools.run("eventoutbox", ["migrate"], environment: env).status == 0)
        let id = try await Tools.run("bank", ["open", "--owner", "Sweep", "--initial", "100"], environment: env)
            .stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        func events() async throws -> Int {
            let connection = try await PQConnection.connect(to: schema.url)
            let count = try await connection.query("SELECT count(*) FROM events").first!.decode(Int.self, at: 0)
            await connection.close()
            return count
        }
        let cases: [(tool: String, arguments: [String], reason: String)] = [
            ("bank", ["deposit", id, "0"], "must be positive"),
            // A leading "-" reads as an option: the reason is the missing amount ("--" passes it as a value).
            ("bank", ["deposit", id, "-5"], "Missing expected argument '<amount>'"),
            ("bank", ["deposit", id, "--", "-5"], "must be positive"),
            ("bank", ["deposit", id, "ten"], "ten"),
            ("bank", ["deposit", id, "1.5"], "1.5"),
            ("bank", ["deposit", id, "99999999999999999999"], "99999999999999999999"),
            ("bank", ["withdraw", id, "0"], "must be positive"),
            ("bank", ["deposit", "no-such-account", "5"], "no account"),
            ("bank", ["deposit", "'; DROP TABLE events; --", "5"], "no account"),
            ("bank", ["deposit", String(repeating: "x", count: 50_000), "5"], "no account"),
            ("bank", ["open", "--owner", "   "], "owner must not be empty"),
            ("bank", ["open", "--owner", "X", "--initial", "-1"], "must not be negative"),
            ("bank", ["open"], "--owner"),
            ("bank", ["balance", id, "--at-version", "0"], "must be 1 or more"),
            ("bank", ["balance", id, "--at-version", "x"], "x"),
            ("bank", ["balance", id, "--at", "2026-13-45"], "2026-13-45"),
            ("bank", ["history", "nope"], "no account"),
            ("bank", ["frobnicate"], "frobnicate"),
            ("eventoutbox", ["dead-letters", "retry", "abc"], "abc"),
            ("eventoutbox", ["dead-letters", "retry", "424242"], "no dead letter"),
            ("eventoutbox", ["stream", "show"], "stream"),
            ("account-projector", ["--rebuild", "nope"], "unknown projection"),
            ("account-projector", ["--retry-dead-letter", "x"], "x"),
            ("outbox-relay", ["--source", "kafka"], "source"),
            ("outbox-relay", ["--delivery", "twice"], "'exactly-once' or 'at-least-once'"),
            ("outbox-relay", ["--transactional-id", "x"], "apply to --delivery exactly-once"),
            ("outbox-relay", ["--delivery", "exactly-once", "--transaction-timeout", "0"], "--transaction-timeout"),
            ("outbox-relay", ["--delivery", "exactly-once", "--transaction-timeout", "nan"], "--transaction-timeout"),
            ("outbox-relay", ["--delivery", "exactly-once", "--progress-topic", "bad topic"], "--progress-topic"),
            ("accounts-service", ["--port", "70000"], "--port"),
            // Numbers that used to trap (SIGILL) or run on with a value no one meant: exit 64, the option named.
            ("outbox-relay", ["--poll-interval", "inf"], "--poll-interval must be a number of seconds"),
            ("outbox-relay", ["--shutdown-timeout", "1e300"], "--shutdown-timeout"),
            ("outbox-relay", ["--housekeeping-interval", "1e17"], "--housekeeping-interval"),
            ("outbox-relay", ["--standby-interval", "nan"], "--standby-interval"),
            ("outbox-relay", ["--metrics-port", "99999"], "--metrics-port must be from 0 to 65535, not 99999"),
            ("outbox-relay", ["--retention=-5"], "--retention"),
            ("outbox-relay", ["--batch-size", "0"], "--batch-size"),
            ("outbox-relay", ["--partitions", "4", "--lock-key", String(Int64.max - 1)], "--lock-key"),
            ("account-projector", ["--commit-interval", "nan"], "--commit-interval"),
            ("account-projector", ["--commit-interval", "1e300"], "--commit-interval"),
            ("account-projector", ["--metrics-port=-1"], "--metrics-port"),
            ("accounts-service", ["--metrics-port", "65536"], "--metrics-port"),
            ("accounts-service", ["--max-connections", "0"], "--max-connections"),
            ("accounts-service", ["--insecure-no-auth", "--aggregate-cache-size", "1"], "--aggregate-cache-size must be 0 (no cache) or from 2"),
            ("accounts-service", ["--insecure-no-auth", "--aggregate-cache-size=-5"], "--aggregate-cache-size"),
            ("accounts-service", ["--port", "0"], "--jwt-secret-file PATH (bearer tokens) or --insecure-no-auth"),
            ("accounts-service", ["--insecure-no-auth", "--mint-token", "kim"], "--mint-token needs --jwt-secret-file"),
            ("accounts-service", ["--jwt-secret-file", "/nonexistent/secret"], "cannot read the JWT secret file"),
            // Client properties librdkafka refuses: the relay ends at start (it used to retry forever, ready).
            ("outbox-relay", ["--kafka-property", "bogus.prop=1"], "bogus.prop"),
            ("outbox-relay", ["--kafka-property", "security.protocol=carrier-pigeon"], "security.protocol"),
            ("outbox-relay", ["--delivery", "exactly-once", "--kafka-property", "bogus.prop=1"], "bogus.prop"),
            ("account-projector", ["--kafka-property", "bogus.prop=1"], "bogus.prop"),
            ("outbox-relay", ["--format", "avro"], "--format is 'envelope' or 'cloudevents'"),
            ("outbox-relay", ["--cloudevents-source", "/x"], "--cloudevents-source applies to --format cloudevents"),
            ("outbox-relay", ["--format", "cloudevents", "--cloudevents-source", "a b"], "--cloudevents-source must be"),
            // A group without its subcommand is a usage error (it used to print help and exit 0).
            ("bank", [], "a subcommand is needed"),
            ("eventoutbox", [], "a subcommand is needed"),
            ("eventoutbox", ["wal"], "a subcommand is needed"),
            ("eventoutbox", ["dead-letters"], "a subcommand is needed"),
        ]
        for (tool, arguments, reason) in cases {
            let run = try await Tools.run(tool, arguments, environment: env, timeout: .seconds(60))
            let shown = "\(tool) \(arguments.joined(separator: " ").prefix(80))"
            #expect(!run.timedOut, "\(shown) was still running after 60 s")
            #expect(run.status != 0, "\(shown) exited 0")
            if reason.hasPrefix("--") || reason == "a subcommand is needed" {
                #expect(run.status == 64, "\(shown): a usage error exits 64, not \(run.status)")
            }
            let first = run.stderr.split(separator: "\n").first.map(String.init) ?? ""
            #expect(first.lowercased().hasPrefix("error"), "\(shown): first line of stderr is '\(first.prefix(200))'")
            #expect(run.stderr.contains(reason), "\(shown): '\(reason)' not in \(run.stderr.prefix(300))")
        }
        #expect(try await events() == 1, "nothing written by the refused commands")

        let secret = "s3cr3t-Pa55"
        // Kafka properties from a file (secrets stay off the command line): read, checked, never echoed.
        let properties = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("kafka") + ".properties")
        for (content, reason) in [
            ("# a comment\nlinger.ms = 5\nsasl.pasword = \(secret)\n", "sasl.pasword"),
            ("linger.ms=5\nnot a property\n", "line 2 of the Kafka properties file"),
        ] {
            try Data(content.utf8).write(to: properties)
            for tool in ["outbox-relay", "account-projector"] {
                let run = try await Tools.run(tool, ["--kafka-properties-file", properties.path], environment: env, timeout: .seconds(60))
                #expect(run.status != 0 && !run.timedOut, "\(tool)")
                #expect(run.stderr.contains(reason), "\(tool): \(run.stderr.suffix(300))")
                #expect(!run.stderr.contains(secret) && !run.stdout.contains(secret), "\(tool) printed a secret from the properties file")
            }
        }
        try? FileManager.default.removeItem(at: properties)

        // A port in use: the option and the port named, before anything starts (no "serving" line first).
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(bound == 0 && listen(listener, 1) == 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        let taken = String(UInt16(bigEndian: address.sin_port))
        for (tool, arguments, option) in [
            ("accounts-service", ["--insecure-no-auth", "--port", taken], "--port"),
            ("accounts-service", ["--insecure-no-auth", "--port", "0", "--metrics-port", taken], "--metrics-port"),
            ("outbox-relay", ["--metrics-port", taken], "--metrics-port"),
            ("account-projector", ["--metrics-port", taken], "--metrics-port"),
        ] {
            let run = try await Tools.run(tool, arguments, environment: env, timeout: .seconds(30))
            #expect(run.status != 0 && !run.timedOut, "\(tool) \(option)")
            #expect(run.stderr.contains("cannot listen on 127.0.0.1:\(taken) (\(option)): the port is in use"), "\(tool): \(run.stderr.suffix(300))")
            #expect(!run.stderr.contains("serving the bank"), "\(tool) said it was serving")
        }
        close(listener)

        // Hostile and huge text is stored literally.
        let hostile = "Robert'); DROP TABLE events; -- \\ \" 🙂"
        let opened = try await Tools.run("bank", ["open", "--owner", hostile], environment: env)
        #expect(opened.status == 0, "\(opened.stderr)")
        let hostileID = opened.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let history = try await Tools.run("bank", ["history", hostileID, "--json"], environment: env)
        let owner = (try JSONSerialization.jsonObject(with: Data(history.stdout.utf8)) as? [[String: Any]])?.first
            .flatMap { $0["payload"] as? [String: Any] }?["owner"] as? String
        #expect(owner == hostile)
        // Escape sequences in stored text are shown escaped, never sent to the terminal raw.
        let escaping = "Eve\u{1B}]0;owned\u{07}\u{1B}[2J\u{9B}31m"
        let eve = try await Tools.run("bank", ["open", "--owner", escaping, "--initial", "1"], environment: env)
        let eveID = eve.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        _ = try await Tools.run("bank", ["deposit", eveID, "1", "--description", "\u{1B}[1A\r"], environment: env)
        for arguments in [["balance", eveID], ["history", eveID]] {
            let shown = try await Tools.run("bank", arguments, environment: env)
            #expect(shown.status == 0)
            #expect(!shown.stdout.unicodeScalars.contains { $0.value == 0x1B || $0.value == 0x07 || $0.value == 0x9B || $0.value == 0x0D },
                    "bank \(arguments[0]) printed a control character")
            #expect(shown.stdout.contains("\\u{1B}"), "bank \(arguments[0]): \(shown.stdout)")
        }
        let long = String(repeating: "é", count: 60_000)
        #expect(try await Tools.run("bank", ["open", "--owner", long], environment: env).status == 0)

        // An unreachable database: the reason, never the password, in every spelling libpq takes.
        let spellings = [
            "postgresql://app:\(secret)@127.0.0.1:1/app?connect_timeout=2",
            "host=127.0.0.1 port=1 connect_timeout=2 password = \(secret)",
            "host=127.0.0.1 port=1 connect_timeout=2 password= \(secret)",
            "postgresql://app@127.0.0.1:1/app?passwor%64=\(secret)&connect_timeout=2",
            "postgresql://app@127.0.0.1:1/app?%70assword=\(secret)&connect_timeout=2",
        ]
        for url in spellings {
            let unreachable = ["EVENTOUTBOX_DATABASE_URL": url]
            for (tool, arguments) in [("bank", ["balance", id]), ("eventoutbox", ["migrate"]), ("eventoutbox", ["outbox", "status"])] {
                let run = try await Tools.run(tool, arguments, environment: unreachable)
                #expect(run.status != 0)
                #expect(run.stderr.lowercased().hasPrefix("error"), "\(tool): \(run.stderr.prefix(200))")
                #expect(!run.stderr.contains(secret) && !run.stdout.contains(secret), "\(tool) printed the password of \(url)")
            }
            // The long-running ones log the failure (the relay retries until stopped; the others end).
            for (tool, arguments) in [("outbox-relay", ["--standby-interval", "0.2"]), ("account-projector", []), ("accounts-service", ["--insecure-no-auth", "--port", "0"])] {
                let run = try await Tools.run(tool, arguments, environment: unreachable, timeout: .seconds(4))
                #expect(run.stderr.contains("127.0.0.1"), "\(tool) says what it could not reach: \(run.stderr.prefix(300))")
                #expect(!run.stderr.contains(secret) && !run.stdout.contains(secret), "\(tool) printed the password of \(url)")
            }
        }
        try await schema.drop()
    }
}
