import Foundation
import TestSupport
import Testing

@Suite("What each executable links")
struct ProductBoundaryTests {
    @Test("the service and the command-line tools do not link librdkafka; the relay and the projector do")
    func librdkafkaOnlyWhereKafkaIsUsed() async throws {
        for (tool, linksKafka) in [
            ("accounts-service", false), ("bank", false), ("eventoutbox", false), ("outbox-relay", true), ("account-projector", true),
        ] {
            let ldd = try await Tools.command(["ldd", try Tools.path(tool)], in: URL(fileURLWithPath: "/tmp"))
            #expect(ldd.status == 0, "\(ldd.output)")
            #expect(ldd.output.contains("libpq.so"), "\(tool) talks to PostgreSQL: \(ldd.output)")
            #expect(ldd.output.contains("librdkafka") == linksKafka, "\(tool): \(ldd.output)")
        }
    }

    @Test("no executable carries postgres-nio: only a service that imports EventStorePostgresNIO links it")
    func postgresNIOOnlyWhereImported() throws {
        // Swift type metadata names its module, so a statically linked PostgresNIO leaves its name in the binary.
        let marker = Data("PostgresNIO".utf8)
        for tool in ["accounts-service", "bank", "eventoutbox", "outbox-relay", "account-projector"] {
            let binary = try Data(contentsOf: URL(fileURLWithPath: try Tools.path(tool)))
            #expect(binary.range(of: marker) == nil, "\(tool) links PostgresNIO")
        }
        let testBundle = try Data(contentsOf: URL(fileURLWithPath: "/proc/self/exe"))
        #expect(testBundle.range(of: marker) != nil, "the test bundle, which does link it, shows the marker")
    }
}

@Suite("What each target declares")
struct DeclaredDependencyTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    /// Modules of the toolchain and the system, which no manifest declares.
    static let platformModules: Set<String> = [
        "Foundation", "FoundationEssentials", "FoundationNetworking", "Dispatch", "Darwin", "Glibc", "Musl", "Synchronization",
        "Testing", "XCTest", "_Concurrency",
    ]

    @Test("every module a target imports is a dependency it declares, so no product links what it does not name")
    func importsAreDeclared() async throws {
        // A scratch path of its own: the manifest is read while `swift test` holds the package's build folder.
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("dump-package-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: scratch) }
        let dump = try await Tools.command(["swift", "package", "--scratch-path", scratch.path, "dump-package"], in: Self.root)
        try #require(dump.status == 0, "\(dump.output)")
        let json = try #require(dump.output.firstIndex(of: "{").map { String(dump.output[$0...]) })
        let manifest = try JSONDecoder().decode(Manifest.self, from: Data(json.utf8))
        // At the start of a line, as the package writes them (an indented `import` is in a script in a string).
        let importLine = try Regex(#"(?m)^(?:@\w+\s+)*import\s+(?:(?:struct|class|enum|protocol|func|var|typealias)\s+)?(\w+)"#)
        var checked = 0
        for target in manifest.targets where target.type != "system" {
            let folder = Self.root.appendingPathComponent(target.path ?? "\(target.type == "test" ? "Tests" : "Sources")/\(target.name)")
            let declared = Set(target.dependencies.compactMap(\.name))
            var undeclared: Set<String> = []
            let files = FileManager.default.enumerator(at: folder, includingPropertiesForKeys: nil)?.compactMap { $0 as? URL } ?? []
            for file in files where file.pathExtension == "swift" {
                let source = try String(contentsOf: file, encoding: .utf8)
                for match in source.matches(of: importLine) {
                    guard let module = match.output[1].substring.map(String.init) else { continue }
                    if module != target.name && !declared.contains(module) && !Self.platformModules.contains(module) {
                        undeclared.insert(module)
                    }
                }
            }
            #expect(undeclared.isEmpty, "\(target.name) imports \(undeclared.sorted()) without declaring it in Package.swift")
            checked += 1
        }
        #expect(checked > 20, "the manifest's targets were read: \(checked)")
    }

    struct Manifest: Decodable {
        var targets: [Target]
    }

    struct Target: Decodable {
        var name: String
        var type: String
        var path: String?
        var dependencies: [Dependency]
    }

    /// `{"byName": ["X", null]}`, `{"target": ["X", null]}` or `{"product": ["X", "package", ...]}`.
    struct Dependency: Decodable {
        var name: String?

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: AnyKey.self)
            name = try container.allKeys.first.flatMap { key in
                var values = try container.nestedUnkeyedContainer(forKey: key)
                return try values.decodeIfPresent(String.self)
            }
        }
    }

    struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
}
