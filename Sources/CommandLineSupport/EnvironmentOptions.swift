import ArgumentParser
import Foundation

/// Options from the environment, the way operators give them (a Kubernetes `env:` list, a compose file).
///
/// Every option of every command can also be set as an environment variable: `EVENTOUTBOX_`, then the command
/// as typed and the option's long name, in capitals with `_` for `-`: `outbox-relay --batch-size 500` is
/// `EVENTOUTBOX_OUTBOX_RELAY_BATCH_SIZE=500`, `eventoutbox migrate --wal` is `EVENTOUTBOX_MIGRATE_WAL=true`
/// (the `eventoutbox` of `eventoutbox` and `eventoutbox-bench` is not repeated).
///
/// The project's own prefix keeps these apart from what a platform puts in a process's environment. Kubernetes,
/// for one, gives every pod `<SERVICE>_PORT=tcp://10.0.0.1:8080` and `<SERVICE>_SERVICE_HOST` for each Service
/// of its namespace: with the bare executable name as the prefix, a Service named `accounts-service` would
/// have set `accounts-service --port` to `tcp://…` and kept the service from starting. A flag takes `true`/`false` (or `1`/`0`, `yes`/`no`); a repeatable
/// option takes one value a line. The command line wins over the environment, the environment over the
/// defaults. The variables the commands share (`EVENTOUTBOX_DATABASE_URL`, `KAFKA_BROKERS`,
/// `EVENTOUTBOX_LOG_FORMAT`, `EVENTOUTBOX_KAFKA_PROPERTIES_FILE`) keep working beside these.
///
/// ArgumentParser stays the one parser (its help, its validation, its errors): the environment's values are
/// turned into the options they stand for before it parses. That is why swift-configuration is not used here:
/// it would be a second parser beside the one every command already has.
public enum EnvironmentOptions {
    /// What the environment adds to a command line, and from which variables.
    public struct Resolution: Sendable {
        /// The command line to parse: the given one with the environment's options added.
        public var arguments: [String]
        /// Each variable used, with the option it became.
        public var used: [(variable: String, option: String)]
        /// Variables with the command's prefix that name none of its options (a typo, or an option of another
        /// command).
        public var unknown: [String]
        /// Variables whose value the option cannot take (a flag that is neither true nor false).
        public var problems: [String]
    }

    /// The environment variable of a command path (root first) and an option's long name.
    public static func variable(commandPath: [String], option: String) -> String {
        prefix(commandPath) + name(option)
    }

    /// Adds to `arguments` (the command line without the executable) the options that `environment` sets
    /// and the command line does not, for the (sub)command the arguments select.
    public static func resolve(
        _ command: any ParsableCommand.Type, arguments: [String], environment: [String: String]
    ) -> Resolution {
        var resolution = Resolution(arguments: arguments, used: [], unknown: [], problems: [])
        guard let tree = try? JSONDecoder().decode(Dump.self, from: Data(command._dumpHelp().utf8)).command else {
            return resolution
        }
        let terminator = arguments.firstIndex(of: "--") ?? arguments.endIndex
        let given = arguments[..<terminator]
        // The subcommand path: names of subcommands, in order, as they appear.
        var node = tree
        var path = [tree.commandName]
        for token in given where !token.hasPrefix("-") {
            guard let sub = node.subcommands?.first(where: { $0.commandName == token || ($0.aliases ?? []).contains(token) }) else {
                continue
            }
            node = sub
            path.append(sub.commandName)
        }
        let prefix = prefix(path)
        var added: [String] = []
        var known: Set<String> = []
        for argument in node.arguments ?? [] where argument.kind != "positional" {
            let longs = (argument.names ?? []).filter { $0.kind == "long" }.map(\.name)
            guard let long = argument.preferredName.flatMap({ $0.kind == "long" ? $0.name : nil }) ?? longs.first,
                !builtIns.contains(long)
            else { continue }
            let variable = prefix + name(long)
            known.insert(variable)
            guard let value = environment[variable] else { continue }
            let spellings = (argument.names ?? []).map { ($0.kind == "short" ? "-" : "--") + $0.name }
            let onCommandLine = given.contains { token in
                spellings.contains { token == $0 || token.hasPrefix($0 + "=") }
                    || longs.contains { token == "--no-" + $0 }
            }
            if onCommandLine { continue }
            if argument.kind == "flag" {
                switch value.lowercased() {
                case "1", "true", "yes", "on": added.append("--" + long)
                case "0", "false", "no", "off", "": break
                default:
                    resolution.problems.append("\(variable) is a flag: set it to true or false, not '\(value)'")
                    continue
                }
            } else if argument.isRepeating == true {
                for line in value.split(whereSeparator: \.isNewline) where !line.isEmpty {
                    added.append("--\(long)=\(line)")
                }
            } else {
                added.append("--\(long)=\(value)")
            }
            resolution.used.append((variable, "--" + long))
        }
        // ArgumentParser lists a `help` subcommand under every command.
        if (node.subcommands ?? []).allSatisfy({ $0.commandName == "help" }) {
            resolution.unknown = environment.keys.filter { $0.hasPrefix(prefix) && !known.contains($0) && !shared.contains($0) }.sorted()
        }
        resolution.arguments = Array(arguments[..<terminator]) + added + Array(arguments[terminator...])
        return resolution
    }

    /// Options every command has from ArgumentParser itself.
    private static let builtIns: Set<String> = ["help", "version", "experimental-dump-help", "generate-completion-script"]
    /// Variables shared by several commands, read by the options themselves.
    private static let shared: Set<String> = [
        "EVENTOUTBOX_DATABASE_URL", "EVENTOUTBOX_LOG_FORMAT", "EVENTOUTBOX_KAFKA_PROPERTIES_FILE", "EVENTOUTBOX_BIN_DIR",
    ]

    private static func prefix(_ path: [String]) -> String {
        var parts = path
        if parts.first == "eventoutbox" {
            parts.removeFirst()
        } else if let root = parts.first, root.hasPrefix("eventoutbox-") {
            parts[0] = String(root.dropFirst("eventoutbox-".count))
        }
        return (["EVENTOUTBOX"] + parts.map(name)).joined(separator: "_") + "_"
    }

    private static func name(_ text: String) -> String {
        String(text.uppercased().map { $0.isLetter || $0.isNumber ? $0 : "_" })
    }

    /// The part of ArgumentParser's `--experimental-dump-help` JSON read here.
    private struct Dump: Decodable {
        struct Command: Decodable {
            var commandName: String
            var aliases: [String]?
            var subcommands: [Command]?
            var arguments: [Argument]?
        }
        struct Argument: Decodable {
            var kind: String
            var names: [Name]?
            var preferredName: Name?
            var isRepeating: Bool?
        }
        struct Name: Decodable {
            var kind: String
            var name: String
        }
        var command: Command
    }
}

extension AsyncParsableCommand {
    /// The entry point of the project's commands: ArgumentParser's `main()`, with options also taken from the
    /// environment (see ``EnvironmentOptions``). A value from the environment that the command refuses is
    /// reported with the variable it came from.
    public static func mainReadingEnvironment() async {
        let given = Array(CommandLine.arguments.dropFirst())
        let resolution = EnvironmentOptions.resolve(self, arguments: given, environment: ProcessInfo.processInfo.environment)
        for problem in resolution.problems {
            FileHandle.standardError.write(Data("error: \(problem)\n".utf8))
        }
        if !resolution.problems.isEmpty { Foundation.exit(64) }
        for variable in resolution.unknown {
            FileHandle.standardError.write(Data("warning: \(variable) names no option of this command; it is ignored\n".utf8))
        }
        do {
            var command = try parseAsRoot(resolution.arguments)
            if var command = command as? any AsyncParsableCommand {
                try await command.run()
            } else {
                try command.run()
            }
        } catch {
            let code = exitCode(for: error)
            let message = fullMessage(for: error)
            guard !resolution.used.isEmpty, code != .success, !message.isEmpty else { exit(withError: error) }
            let from = resolution.used.map { "\($0.option) from \($0.variable)" }.joined(separator: ", ")
            FileHandle.standardError.write(Data("\(message)\nnote: options from the environment: \(from)\n".utf8))
            Foundation.exit(code.rawValue)
        }
    }
}

extension EnvironmentOptions {
    /// The paragraph each command's `--help` ends with; `command` is a command path, root first, that has
    /// `option`.
    public static func help(_ command: String, example option: String, _ value: String) -> String {
        let example = variable(commandPath: command.split(separator: " ").map(String.init), option: option)
        return """
            Every option can also come from the environment: EVENTOUTBOX_, then the command and the option in \
            capitals with '_' for '-', as in \(example)=\(value). Flags take true or false, repeatable options \
            one value a line; the command line wins.
            """
    }
}
