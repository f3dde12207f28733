// swift-tools-version:6.1
import PackageDescription

let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "EventOutbox",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "LibPQ", targets: ["LibPQ"]),
        .library(name: "KafkaClient", targets: ["KafkaClient"]),
        .library(name: "EventSourcing", targets: ["EventSourcing"]),
        .library(name: "EventStore", targets: ["EventStore"]),
        .library(name: "EventStoreSQL", targets: ["EventStoreSQL"]),
        .library(name: "EventStorePostgresNIO", targets: ["EventStorePostgresNIO"]),
        .library(name: "BankAccount", targets: ["BankAccount"]),
        .library(name: "BankProjections", targets: ["BankProjections"]),
        .executable(name: "bank", targets: ["bank"]),
        .executable(name: "eventoutbox", targets: ["eventoutbox"]),
        .executable(name: "outbox-relay", targets: ["outbox-relay"]),
        .executable(name: "account-projector", targets: ["account-projector"]),
        .executable(name: "accounts-service", targets: ["accounts-service"]),
        .library(name: "Projections", targets: ["Projections"]),
        .library(name: "OutboxRelay", targets: ["OutboxRelay"]),
        .library(name: "OutboxRelayStore", targets: ["OutboxRelayStore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.0"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.6.0"),
        // No default traits: they pull in swift-configuration, which nothing here uses.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        // HS256 bearer tokens for accounts-service (verification only; swift-crypto is in the graph already).
        .package(url: "https://github.com/vapor/jwt-kit", from: "5.7.1"),
        .package(url: "https://github.com/apple/swift-distributed-tracing", from: "1.1.0"),
        // For EventStorePostgresNIO only: services that already talk to PostgreSQL through postgres-nio.
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
        // OTLP trace export over HTTP only: the gRPC trait would add grpc-swift to every build.
        .package(url: "https://github.com/swift-otel/swift-otel", from: "1.6.0", traits: ["OTLPHTTP"]),
        // `swift package generate-documentation`: a plugin only, built when it is used.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // C libraries, linked from the system (apt: libpq-dev, librdkafka-dev).
        .systemLibrary(
            name: "CLibPQ",
            pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"]), .brew(["libpq"])]
        ),
        .systemLibrary(
            name: "CRdKafka",
            pkgConfig: "rdkafka",
            providers: [.apt(["librdkafka-dev"]), .brew(["librdkafka"])]
        ),

        // A thread per blocking C handle (see SerialThread for why not a dispatch queue).
        .target(name: "BlockingIO", swiftSettings: strictSettings),
        // Graceful stops and wake-ups of long-running loops (the relay's engines, the projection consumer).
        .target(name: "Coordination", swiftSettings: strictSettings),

        // Thin wrappers: the only modules that import C.
        .target(
            name: "LibPQ",
            dependencies: ["CLibPQ", "BlockingIO", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strictSettings
        ),
        .target(
            name: "KafkaClient",
            dependencies: ["CRdKafka", "BlockingIO", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strictSettings
        ),
        // librdkafka's mock cluster (rdkafka_mock.h): the test broker, for kafka-mock-cluster and the tests only.
        .target(
            name: "KafkaMock",
            dependencies: ["CRdKafka", "KafkaClient", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strictSettings
        ),

        // Event sourcing: the C-free core, the PostgreSQL event store, and the reference domain.
        .target(
            name: "EventSourcing",
            dependencies: [.product(name: "Tracing", package: "swift-distributed-tracing")],
            swiftSettings: strictSettings
        ),
        // The event store's statements and rows, for any driver: the libpq EventStore and the postgres-nio adapter
        // run the same SQL, so they write the same events and outbox rows.
        .target(
            name: "EventStoreSQL",
            dependencies: ["EventSourcing", .product(name: "Tracing", package: "swift-distributed-tracing")],
            swiftSettings: strictSettings
        ),
        // Appends and reads on a postgres-nio connection, inside the caller's own transaction (no libpq).
        .target(
            name: "EventStorePostgresNIO",
            dependencies: [
                "EventSourcing", "EventStoreSQL", .product(name: "Logging", package: "swift-log"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "EventStore",
            dependencies: [
                "EventSourcing", "EventStoreSQL", "LibPQ", .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "BankAccount",
            dependencies: ["EventStoreSQL", "BankDomain", "EventSourcing", "EventStore", "LibPQ"],
            swiftSettings: strictSettings
        ),
        // The bank's read models, for the projector (the service and the CLI do not link Kafka).
        .target(
            name: "BankProjections",
            dependencies: ["BankDomain", "EventSourcing", "LibPQ", "Projections"],
            swiftSettings: strictSettings
        ),
        // The bank's pure domain: events, the account aggregate and its rules; no database import.
        .target(
            name: "BankDomain",
            dependencies: ["EventSourcing"],
            swiftSettings: strictSettings
        ),

        // The relay's tables and statements (outbox_dead_letters, the outbox cursor and marks, the WAL slot):
        // no Kafka, so that `eventoutbox` can migrate and retry dead letters without linking librdkafka.
        .target(
            name: "OutboxRelayStore",
            dependencies: ["EventStoreSQL", "EventSourcing", "EventStore", "LibPQ"],
            swiftSettings: strictSettings
        ),
        // The relay: publishes outbox rows to Kafka.
        .target(
            name: "OutboxRelay",
            dependencies: ["EventStoreSQL",
                "BlockingIO", "Coordination", "EventSourcing", "EventStore", "KafkaClient", "OutboxRelayStore", "LibPQ",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        // Read models from Kafka, idempotent by event id, rebuildable from the store.
        .target(
            name: "Projections",
            dependencies: [
                "BlockingIO", "Coordination", "EventSourcing", "EventStore", "EventStoreSQL", "KafkaClient", "LibPQ",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        // Logging and metrics set-up of the executables, with a minimal HTTP endpoint for Prometheus.
        .target(
            name: "Observability",
            dependencies: [
                "EventSourcing", "LibPQ",
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "OTel", package: "swift-otel"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                "CommandLineSupport", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSettings
        ),

        // What the executables share: database/broker options and error reporting.
        .target(
            name: "CommandLineSupport",
            dependencies: [
                "EventStore", "LibPQ", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSettings
        ),

        // Executables.
        .executableTarget(
            name: "outbox-relay",
            dependencies: [
                "EventSourcing",
                "CommandLineSupport", "EventStore", "OutboxRelayStore",
                "OutboxRelay", "Observability", "KafkaClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "account-projector",
            dependencies: [
                "CommandLineSupport",
                "BankAccount", "BankProjections", "EventSourcing", "Projections", "Observability", "KafkaClient", "LibPQ",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "accounts-service",
            dependencies: [
                "EventSourcing",
                "AccountsService", "CommandLineSupport", "Observability", "BankAccount", "EventStore", "OutboxRelayStore", "LibPQ",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "AccountsService",
            dependencies: [
                "BankAccount", "BlockingIO", "EventSourcing", "EventStore", "LibPQ",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "eventoutbox-bench",
            dependencies: ["BlockingIO", "EventStoreSQL",
                "EventSourcing", "CommandLineSupport",
                "BankAccount", "BankProjections", "EventStore", "OutboxRelayStore", "OutboxRelay", "Projections", "KafkaClient", "LibPQ",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "bank",
            dependencies: [
                "EventSourcing",
                "CommandLineSupport",
                "BankAccount", "EventStore", "LibPQ",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "eventoutbox",
            dependencies: [
                "EventSourcing",
                "CommandLineSupport",
                "EventStore", "OutboxRelayStore", "LibPQ",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "kafka-mock-cluster",
            dependencies: ["EventSourcing", "KafkaClient", "KafkaMock", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strictSettings
        ),

        // Tests. Those that touch servers need `scripts/test` (EVENTOUTBOX_DATABASE_URL, KAFKA_BROKERS).
        .target(
            name: "TestSupport",
            dependencies: ["KafkaMock", "EventStoreSQL",
                "LibPQ", "KafkaClient", "EventStore", "OutboxRelayStore", "EventSourcing", "BlockingIO",
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            path: "Tests/TestSupport",
            swiftSettings: strictSettings
        ),
        // An example service on postgres-nio (built and tested, never shipped): see Examples/PostgresNIOLedger.
        .target(
            name: "PostgresNIOLedger",
            dependencies: [
                "BankDomain", "EventSourcing", "EventStorePostgresNIO", "EventStoreSQL",
                .product(name: "Logging", package: "swift-log"), .product(name: "PostgresNIO", package: "postgres-nio"),
            ],
            path: "Examples/PostgresNIOLedger",
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "EventStorePostgresNIOTests",
            dependencies: [
                "BankDomain", "EventSourcing", "EventStore", "EventStorePostgresNIO", "EventStoreSQL", "LibPQ",
                "PostgresNIOLedger", "TestSupport", .product(name: "Logging", package: "swift-log"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "CoordinationTests",
            dependencies: ["Coordination"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "LibPQTests",
            dependencies: ["LibPQ", "BlockingIO", "TestSupport"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "EventSourcingTests",
            dependencies: ["EventSourcing", "BankDomain"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "EventStoreTests",
            dependencies: ["EventStoreSQL",
                "EventSourcing", "EventStore", "OutboxRelayStore", "BankAccount", "LibPQ", "TestSupport",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "OutboxRelayTests",
            dependencies: ["EventStoreSQL",
                "OutboxRelay", "EventSourcing", "EventStore", "OutboxRelayStore", "BankAccount", "BankProjections", "Projections", "KafkaClient", "KafkaMock",
                "LibPQ", "TestSupport", "Observability",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "ProjectionsTests",
            dependencies: ["EventStoreSQL",
                "Projections", "BankAccount", "BankProjections", "EventSourcing", "EventStore", "OutboxRelayStore", "OutboxRelay", "KafkaClient",
                "LibPQ", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "PropertyBased", package: "swift-property-based"),
                .product(name: "InMemoryLogging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "AccountsServiceTests",
            dependencies: ["EventStoreSQL",
                "AccountsService", "BankAccount", "EventSourcing", "EventStore", "LibPQ", "TestSupport",
                "OutboxRelay", "Projections", "BankProjections", "KafkaClient", "Observability",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "InMemoryLogging", package: "swift-log"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        // The fault suite: the real executables under crashes and outages, with figures for RELIABILITY.md.
        .testTarget(
            name: "ReliabilityTests",
            dependencies: ["BankAccount", "EventSourcing", "EventStore", "OutboxRelayStore", "KafkaClient", "LibPQ", "TestSupport"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "CommandLineSupportTests",
            dependencies: [
                "CommandLineSupport", "TestSupport", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "KafkaClientTests",
            dependencies: ["BlockingIO", "KafkaClient", "KafkaMock", "TestSupport"],
            swiftSettings: strictSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
