import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Observability
import TestSupport
import Testing

/// One span as the OTLP receiver (`scripts/lib/otlp-receiver.py`, opentelemetry-proto) parsed it.
private struct ExportedSpan: Decodable {
    var service: String?
    var name: String
    var kind: Int
    var trace_id: String
    var span_id: String
    var parent_span_id: String
}

/// `scripts/lib/otlp-receiver.py`, running: an OTLP/HTTP endpoint that prints every span it receives.
private final class OTLPReceiver: Sendable {
    let process: ChildProcess
    let output: URL
    let port: Int

    static func start() async throws -> OTLPReceiver {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/lib/otlp-receiver.py").path
        let output = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("otlp") + ".jsonl")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        let process = ChildProcess()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", script]
        process.standardOutput = try FileHandle(forWritingTo: output)
        try process.run()
        var port: Int?
        try await waitUntil("the OTLP receiver listens") {
            port = Self.lines(output).first.flatMap { $0.hasPrefix("port ") ? Int($0.dropFirst(5)) : nil }
            return port != nil || !process.isRunning
        }
        let listening = try #require(port, "the receiver did not start")
        return OTLPReceiver(process: process, output: output, port: listening)
    }

    private init(process: ChildProcess, output: URL, port: Int) {
        self.process = process
        self.output = output
        self.port = port
    }

    private static func lines(_ file: URL) -> [String] {
        ((try? String(contentsOf: file, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    var spans: [ExportedSpan] {
        Self.lines(output).dropFirst().compactMap { try? JSONDecoder().decode(ExportedSpan.self, from: Data($0.utf8)) }
    }

    var errors: [String] { Self.lines(output).filter { $0.hasPrefix(#"{"error""#) } }

    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        try? FileManager.default.removeItem(at: output)
    }
}

@Suite("OTLP trace export from the shipped executables (opentelemetry-proto as the receiver)")
struct TraceExportTests {
    @Test("export follows the standard variables: on with an endpoint or exporter, off by default, with none, or when disabled")
    func requested() {
        #expect(!TraceExport.isRequested(by: [:]))
        #expect(TraceExport.isRequested(by: ["OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"]))
        #expect(TraceExport.isRequested(by: ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"]))
        #expect(TraceExport.isRequested(by: ["OTEL_TRACES_EXPORTER": "otlp"]))
        #expect(!TraceExport.isRequested(by: ["OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"]))
        #expect(!TraceExport.isRequested(by: ["OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"]))
    }

    @Test("one deposit over HTTP is one trace with spans from accounts-service, outbox-relay and account-projector")
    func depositExported() async throws {
        let receiver = try await OTLPReceiver.start()
        defer { receiver.stop() }
        let test = try await TestEventStore.create()
        let logs = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("trace-export") + ".log")
        let environment = [
            "EVENTOUTBOX_DATABASE_URL": test.schema.url,
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:\(receiver.port)",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            // Spans leave within 100 ms instead of the specification's 5 s.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        ]
        let port = testPort()
        var processes = [
            try Tools.start("accounts-service", ["--insecure-no-auth", "--port", String(port)], environment: environment, output: logs, appending: true),
            try Tools.start(
                "outbox-relay", ["--lock-key", String(Int64.random(in: 1...2_000_000_000)), "--poll-interval", "0.2"],
                environment: environment, output: logs, appending: true),
        ]
        defer { for process in processes where process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        let log = { (try? String(contentsOf: logs, encoding: .utf8)) ?? "" }
        try await waitUntil("the service answers", timeout: .seconds(60)) {
            let live = try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/health/live")!)
            return live != nil || processes.contains { !$0.isRunning }
        }
        let running = processes.allSatisfy { $0.isRunning }
        try #require(running, "\(log())")

        let account = try await post("http://127.0.0.1:\(port)/accounts", #"{"owner": "Traced"}"#, traceparent: nil)["id"] as? String
        let id = try #require(account)
        // The topic exists once the relay published the opening: the projector can subscribe to it.
        try await waitUntil("the relay published the opening", timeout: .seconds(60)) {
            try await test.count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") >= 1
        }
        processes.append(try Tools.start("account-projector", ["--group", uniqueName("traced")], environment: environment, output: logs, appending: true))

        let traceID = WatchingTracer.hex(16)
        let callerSpan = WatchingTracer.hex(8)
        _ = try await post("http://127.0.0.1:\(port)/accounts/\(id)/deposits", #"{"amount": 5}"#, traceparent: "00-\(traceID)-\(callerSpan)-01")
        try await waitUntil("spans of the deposit's trace from all three processes", timeout: .seconds(90)) {
            Set(receiver.spans.filter { $0.trace_id == traceID }.compactMap(\.service)) == ["accounts-service", "outbox-relay", "account-projector"]
        }
        for process in processes { kill(process.processIdentifier, SIGTERM) }
        try await waitUntil("the processes stop") { processes.allSatisfy { !$0.isRunning } }
        #expect(processes.allSatisfy { $0.terminationStatus == 0 }, "\(log().suffix(2000))")

        let spans = receiver.spans.filter { $0.trace_id == traceID }
        let tree = spans.map { "\($0.service ?? "?") \($0.name) \($0.span_id) <- \($0.parent_span_id)" }
        // SpanKind: 2 = server, 4 = producer, 5 = consumer (opentelemetry-proto's trace.proto).
        let http = try #require(spans.first { $0.service == "accounts-service" && $0.kind == 2 }, "\(tree)")
        let append = try #require(spans.first { $0.service == "accounts-service" && $0.name == "eventoutbox.append" }, "\(tree)")
        let publish = try #require(spans.first { $0.service == "outbox-relay" && $0.name == "eventoutbox.publish" }, "\(tree)")
        let apply = try #require(spans.first { $0.service == "account-projector" && $0.name == "eventoutbox.apply" }, "\(tree)")
        #expect(http.parent_span_id == callerSpan, "\(tree)")
        #expect(append.parent_span_id == http.span_id, "\(tree)")
        #expect(publish.parent_span_id == append.span_id && publish.kind == 4, "\(tree)")
        #expect(apply.parent_span_id == append.span_id, "\(tree)")
        #expect(receiver.errors.isEmpty, "\(receiver.errors)")
        try await test.drop()
    }

    @Test("a protocol that is not built in (gRPC) ends the process at start, naming the variable and what to use")
    func grpcRefused() async throws {
        let refused = try await Tools.run(
            "outbox-relay", [],
            environment: ["OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"],
            timeout: .seconds(60))
        #expect(refused.status == 64 && refused.stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "\(refused.stderr.suffix(500))")
    }

    private func post(_ url: String, _ body: String, traceparent: String?) async throws -> [String: Any] {
        var request = URLRequest(url: URL(string: url)!)
        request.httpMethod = "POST"
        request.httpBody = Data(body.utf8)
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        if let traceparent { request.setValue(traceparent, forHTTPHeaderField: "traceparent") }
        let (data, response) = try await URLSession.shared.data(for: request)
        let status = (response as? HTTPURLResponse)?.statusCode ?? 0
        try #require((200..<300).contains(status), "\(url): \(status) \(String(decoding: data, as: UTF8.self))")
        return (try JSONSerialization.jsonObject(with: data) as? [String: Any]) ?? [:]
    }
}
