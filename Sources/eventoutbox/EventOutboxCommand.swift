import ArgumentParser
import CommandLineSupport
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
              eventoutbox outbox status         # rows waiting for the relay, oldest age, dead letters
              eventoutbox dead-letters list
              eventoutbox dead-letters retry 42
            """,
        subcommands: [Migrate.self, Stream.self, Outbox.self, DeadLetters.self]
    )
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

struct Outbox: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Inspect the outbox.", subcommands: [Status.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Rows waiting for the relay, the age of the oldest, dead letters, published rows kept.")
        @OptionGroup var database: DatabaseOption
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            try await reportingFailures {
                let status = try await database.pool().withConnection { try await OutboxTable().status(on: $0) }
                if json {
                    print(String(decoding: try EventJSON.encoder.encode(status), as: UTF8.self))
                } else {
                    print("waiting:      \(status.waiting)")
                    print("oldest age:   \(String(format: "%.1f", status.oldestWaitingAgeSeconds)) s")
                    print("dead letters: \(status.deadLetters)")
                    print("published:    \(status.published) (kept until retention removes them)")
                }
            }
        }
    }
}

struct DeadLetters: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dead-letters",
        abstract: "Outbox rows Kafka refused for good; each holds back the later events of its stream.",
        subcommands: [List.self, Retry.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List dead letters with their errors.")
        @OptionGroup var database: DatabaseOption
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            try await reportingFailures {
                let letters = try await database.pool().withConnection { try await OutboxTable().deadLetters(on: $0) }
                if json {
                    print(String(decoding: try EventJSON.encoder.encode(letters), as: UTF8.self))
                } else if letters.isEmpty {
                    print("no dead letters")
                } else {
                    for letter in letters {
                        print("\(letter.outboxID)\tstream \(letter.streamID) v\(letter.streamVersion)\t\(letter.topic)\t"
                            + "\(letter.envelopeBytes) bytes\t\(ISOTimestamp.format(letter.failedAt))\t\(letter.error)")
                    }
                }
            }
        }
    }

    struct Retry: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Put a dead letter back in the outbox (fix the cause first, e.g. the broker's size limit).")
        @OptionGroup var database: DatabaseOption
        @Argument(help: "The dead letter's id (first column of `list`).") var id: Int64

        func run() async throws {
            let id = self.id
            try await reportingFailures {
                let moved = try await database.pool().withConnection { try await OutboxTable().retryDeadLetter(id, on: $0) }
                guard moved else { throw ValidationError("no dead letter with id \(id); see `eventoutbox dead-letters list`") }
                print("dead letter \(id) is back in the outbox; the relay publishes it and then the rest of its stream")
            }
        }
    }
}
