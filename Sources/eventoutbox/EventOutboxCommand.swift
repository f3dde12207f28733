import ArgumentParser
import EventSourcing
import EventStore
import Foundation
import PostgresClient

@main
struct EventOutboxCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eventoutbox",
        abstract: "Administer an EventOutbox event store: schema migrations and raw streams.",
        discussion: """
            The database comes from --database-url or EVENTOUTBOX_DATABASE_URL.

            Example:
              eventoutbox migrate
              eventoutbox stream show 3f2a...   # raw events of any stream
            """,
        subcommands: [Migrate.self, Stream.self]
    )
}

struct DatabaseOption: ParsableArguments {
    @Option(help: "PostgreSQL URL (default: $EVENTOUTBOX_DATABASE_URL).")
    var databaseURL: String?

    func pool() throws -> PostgresPool {
        guard let url = databaseURL ?? ProcessInfo.processInfo.environment["EVENTOUTBOX_DATABASE_URL"], !url.isEmpty else {
            throw ValidationError("no database: pass --database-url or set EVENTOUTBOX_DATABASE_URL")
        }
        return PostgresPool(url: url, maxConnections: 2)
    }
}

func reportingFailures(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as ExitCode {
        throw error
    } catch {
        FileHandle.standardError.write(Data(("error: " + OperatorAdvice.explain(error) + "\n").utf8))
        throw ExitCode.failure
    }
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create or upgrade the event store tables (events, outbox, snapshots). Safe to run twice.")
    @OptionGroup var database: DatabaseOption

    func run() async throws {
        try await reportingFailures {
            let applied = try await EventStoreSchema.migrate(try database.pool())
            print(applied.isEmpty ? "schema is up to date" : "applied migrations \(applied.map(String.init).joined(separator: ", "))")
        }
    }
}

struct Stream: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Inspect event streams.", subcommands: [Show.self])

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the raw events of a stream, in version order.")
        @OptionGroup var database: DatabaseOption
        @Argument(help: "Stream id.") var streamID: String
        @Flag(help: "Print JSON envelopes (as published to Kafka).") var json = false

        func run() async throws {
            try await reportingFailures {
                let events = try await EventStore(pool: try database.pool()).readStream(streamID)
                guard !events.isEmpty else { throw ValidationError("stream '\(streamID)' has no events") }
                if json {
                    print(String(decoding: try EventJSON.encoder.encode(try events.map(OutboxEnvelope.init)), as: UTF8.self))
                } else {
                    for event in events {
                        print("\(event.streamVersion)\t#\(event.position)\t\(ISOTimestamp.format(event.occurredAt))\t"
                            + "\(event.eventType) v\(event.schemaVersion)\t\(event.payload)")
                    }
                }
            }
        }
    }
}
