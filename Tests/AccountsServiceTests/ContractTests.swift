import Foundation
import TestSupport
import Testing

/// openapi.yaml as other tools read it: a real validator, and Schemathesis driving the running service with
/// every check (both installed by scripts/test).
@Suite("the HTTP contract: openapi.yaml is valid, and the service keeps it under Schemathesis")
struct ContractTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test("openapi-spec-validator accepts openapi.yaml (OpenAPI 3.1)")
    func specIsValid() async throws {
        let result = try await run(["python3", "-m", "openapi_spec_validator", "openapi.yaml"])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("OK"))
    }

    @Test("Schemathesis, every check, against accounts-service with a token: no failure, no server error, no undocumented status")
    func schemathesis() async throws {
        let test = try await TestEventStore.create()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("contract"))
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let secret = directory.appendingPathComponent("jwt.secret")
        try Data("a secret for the contract test, longer than 32 bytes".utf8).write(to: secret)
        let port = testPort()
        let log = directory.appendingPathComponent("service.log")
        let service = try Tools.start(
            "accounts-service", ["--jwt-secret-file", secret.path, "--port", String(port)],
            environment: ["EVENTOUTBOX_DATABASE_URL": test.schema.url], output: log)
        defer { if service.isRunning { kill(service.processIdentifier, SIGKILL) } }
        let token = try await Tools.run(
            "accounts-service", ["--jwt-secret-file", secret.path, "--mint-token", "schemathesis", "--token-scope", "accounts:admin"]
        ).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        try await waitUntil("the service answers", timeout: .seconds(60)) {
            (try? await run(["curl", "-sf", "http://127.0.0.1:\(port)/health/ready"]).status) == 0
        }
        // Bounded: 40 examples per operation and phase, 10 s per request.
        // Through Python, not the `st` script: where pip puts scripts differs between Python installations.
        let result = try await run([
            "python3", "-c", "import sys; from schemathesis.cli import schemathesis as main; sys.argv[0] = 'st'; main()", "run", "openapi.yaml", "--url", "http://127.0.0.1:\(port)", "-H", "Authorization: Bearer \(token)",
            "--checks", "all", "--max-examples", "40", "--request-timeout", "10", "--no-color", "--seed", "20261202",
        ])
        let summary = result.output.split(separator: "\n").filter { $0.contains("generated") || $0.contains("Selected") }
        print("schemathesis: \(summary.map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: "; "))")
        #expect(result.status == 0, "\(result.output.suffix(4000))")
        #expect(result.output.contains("passed"), "\(result.output.suffix(2000))")
        let serviceLog = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        #expect(!serviceLog.contains("request failed"), "a 5xx was logged: \(serviceLog.suffix(2000))")
        kill(service.processIdentifier, SIGTERM)
        try await waitUntil("the service stops") { !service.isRunning }
        try? FileManager.default.removeItem(at: directory)
        try await test.drop()
    }

    func run(_ arguments: [String]) async throws -> (status: Int32, output: String) { try await Tools.command(arguments, in: Self.root) }
}
