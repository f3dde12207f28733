import Foundation
import TestSupport
import Testing

/// The deploy files, validated offline (no Docker engine or cluster here) with the tools scripts/test installs.
@Suite("deploy/ files are valid")
struct DeployFilesTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    func run(_ arguments: [String]) async throws -> (status: Int32, output: String) { try await Tools.command(arguments, in: Self.root) }

    @Test("docker-compose config accepts deploy/docker-compose.yml; it runs the service, relay and projector on apache/kafka")
    func compose() async throws {
        let result = try await run(["docker-compose", "-f", "deploy/docker-compose.yml", "config"])
        #expect(result.status == 0, "\(result.output)")
        for service in ["postgres:", "kafka:", "migrate:", "accounts-service:", "outbox-relay:", "account-projector:"] {
            #expect(result.output.contains("  \(service)"), "\(service)")
        }
        #expect(result.output.contains("image: apache/kafka:"))
    }

    @Test("kubernetes-validate accepts deploy/kubernetes/eventoutbox.yaml; probes use the service's health endpoints")
    func kubernetes() async throws {
        let result = try await run(["python3", "-m", "kubernetes_validate", "--strict", "deploy/kubernetes/eventoutbox.yaml"])
        #expect(result.status == 0, "\(result.output)")
        let manifest = try String(contentsOf: Self.root.appendingPathComponent("deploy/kubernetes/eventoutbox.yaml"), encoding: .utf8)
        #expect(manifest.contains("path: /health/ready") && manifest.contains("path: /health/live"))
        // Hardened: every container read-only and unprivileged, started under a startup probe, images pinned,
        // and voluntary disruptions leave one of each running.
        let containers = manifest.components(separatedBy: "image: registry.example.com/eventoutbox:").count - 1
        #expect(containers == 4)
        #expect(manifest.components(separatedBy: "readOnlyRootFilesystem: true").count - 1 == containers)
        #expect(manifest.components(separatedBy: "allowPrivilegeEscalation: false").count - 1 == containers)
        #expect(manifest.components(separatedBy: "startupProbe:").count - 1 == containers - 1, "all but the migration job")
        #expect(!manifest.contains(":latest"))
        // Every metrics port is scraped: the relay's and the projector's through pod annotations, the API's
        // (set through the environment) through an annotated Service.
        for port in ["9464", "9465", "9466"] { #expect(manifest.contains("prometheus.io/port: \"\(port)\""), "\(port)") }
        #expect(manifest.contains("{ name: EVENTOUTBOX_ACCOUNTS_SERVICE_METRICS_PORT, value: \"9466\" }"))
        // Every pod: no service-link variables (`ACCOUNTS_SERVICE_PORT=tcp://…` for the Service accounts-service).
        #expect(manifest.components(separatedBy: "enableServiceLinks: false").count - 1 == manifest.components(separatedBy: "runAsNonRoot: true").count - 1)
        #expect(manifest.components(separatedBy: "kind: PodDisruptionBudget").count - 1 == 2)
    }

    @Test("the runtime image ships the five programs a deployment runs, and no test code or test broker")
    func image() throws {
        let dockerfile = try String(contentsOf: Self.root.appendingPathComponent("deploy/Dockerfile"), encoding: .utf8)
        let runtime = try #require(dockerfile.components(separatedBy: "\nFROM ").last)
        #expect(!runtime.contains("Tests") && !dockerfile.contains("kafka-mock-cluster"))
        for tool in ["bank", "eventoutbox", "outbox-relay", "account-projector", "accounts-service"] {
            #expect(dockerfile.contains(" \(tool)"), "\(tool)")
        }
        #expect(!dockerfile.contains(":latest") && dockerfile.contains("USER 10001"))
    }
}
