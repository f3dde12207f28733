import EventSourcing
import Foundation
import Testing

@Suite("Reading envelopes and timestamps the fast way gives what the full decoder gives")
struct EnvelopeReadingTests {
    static let texts = JSONTextTests.tricky

    func envelope(stream: String, metadata: EventMetadata, payload: String, at date: Date) throws -> [UInt8] {
        let recorded = RecordedEvent(
            position: 1, eventID: UUID(), streamID: stream, streamVersion: 42, eventType: "Type \(stream)", schemaVersion: 3,
            payload: payload, metadata: metadata, occurredAt: date)
        return try OutboxEnvelope(recorded).encoded()
    }

    func slow(_ bytes: [UInt8]) throws -> RecordedEvent { try OutboxEnvelope.decode(bytes).recordedEvent() }

    @Test("every field, for tricky strings, payloads and dates")
    func sameFields() throws {
        let payloads = [#"{"amount":5,"description":"x"}"#, #"{"nested":{"a":[1,2.5e3,-0.5,true,false,null]},"s":"\"\\u00e9"}"#, "{}"]
        let dates = [Date(timeIntervalSince1970: 1_790_000_000.123456), Date(timeIntervalSince1970: -86_400 * 400 + 0.5),
                     Date(timeIntervalSince1970: 951_782_400)]  // 2000-02-29
        for (index, text) in Self.texts.enumerated() {
            let metadata = EventMetadata(correlationID: text, causationID: nil, actor: "a\(index)", traceparent: text.isEmpty ? nil : "00-\(text)")
            for payload in payloads {
                for date in dates {
                    let bytes = try envelope(stream: text, metadata: metadata, payload: payload, at: date)
                    let fast = try OutboxEnvelope.recordedEvent(from: bytes)
                    let full = try slow(bytes)
                    #expect(fast.eventID == full.eventID && fast.streamID == full.streamID && fast.eventType == full.eventType)
                    #expect(fast.streamVersion == full.streamVersion && fast.schemaVersion == full.schemaVersion)
                    #expect(fast.metadata == full.metadata)
                    #expect(fast.occurredAt == full.occurredAt, "\(ISOTimestamp.format(date))")
                    let fastPayload = try EventJSON.decoder.decode(JSONValue.self, from: Data(fast.payload.utf8))
                    let fullPayload = try EventJSON.decoder.decode(JSONValue.self, from: Data(full.payload.utf8))
                    #expect(fastPayload == fullPayload)
                }
            }
        }
    }

    @Test("unusual but valid envelopes (nulls in metadata, spaces) still read; garbage throws, never traps")
    func unusualAndBad() throws {
        let id = UUID()
        let spaced = """
            { "eventId" : "\(id)", "streamId":"s", "streamVersion": 7, "eventType":"T", "schemaVersion":1,
              "occurredAt":"2026-11-25T00:00:00Z", "payload": {"a": [1, {"b": null}]}, "metadata": {"actor": null, "extra": 1} }
            """
        let event = try OutboxEnvelope.recordedEvent(from: Array(spaced.utf8))
        #expect(event.eventID == id && event.streamVersion == 7 && event.metadata == EventMetadata())
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        for garbage in ["", "{", "{not json", "[]", "null", #"{"eventId":"x"}"#, #"{"payload":\#(deep)}"#,
                        #"{"eventId":"\#(id)","streamId":"s","streamVersion":1.5,"eventType":"T","schemaVersion":1,"occurredAt":"2026-11-25T00:00:00Z","payload":{},"metadata":{}}"#] {
            #expect(throws: (any Error).self, "\(garbage.prefix(60))") { try OutboxEnvelope.recordedEvent(from: Array(garbage.utf8)) }
        }
    }

    @Test("JSONText.members: raw spans of each member, nil for malformed or too deep")
    func members() throws {
        var text = #"{"a": 1, "b" : {"c": [true, "x\"y"]}, "d": -2.5e-3}"#
        let members = text.withUTF8 { bytes in
            JSONText.members(of: bytes).map { $0.map { ($0.key, String(decoding: UnsafeBufferPointer(rebasing: bytes[$0.value]), as: UTF8.self)) } }
        }
        let found = try #require(members)
        #expect(found.map(\.0) == ["a", "b", "d"])
        #expect(found.map(\.1) == ["1", #"{"c": [true, "x\"y"]}"#, "-2.5e-3"])
        for bad in [#"{"a": 01}"#, #"{"a": tru}"#, #"{"a": [1,]}"#, #"{"a": 1} x"#, #"{"a" 1}"#, "{\"a\": \"\u{01}\"}",
                    "{\"a\":" + String(repeating: "[", count: 300) + String(repeating: "]", count: 300) + "}"] {
            var copy = bad
            #expect(copy.withUTF8 { JSONText.members(of: $0) } == nil, "\(bad.prefix(40))")
        }
    }

    /// Up to 2096: later, a `Date` (a Double of seconds) cannot hold every microsecond.
    @Test("timestamps in the written form parse exactly, 1906 to 2096, leap days and microseconds")
    func timestamps() throws {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let micros = Int64.random(in: -2_000_000_000_000_000...4_000_000_000_000_000, using: &generator)
            let date = Date(timeIntervalSince1970: Double(micros) / 1_000_000)
            let text = ISOTimestamp.format(date)
            let parsed = try #require(ISOTimestamp.parse(text), "\(text)")
            #expect(ISOTimestamp.format(parsed) == text)
        }
        #expect(ISOTimestamp.parse("2024-02-29T12:00:00.000001Z").map(ISOTimestamp.format) == "2024-02-29T12:00:00.000001Z")
        #expect(ISOTimestamp.parse("2026-13-01T00:00:00.000000Z") == nil)
    }
}
