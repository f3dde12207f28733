import Foundation
import TestSupport
import Testing

/// The deploy files, validated offline (no Docker engine or cluster here) with the tools scripts/test installs.
@Suite("deploy/ files are valid")
struct DeployFilesTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    func run(_ arguments: [String]) throws -> (status: Int32, output: String) { try Tools.command(arguments, in: Self.root) }

    @Test("docker-compose config accepts deploy/docker-compose.yml; it runs the service, relay and projector on apache/kafka")
    func compose() throws {
        let result = try run(["docker-compose", "-f", "deploy/docker-compose.yml", "config"])
        #expect(result.status == 0, "\(result.output)")
        for service in ["postgres:", "kafka:", "migrate:", "accounts-service:", "outbox-relay:", "account-projector:"] {
            #expect(result.output.contains("  \(service)"), "\(service)")
        }
        #expect(result.output.contains("image: apache/kafka:"))
    }

    @Test("kubernetes-validate accepts deploy/kubernetes/eventoutbox.yaml; probes use the service's health endpoints")
    func kubernetes() throws {
        let result = try run(["python3", "-m", "kubernetes_validate", "--strict", "deploy/kubernetes/eventoutbox.yaml"])
        #expect(result.status == 0, "\(result.output)")
        let manifest = try String(contentsOf: Self.root.appendingPathComponent("deploy/kubernetes/eventoutbox.yaml"), encoding: .utf8)
        #expect(manifest.contains("path: /health/ready") && manifest.contains("path: /health/live"))
    }
}
