import ArgumentParser
import CommandLineSupport
import Foundation
import TestSupport
import Testing

/// A command tree with every kind of option the mapping handles.
private struct SampleTool: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "sample-tool", subcommands: [Publish.self])

    struct Publish: ParsableCommand {
        @Option var batchSize: Int = 1
        @Option(name: [.short, .long]) var level: String = "info"
        @Flag var dryRun = false
        @Option(name: .customLong("kafka-property")) var kafkaProperties: [String] = []
        @Argument var target: String?
    }
}

@Suite("Options from the environment")
struct EnvironmentOptionsTests {
    private func resolve(_ arguments: [String], _ environment: [String: String]) -> EnvironmentOptions.Resolution {
        EnvironmentOptions.resolve(SampleTool.self, arguments: arguments, environment: environment)
    }

    private func parsed(_ arguments: [String]) throws -> SampleTool.Publish {
        try #require(try SampleTool.parseAsRoot(arguments) as? SampleTool.Publish)
    }

    @Test("a variable named after the command path and the option becomes that option")
    func optionFromEnvironment() throws {
        let resolution = resolve(["publish", "orders"], ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_BATCH_SIZE": "500", "EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_LEVEL": "debug"])
        #expect(resolution.used.map(\.variable) == ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_BATCH_SIZE", "EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_LEVEL"])
        #expect(resolution.unknown.isEmpty && resolution.problems.isEmpty)
        let command = try parsed(resolution.arguments)
        #expect(command.batchSize == 500 && command.level == "debug" && command.target == "orders")
        #expect(EnvironmentOptions.variable(commandPath: ["sample-tool", "publish"], option: "batch-size") == "EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_BATCH_SIZE")
    }

    @Test("the command line wins over the environment, in any of its spellings")
    func commandLineWins() throws {
        let environment = ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_BATCH_SIZE": "500", "EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_LEVEL": "debug"]
        for arguments in [["publish", "--batch-size", "7", "-l", "warning"], ["publish", "--batch-size=7", "--level=warning"]] {
            let resolution = resolve(arguments, environment)
            #expect(resolution.arguments == arguments && resolution.used.isEmpty, "\(arguments)")
            let command = try parsed(resolution.arguments)
            #expect(command.batchSize == 7 && command.level == "warning")
        }
    }

    @Test("flags take true or false; anything else is a problem named with its variable")
    func flags() throws {
        for (value, set) in [("true", true), ("1", true), ("YES", true), ("false", false), ("0", false), ("", false)] {
            let resolution = resolve(["publish"], ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_DRY_RUN": value])
            #expect(resolution.problems.isEmpty)
            #expect(try parsed(resolution.arguments).dryRun == set, "'\(value)'")
        }
        let bad = resolve(["publish"], ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_DRY_RUN": "maybe"])
        #expect(bad.problems == ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_DRY_RUN is a flag: set it to true or false, not 'maybe'"])
    }

    @Test("a repeatable option takes one value a line; a value may hold '=' and ','")
    func repeatable() throws {
        let resolution = resolve(["publish"], ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_KAFKA_PROPERTY": "linger.ms=5\nbootstrap.servers=a:1,b:2\n"])
        #expect(try parsed(resolution.arguments).kafkaProperties == ["linger.ms=5", "bootstrap.servers=a:1,b:2"])
    }

    @Test("a misspelt variable is reported, not silently ignored; other commands' variables are left alone")
    func unknownVariables() {
        let resolution = resolve(
            ["publish"], ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_BATCHSIZE": "5", "OTHER_TOOL_BATCH_SIZE": "5", "SAMPLE_TOOL_PUBLISH_BATCH_SIZE": "5", "PATH": "/bin"])
        #expect(resolution.unknown == ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_BATCHSIZE"])
        #expect(resolution.arguments == ["publish"])
    }

    @Test("what Kubernetes puts in every pod for a Service named like the command is not taken for options")
    func kubernetesServiceLinks() throws {
        // A Service named `sample-tool` in the pod's namespace (enableServiceLinks, on by default).
        let links = [
            "SAMPLE_TOOL_PORT": "tcp://10.96.0.7:8080", "SAMPLE_TOOL_SERVICE_HOST": "10.96.0.7", "SAMPLE_TOOL_SERVICE_PORT": "8080",
            "SAMPLE_TOOL_PORT_8080_TCP": "tcp://10.96.0.7:8080", "SAMPLE_TOOL_PUBLISH_PORT": "tcp://10.96.0.8:80",
        ]
        let resolution = resolve(["publish"], links)
        #expect(resolution.arguments == ["publish"] && resolution.used.isEmpty && resolution.unknown.isEmpty && resolution.problems.isEmpty)
    }

    @Test("options from the environment go before a '--' terminator, so they stay options")
    func terminator() throws {
        let resolution = resolve(["publish", "--", "-odd-target"], ["EVENTOUTBOX_SAMPLE_TOOL_PUBLISH_BATCH_SIZE": "3"])
        #expect(resolution.arguments == ["publish", "--batch-size=3", "--", "-odd-target"])
        let command = try parsed(resolution.arguments)
        #expect(command.batchSize == 3 && command.target == "-odd-target")
    }

    @Test("every shipped executable reads its options from the environment, and says which variable a refused value came from")
    func executables() async throws {
        let cases: [(tool: String, arguments: [String], environment: [String: String], reason: String)] = [
            ("outbox-relay", [], ["EVENTOUTBOX_OUTBOX_RELAY_BATCH_SIZE": "0"], "--batch-size"),
            ("outbox-relay", [], ["EVENTOUTBOX_OUTBOX_RELAY_DELIVERY": "twice"], "'exactly-once' or 'at-least-once'"),
            ("account-projector", [], ["EVENTOUTBOX_ACCOUNT_PROJECTOR_COMMIT_INTERVAL": "nan"], "--commit-interval"),
            ("accounts-service", [], ["EVENTOUTBOX_ACCOUNTS_SERVICE_PORT": "70000", "EVENTOUTBOX_ACCOUNTS_SERVICE_INSECURE_NO_AUTH": "true"], "--port"),
            ("bank", ["balance", "00000000-0000-0000-0000-000000000000"], ["EVENTOUTBOX_BANK_BALANCE_AT_VERSION": "x"], "x"),
            ("eventoutbox", ["migrate"], ["EVENTOUTBOX_MIGRATE_WAL": "maybe"], "EVENTOUTBOX_MIGRATE_WAL is a flag"),
            ("eventoutbox-bench", ["drain"], ["EVENTOUTBOX_BENCH_DRAIN_EVENTS": "many"], "many"),
        ]
        for (tool, arguments, environment, reason) in cases {
            let run = try await Tools.run(tool, arguments, environment: environment, timeout: .seconds(60))
            let shown = "\(environment) \(tool) \(arguments.joined(separator: " "))"
            #expect(run.status == 64 && !run.timedOut, "\(shown): exit \(run.status), \(run.stderr.suffix(300))")
            #expect(run.stderr.contains(reason), "\(shown): '\(reason)' not in \(run.stderr.suffix(300))")
            let variable = environment.keys.sorted().last(where: { !$0.hasSuffix("INSECURE_NO_AUTH") }) ?? ""
            #expect(run.stderr.contains(variable), "\(shown): the variable is not named in \(run.stderr.suffix(300))")
        }

        // The command line wins: the environment's bad batch size is never used.
        let overridden = try await Tools.run(
            "outbox-relay", ["--batch-size", "5", "--source", "kafka"], environment: ["EVENTOUTBOX_OUTBOX_RELAY_BATCH_SIZE": "0"], timeout: .seconds(60))
        #expect(overridden.status == 64 && overridden.stderr.contains("--source") && !overridden.stderr.contains("--batch-size"), "\(overridden.stderr)")

        // A misspelt variable is warned about.
        let misspelt = try await Tools.run(
            "outbox-relay", ["--source", "kafka"], environment: ["EVENTOUTBOX_OUTBOX_RELAY_BATCHSIZE": "5"], timeout: .seconds(60))
        #expect(misspelt.stderr.contains("warning: EVENTOUTBOX_OUTBOX_RELAY_BATCHSIZE names no option"), "\(misspelt.stderr)")

        // A whole run configured by the environment alone: a secret file and a subject give a token.
        let secret = FileManager.default.temporaryDirectory.appendingPathComponent("jwt-\(UUID().uuidString).secret")
        try Data(String(repeating: "k", count: 40).utf8).write(to: secret)
        defer { try? FileManager.default.removeItem(at: secret) }
        let minted = try await Tools.run(
            "accounts-service", [],
            environment: ["EVENTOUTBOX_ACCOUNTS_SERVICE_JWT_SECRET_FILE": secret.path, "EVENTOUTBOX_ACCOUNTS_SERVICE_MINT_TOKEN": "kim"], timeout: .seconds(60))
        #expect(minted.status == 0, "\(minted.stderr)")
        #expect(minted.stdout.split(separator: ".").count == 3, "a JWT: \(minted.stdout)")
    }
}
