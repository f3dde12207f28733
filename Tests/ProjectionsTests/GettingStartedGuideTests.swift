import EventSourcing
import EventStore
import EventStoreSQL
import Foundation
import KafkaClient
import OutboxRelayStore
import LibPQ
import Projections
import TestSupport
import Testing

// The snippets of Sources/EventStore/EventStore.docc/GettingStarted.md, verbatim; a test below checks that each
// snippet of the guide appears here, so the guide cannot drift from code that compiles and runs.

struct TaskAdded: DomainEvent {
    static let eventType = "TaskAdded"
    var title: String
}

struct TaskDone: DomainEvent {
    static let eventType = "TaskDone"
    var title: String
}

struct TaskList: Aggregate {
    static let category = "tasks"
    static let stateSchemaVersion = 1
    var open: [String] = []
    var done = 0

    mutating func apply(_ event: any DomainEvent) throws {
        switch event {
        case let added as TaskAdded: open.append(added.title)
        case let finished as TaskDone:
            open.removeAll { $0 == finished.title }
            done += 1
        default: throw UnexpectedEvent(event, in: Self.self)
        }
    }
}

@Suite("the getting-started guide (DocC) compiles and runs as written")
struct GettingStartedGuideTests {
    static let guide = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Sources/EventStore/EventStore.docc/GettingStarted.md")

    @Test("the guide's steps, run against PostgreSQL and the mock Kafka cluster")
    func guide() async throws {
        let test = try await TestEventStore.create()
        let pool = test.pool
        let databaseURL = test.schema.url
        let brokers = try TestEnvironment.kafkaBrokers()

        let taskSchema = SchemaModule("task-service", dependencies: ["event-store"], migrations: [
            SchemaMigration(version: 1, name: "task labels", sql: "CREATE TABLE task_labels (list_id text PRIMARY KEY, label text NOT NULL)"),
        ])
        try await SchemaMigrator(EventOutboxSchema.modules + [taskSchema]).migrate(pool)
        #expect(try await test.count("SELECT count(*) FROM eventoutbox_schema_migrations WHERE module = 'task-service'") == 1)
        #expect(try await test.count("SELECT count(*) FROM task_labels") == 0)

        var registry = EventRegistry()
        registry.register(TaskAdded.self)
        registry.register(TaskDone.self)

        let store = EventStore(pool: pool, routing: OutboxRouting(defaultTopic: "tasks"))
        let lists = AggregateRepository<TaskList>(store: store, registry: registry)
        let (state, _) = try await lists.execute("list-42") { current in
            current.state.open.contains("write the guide") ? [] : [TaskAdded(title: "write the guide")]
        }
        try await lists.execute("list-42") { current in
            current.state.open.contains("write the guide") ? [TaskDone(title: "write the guide")] : []
        }
        let now = try await lists.load("list-42")
        let before = try await lists.load("list-42", atVersion: state.version)

        #expect(now.state.done == 1 && now.state.open.isEmpty)
        #expect(before.state.open == ["write the guide"] && before.state.done == 0)
        #expect(try await test.count("SELECT count(*) FROM outbox WHERE topic = 'tasks'") == 2)

        let openTasks = Projection(
            name: "open_tasks",
            tables: [.init(name: "open_tasks", createSQL: "CREATE TABLE {table} (list_id text, title text, PRIMARY KEY (list_id, title))")]
        ) { event, recorded, context in
            switch event {
            case let added as TaskAdded:
                try await context.connection.execute(
                    "INSERT INTO \(context.table("open_tasks")) (list_id, title) VALUES ($1, $2)", [.text(recorded.streamID), .text(added.title)])
            case let finished as TaskDone:
                try await context.connection.execute(
                    "DELETE FROM \(context.table("open_tasks")) WHERE list_id = $1 AND title = $2", [.text(recorded.streamID), .text(finished.title)])
            default:
                break
            }
        }

        let consumer = ProjectionConsumer(
            configuration: ProjectionConsumerConfiguration(
                databaseURL: databaseURL, kafka: KafkaConfiguration(bootstrapServers: brokers), groupID: "open-tasks", topics: ["tasks"]),
            applier: ProjectionApplier(projections: [openTasks], registry: registry))
        try await ProjectionRebuilder(pool: pool, registry: registry).rebuild(openTasks)

        _ = consumer
        #expect(try await test.count("SELECT count(*) FROM open_tasks") == 0)
        #expect(try await test.projected("open_tasks") == 2)
        try await test.drop()
    }

    @Test("every Swift snippet of the guide is in this file, line for line")
    func snippetsAreCompiled() throws {
        let guide = try String(contentsOf: Self.guide, encoding: .utf8)
        let source = try String(contentsOf: URL(fileURLWithPath: #filePath), encoding: .utf8)
        let sourceLines = source.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        var snippets: [[String]] = []
        var current: [String]?
        for line in guide.split(separator: "\n", omittingEmptySubsequences: false) {
            if line == "```swift" { current = [] } else if line == "```", let block = current {
                snippets.append(block)
                current = nil
            } else if current != nil {
                let trimmed = line.trimmingCharacters(in: .whitespaces)
                if !trimmed.isEmpty { current!.append(trimmed) }
            }
        }
        #expect(snippets.count >= 5)
        for snippet in snippets {
            let found = sourceLines.indices.contains { start in
                start + snippet.count <= sourceLines.count && Array(sourceLines[start..<start + snippet.count]) == snippet
            }
            #expect(found, "not in GettingStartedGuideTests.swift:\n\(snippet.joined(separator: "\n"))")
        }
    }
}
