import ArgumentParser
import CommandLineSupport
import EventSourcing
import EventStore
import Foundation
import OutboxRelayStore
import LibPQ

@main
struct EventOutboxCommand: SubcommandGroup {
    static func main() async { await mainReadingEnvironment() }

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
            """ + "\n\n" + EnvironmentOptions.help("eventoutbox migrate", example: "wal", "true"),
        version: EventOutboxVersion.current,
        subcommands: [Migrate.self, Stream.self, Outbox.self, DeadLetters.self, WAL.self]
    )
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create or upgrade the event store's and the relay's tables. Safe to run twice, and at once.",
        discussion: """
            Applies the migrations of two schema modules, each once, in one transaction: event-store (events, \
            outbox, snapshots) and outbox-relay (outbox_dead_letters, after event-store). Each module numbers its \
            own; what was applied is recorded per module in eventoutbox_schema_migrations. Services and projectors \
            apply their own modules when they start (accounts-service: idempotency_keys; account-projector: \
            projection_dead_letters).

            With --wal, also create what `outbox-relay --source wal` reads: a publication of the outbox's inserts \
            and a logical replication slot (pgoutput). Needs wal_level = logical and a role with REPLICATION (or \
            superuser). The slot keeps WAL from now on until a relay confirms it: run the relay, or drop the slot \
            (`eventoutbox wal drop-slot`) if you stop using it.
            """)
    @OptionGroup var database: DatabaseOption
    @OptionGroup var wal: WALNames
    @Flag(name: .customLong("wal"), help: "Also create the publication and replication slot for `outbox-relay --source wal`.")
    var withWAL = false
    @Flag(help: "Only list the migrations that are missing (one per line: module, version, name); change nothing.")
    var dryRun = false

    func run() async throws {
        try await reportingFailures {
            let pool = try database.pool()
            let migrator = SchemaMigrator(EventOutboxSchema.modules)
            if dryRun {
                let pending = try await migrator.pending(pool)
                print(pending.isEmpty ? "schema is up to date" : pending.map { "missing: \($0)" }.joined(separator: "\n"))
                return
            }
            let applied = try await migrator.migrate(pool)
            print(applied.isEmpty ? "schema is up to date" : applied.map { "applied migration \($0)" }.joined(separator: "\n"))
            if withWAL {
                let names = try wal.names()
                let created = try await pool.withConnection { try await names.setUp(on: $0) }
                print(created.isEmpty ? "publication and replication slot exist" : "created \(created.joined(separator: " and "))")
            }
        }
    }
}

/// `--publication` and `--slot`, as `outbox-relay --source wal` takes them.
struct WALNames: ParsableArguments {
    @Option(help: "Publication of the outbox's inserts.") var publication: String = OutboxWAL.defaultName
    @Option(help: "Logical replication slot.") var slot: String = OutboxWAL.defaultName

    func names() throws -> OutboxWAL {
        do {
            return try OutboxWAL(publication: publication, slot: slot)
        } catch {
            throw ValidationError("\(error)")
        }
    }
}

struct WAL: SubcommandGroup {
    static let configuration = CommandConfiguration(
        commandName: "wal",
        abstract: "The replication slot of `outbox-relay --source wal`: status, and dropping it.",
        subcommands: [Status.self, DropSlot.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "wal_level, the publication, and the slot: whether a relay streams it, what it confirmed, the WAL it keeps.",
            discussion: "Exits 3 when it finds a problem (each printed on a 'problem:' line), 0 when all is in order.")
        @OptionGroup var database: DatabaseOption
        @OptionGroup var wal: WALNames
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            try await reportingFailures {
                let names = try wal.names()
                let status = try await database.pool().withConnection { try await names.status(on: $0) }
                let problems = names.problems(in: status)
                if json {
                    print(String(decoding: try EventJSON.encoder.encode(status), as: UTF8.self))
                    if !problems.isEmpty { throw ExitCode(3) }
                    return
                }
                print("wal_level:    \(status.walLevel)")
                print("publication:  \(names.publication) \(status.publicationCoversOutbox ? "(covers \(status.schema).outbox)" : status.publicationExists ? "(does not cover \(status.schema).outbox)" : "(missing)")")
                if let slot = status.slot {
                    print("slot:         \(names.slot) (\(slot.plugin), \(slot.active ? "streaming to a relay" : "no relay connected"))")
                    print("confirmed:    \(slot.confirmedFlushLSN ?? "-")")
                    print("unconfirmed:  \(slot.unconfirmedBytes) bytes of WAL")
                    print("WAL kept:     \(slot.retainedBytes) bytes")
                } else {
                    print("slot:         \(names.slot) (missing)")
                }
                for problem in problems { print("problem:      \(problem)") }
                // A check that finds problems says so in its exit status too (scripts, probes, CI).
                if !problems.isEmpty { throw ExitCode(3) }
            }
        }
    }

    struct DropSlot: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "drop-slot",
            abstract: "Drop the replication slot so that the server frees the WAL it keeps.",
            discussion: """
                Inserts the slot has not confirmed are then no longer published from the log. Stop the relays first: \
                a slot a relay is streaming cannot be dropped.
                """)
        @OptionGroup var database: DatabaseOption
        @OptionGroup var wal: WALNames

        func run() async throws {
            try await reportingFailures {
                let names = try wal.names()
                let dropped = try await database.pool().withConnection { try await names.dropSlot(on: $0) }
                guard dropped else { throw ValidationError("there is no replication slot '\(names.slot)' in this database") }
                print("dropped replication slot \(names.slot)")
            }
        }
    }
}

struct Stream: SubcommandGroup {
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
                            + "\(event.eventType.terminalSafe) v\(event.schemaVersion)\t\(event.payload.terminalSafe)")
                    }
                }
            }
        }
    }
}

struct Outbox: SubcommandGroup {
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

struct DeadLetters: SubcommandGroup {
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
                        print("\(letter.outboxID)\tstream \(letter.streamID.terminalSafe) v\(letter.streamVersion)\t\(letter.topic.terminalSafe)\t"
                            + "\(letter.envelopeBytes) bytes\t\(ISOTimestamp.format(letter.failedAt))\t\(letter.error.terminalSafe)")
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
