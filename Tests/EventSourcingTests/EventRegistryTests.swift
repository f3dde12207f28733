import BankDomain
import EventSourcing
import Foundation
import Testing

@Suite("event registry and upcasting (no server)")
struct EventRegistryTests {
    func recorded(_ type: String, version: Int, payload: String) -> RecordedEvent {
        RecordedEvent(
            position: 1, eventID: UUID(), streamID: "stream-\"quoted\"", streamVersion: 1, eventType: type,
            schemaVersion: version, payload: payload, metadata: .init(), occurredAt: Date())
    }

    @Test("a v1 MoneyDeposited without description is upcast to v2")
    func upcastsV1() throws {
        let event = try BankEvents.registry.decode(recorded("MoneyDeposited", version: 1, payload: #"{"amount": 250}"#))
        #expect(event as? MoneyDeposited == MoneyDeposited(amount: 250, description: ""))
    }

    @Test("an unknown type fails naming the event id, type and stream")
    func unknownType() throws {
        let event = recorded("InterestAccrued", version: 1, payload: "{}")
        let error = #expect(throws: EventDecodingError.self) { try BankEvents.registry.decode(event) }
        #expect(error?.eventID == event.eventID)
        #expect(error?.description.contains("InterestAccrued") == true)
        #expect(error?.description.contains(#"stream-"quoted""#) == true)
        #expect(error?.description.contains("not registered") == true)
        #expect(error?.underlying == nil, "no error behind an unregistered type")
    }

    @Test("a payload that does not fit the type names the missing field")
    func badPayload() throws {
        let error = #expect(throws: EventDecodingError.self) {
            try BankEvents.registry.decode(recorded("MoneyWithdrawn", version: 1, payload: #"{"amount": "lots"}"#))
        }
        #expect(error?.description.contains("amount") == true)
        // The cause is kept, not only its text.
        #expect(error?.underlying is DecodingError, "\(String(describing: error?.underlying))")
        let malformed = #expect(throws: EventDecodingError.self) {
            try BankEvents.registry.decode(recorded("MoneyWithdrawn", version: 1, payload: #"{"amount": 5"#))
        }
        #expect(malformed?.eventType == "MoneyWithdrawn")
    }

    @Test("a schema version newer than the reader's is refused, not misread")
    func newerVersion() throws {
        let error = #expect(throws: EventDecodingError.self) {
            try BankEvents.registry.decode(recorded("MoneyDeposited", version: 3, payload: #"{"amount": 1, "description": ""}"#))
        }
        #expect(error?.description.contains("newer") == true)
    }

    @Test("the outbox envelope round-trips and keeps microseconds")
    func envelope() throws {
        let event = RecordedEvent(
            position: 9, eventID: UUID(), streamID: "a'b\"c", streamVersion: 3, eventType: "MoneyDeposited",
            schemaVersion: 2, payload: #"{"amount":5,"description":"x"}"#,
            metadata: .init(correlationID: "c", traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            occurredAt: Date(timeIntervalSince1970: 1_764_071_548.123456))
        let envelope = try OutboxEnvelope(event)
        #expect(envelope.occurredAt == "2025-11-25T11:52:28.123456Z")
        let decoded = try OutboxEnvelope.decode(try envelope.encoded())
        #expect(decoded == envelope)
        let back = try decoded.recordedEvent()
        #expect(abs(back.occurredAt.timeIntervalSince1970 - event.occurredAt.timeIntervalSince1970) < 0.000_001)
        #expect(back.eventID == event.eventID)
        #expect(back.metadata == event.metadata)
    }

    @Test("the account folds events; an unexpected event type is an error")
    func accountFold() throws {
        var account = Account()
        try account.apply(AccountOpened(owner: "Kim", initialDeposit: 100))
        try account.apply(MoneyDeposited(amount: 50, description: ""))
        try account.apply(MoneyWithdrawn(amount: 30, description: ""))
        try account.apply(WithdrawalRejected(amount: 500, reason: "insufficient", balanceAtTime: 120))
        #expect(account.balance == 120)
        #expect(account.rejectedWithdrawalCount == 1)
        struct Stray: DomainEvent { static let eventType = "Stray" }
        #expect(throws: UnexpectedEvent.self) { try account.apply(Stray()) }
    }
}
