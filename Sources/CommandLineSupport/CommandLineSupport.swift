import ArgumentParser
import EventStore
import Foundation
import LibPQ

/// `--database-url`, falling back to `EVENTOUTBOX_DATABASE_URL`.
public struct DatabaseOption: ParsableArguments {
    @Option(help: "PostgreSQL URL (default: $EVENTOUTBOX_DATABASE_URL).")
    public var databaseURL: String?

    public init() {}

    /// The URL to use. Throws a `ValidationError` saying how to give one when there is none.
    public func url() throws -> String {
        guard let url = databaseURL ?? ProcessInfo.processInfo.environment["EVENTOUTBOX_DATABASE_URL"], !url.isEmpty else {
            throw ValidationError("no database: pass --database-url or set EVENTOUTBOX_DATABASE_URL")
        }
        return url
    }

    /// A small pool on ``url()``.
    public func pool(maxConnections: Int = 2) throws -> PQPool {
        PQPool(url: try url(), maxConnections: maxConnections)
    }
}

/// `--brokers`, falling back to `KAFKA_BROKERS`.
public struct KafkaBrokersOption: ParsableArguments {
    @Option(help: "Kafka bootstrap servers, host:port[,host:port] (default: $KAFKA_BROKERS).")
    public var brokers: String?

    public init() {}

    @Option(help: ArgumentHelp(
        "A file of librdkafka properties, key=value lines (default: $EVENTOUTBOX_KAFKA_PROPERTIES_FILE): for secrets such as sasl.password, which a command line shows to `ps`. --kafka-property entries win over it.",
        valueName: "path"))
    public var kafkaPropertiesFile: String?

    /// The client properties of the properties file (if one is named), read in the Java `.properties` style
    /// that Kafka tools use: `key=value` lines (spaces around `=` ignored), `#` or `!` comments, blank lines.
    /// - Throws: `ValidationError` naming the file and line (never a value).
    public func fileProperties() throws -> [String: String] {
        guard let path = kafkaPropertiesFile ?? ProcessInfo.processInfo.environment["EVENTOUTBOX_KAFKA_PROPERTIES_FILE"], !path.isEmpty
        else { return [:] }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ValidationError("cannot read the Kafka properties file '\(path)'")
        }
        var properties: [String: String] = [:]
        for (number, rawLine) in String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.trimmingCharacters(in: .whitespacesAndNewlines)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix("!") { continue }
            guard let equals = line.firstIndex(of: "="), equals != line.startIndex else {
                throw ValidationError("line \(number + 1) of the Kafka properties file '\(path)' is not key=value")
            }
            properties[line[..<equals].trimmingCharacters(in: .whitespaces)] = line[line.index(after: equals)...].trimmingCharacters(in: .whitespaces)
        }
        return properties
    }

    public func bootstrapServers() throws -> String {
        guard let brokers = brokers ?? ProcessInfo.processInfo.environment["KAFKA_BROKERS"], !brokers.isEmpty else {
            throw ValidationError("no Kafka: pass --brokers or set KAFKA_BROKERS")
        }
        return brokers
    }
}

/// Runs a command's body; any failure other than a usage error becomes `error: ...` with advice on stderr and
/// exit status 1.
public func reportingFailures(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as ExitCode {
        throw error
    } catch let error as ValidationError {
        throw error
    } catch {
        FileHandle.standardError.write(Data(("error: " + OperatorAdvice.explain(error) + "\n").utf8))
        throw ExitCode.failure
    }
}

/// Checks of numeric options, so that a bad value ends the command at once with exit status 64 and a message
/// naming the option, the range and the value, instead of trapping later (a non-finite number of seconds
/// turned into a `Duration`) or running on with a value no one meant (a port above 65535, a negative retention).
public enum OptionCheck {
    /// A number of seconds: finite and within `range`.
    public static func seconds(_ value: Double, _ option: String, in range: ClosedRange<Double>) throws {
        guard value.isFinite, range.contains(value) else {
            throw ValidationError("\(option) must be a number of seconds from \(number(range.lowerBound)) to \(number(range.upperBound)), not \(value)")
        }
    }

    /// A whole number within `range`.
    public static func integer<T: BinaryInteger>(_ value: T, _ option: String, in range: ClosedRange<T>) throws {
        guard range.contains(value) else { throw ValidationError("\(option) must be from \(range.lowerBound) to \(range.upperBound), not \(value)") }
    }

    /// A TCP port (0: any free port, which the process then logs).
    public static func port(_ value: Int?, _ option: String) throws {
        if let value { try integer(value, option, in: 0...65_535) }
    }

    /// `Duration` from seconds already checked by ``seconds(_:_:in:)``.
    public static func duration(_ seconds: Double) -> Duration { .nanoseconds(Int64((seconds * 1e9).rounded())) }

    private static func number(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(value)
    }
}

/// A command that only groups subcommands: run without one, it prints its help to standard error and exits 64
/// (a usage error), so that a script that forgot the subcommand does not look successful.
public protocol SubcommandGroup: AsyncParsableCommand {}

extension SubcommandGroup {
    public func run() async throws {
        FileHandle.standardError.write(Data(("error: a subcommand is needed\n\n" + Self.helpMessage() + "\n").utf8))
        throw ExitCode(64)
    }
}

extension String {
    /// The text with control characters shown as `\u{1B}` and the like, for printing stored text (an owner's
    /// name, a description) to a terminal: an escape sequence in it must not move the cursor, recolour the
    /// screen or retitle the window.
    public var terminalSafe: String {
        var out = ""
        for scalar in unicodeScalars {
            let value = scalar.value
            if value < 0x20 || value == 0x7F || (0x80...0x9F).contains(value) {
                out += "\\u{\(String(value, radix: 16, uppercase: true))}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}
