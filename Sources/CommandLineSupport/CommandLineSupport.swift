import ArgumentParser
import EventStore
import Foundation
import PostgresClient

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
    public func pool(maxConnections: Int = 2) throws -> PostgresPool {
        PostgresPool(url: try url(), maxConnections: maxConnections)
    }
}

/// `--brokers`, falling back to `KAFKA_BROKERS`.
public struct KafkaBrokersOption: ParsableArguments {
    @Option(help: "Kafka bootstrap servers, host:port[,host:port] (default: $KAFKA_BROKERS).")
    public var brokers: String?

    public init() {}

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
