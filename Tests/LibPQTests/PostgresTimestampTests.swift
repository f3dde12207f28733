import Foundation
import LibPQ
import TestSupport
import Testing

@Suite("timestamptz through the server")
struct PostgresTimestampTests {
    @Test("dates before and after the epoch, with and without fractions, round trip exactly to the microsecond")
    func roundTrips() async throws {
        let connection = try await PQConnection.connect(to: try TestEnvironment.databaseURL())
        for seconds in [0.0, -1.5, 1_764_071_548.000001, 946_684_800.999999, 4_102_444_800.25] {
            let date = Date(timeIntervalSince1970: seconds)
            let row = try await connection.query(
                "SELECT $1::timestamptz AS at, extract(epoch FROM $1::timestamptz)::text AS epoch", [.timestamp(date)]
            ).first!
            #expect(abs(try row.decode(Date.self, "at").timeIntervalSince1970 - seconds) < 0.000_001)
            #expect(abs(Double(try row.decode(String.self, "epoch"))! - seconds) < 0.000_001)
        }
    }
}
