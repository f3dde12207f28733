import EventSourcing
import Foundation
import Testing

private struct Odd: DomainEvent {
    static let eventType = "Odd \"type\""
    var text: String
    var amount: Int64
    var ratio: Double
    var nested: [String: [Int]]
}

@Suite("JSON written directly on the append path is byte for byte what JSONEncoder writes")
struct JSONTextTests {
    static let tricky = [
        "", "plain", "quote \" and backslash \\", "slash / stays", "new\nline\ttab\rreturn", "\u{01}\u{08}\u{0C}\u{1F}",
        "ü ñ 日本 🏦", "\u{2028}\u{2029}", "{\"json\": [1]}",
    ]

    @Test("strings", arguments: tricky)
    func strings(_ value: String) throws {
        #expect(JSONText.string(value) == String(decoding: try EventJSON.encoder.encode(value), as: UTF8.self))
    }

    @Test("metadata with and without fields")
    func metadata() throws {
        for metadata in [
            EventMetadata(), EventMetadata(actor: "kim"),
            EventMetadata(correlationID: "c\"1", causationID: "x\\y", actor: "a/b", traceparent: "00-abc-def-01"),
        ] {
            #expect(metadata.jsonText == String(decoding: try EventJSON.encoder.encode(metadata), as: UTF8.self))
        }
    }

    @Test("the envelope", arguments: tricky)
    func envelope(_ streamID: String) throws {
        let event = NewEvent(
            Odd(text: "t \"q\" \n", amount: Int64.max, ratio: 0.1, nested: ["b": [1, 2], "a": []]),
            metadata: EventMetadata(actor: "ü"), occurredAt: Date(timeIntervalSince1970: 1_764_000_000.123456))
        let payload = try event.encodedPayload()
        let direct = OutboxEnvelope.jsonText(
            eventID: event.eventID, streamID: streamID, streamVersion: 7, eventType: event.eventType, schemaVersion: 3,
            occurredAt: event.occurredAt, payloadJSON: payload, metadataJSON: event.metadata.jsonText)
        let recorded = RecordedEvent(
            position: -1, eventID: event.eventID, streamID: streamID, streamVersion: 7, eventType: event.eventType, schemaVersion: 3,
            payload: payload, metadata: event.metadata, occurredAt: event.occurredAt)
        #expect(direct == String(decoding: try OutboxEnvelope(recorded).encoded(), as: UTF8.self))
        #expect(try OutboxEnvelope.decode(Array(direct.utf8)).streamId == streamID)
    }
}

@Test("UUID.random() is a version 4, RFC 4122 UUID, different every time")
func randomUUID() {
    let ids = (0..<1000).map { _ in UUID.random() }
    #expect(Set(ids).count == 1000)
    for id in ids {
        let text = id.uuidString
        #expect(Array(text)[14] == "4")
        #expect("89AB".contains(Array(text)[19]))
    }
}

@Suite("JSONText.stringObject reads flat objects of strings as JSONDecoder does")
struct StringObjectTests {
    @Test("what PostgreSQL prints for jsonb, and tricky strings", arguments: [
        #"{}"#, #"  { }  "#, #"{"event-id": "6f9619ff", "stream-version": "3"}"#,
        #"{"a":"quote \" backslash \\ slash \/ controls \n\t\r\b\f","b":"\u00fc \u65e5 \ud83c\udfe6"}"#,
        #"{"dup": "1", "dup": "2"}"#,
    ])
    func valid(_ text: String) throws {
        let expected = try JSONDecoder().decode([String: String].self, from: Data(text.utf8))
        #expect(JSONText.stringObject(text) == expected)
    }

    @Test("anything else is nil", arguments: [
        "", "[]", #"{"a": 1}"#, #"{"a": null}"#, #"{"a": {"b": "c"}}"#, #"{"a": "b""#, #"{"a" "b"}"#, #"{"a": "b",}"#,
        #"{"a": "b"} x"#, #"{"a": "\x"}"#, #"{"a": "\ud83c"}"#, #"{"a": "\u12"}"#, "{\"a\": \"line\nbreak\"}",
    ])
    func invalid(_ text: String) {
        #expect(JSONText.stringObject(text) == nil)
    }
}
