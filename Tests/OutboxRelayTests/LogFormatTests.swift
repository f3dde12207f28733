import Foundation
import Logging
import Observability
import TestSupport
import Testing

@Suite("logs as JSON: one object a line, with the trace id when there is one")
struct LogFormatTests {
    @Test("a record's line: its fields, its metadata as strings, trace_id and span_id from a traceparent; quotes and newlines escaped")
    func line() throws {
        let line = JSONLogHandler.line(
            label: "outbox-relay", level: .warning, message: "a \"quoted\"\nmessage",
            metadata: ["traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "outbox.rows": "3"],
            source: "OutboxRelay", at: Date(timeIntervalSince1970: 0))
        #expect(!line.contains("\n"))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String])
        #expect(object["level"] == "warning" && object["logger"] == "outbox-relay" && object["message"] == "a \"quoted\"\nmessage")
        #expect(object["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" && object["span_id"] == "00f067aa0ba902b7")
        #expect(object["outbox.rows"] == "3" && object["time"] == "1970-01-01T00:00:00.000000Z")
    }

    @Test("--log-format json (or EVENTOUTBOX_LOG_FORMAT=json): every line the logger writes is a JSON object; a bad format exits 64")
    func processes() async throws {
        let unreachable = ["EVENTOUTBOX_DATABASE_URL": "postgresql://app@127.0.0.1:1/app?connect_timeout=1"]
        let test = try await TestEventStore.create()
        for (tool, arguments, environment) in [
            ("outbox-relay", ["--log-format", "json", "--standby-interval", "0.2"], unreachable),
            ("accounts-service", ["--insecure-no-auth", "--port", "0"], ["EVENTOUTBOX_DATABASE_URL": test.schema.url, "EVENTOUTBOX_LOG_FORMAT": "json"]),
        ] {
            // Both run until killed: the relay retries the database, the service serves.
            let run = try await Tools.run(tool, arguments, environment: environment, timeout: .seconds(4))
            let logged = run.stderr.split(separator: "\n")
            #expect(!logged.isEmpty, "\(tool) logged nothing")
            for line in logged {
                let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String]
                #expect(object?["level"] != nil && object?["message"] != nil, "\(tool): not a JSON log line: \(line.prefix(200))")
            }
        }
        let bad = try await Tools.run("outbox-relay", ["--log-format", "xml"])
        #expect(bad.status == 64 && bad.stderr.contains("'text' or 'json'"), "\(bad.stderr)")
        try await test.drop()
    }
}
