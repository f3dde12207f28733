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
}
