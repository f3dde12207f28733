// libFuzzer target: the consumer's decoding of a Kafka record's value (OutboxEnvelope.recordedEvent(from:)).
// Differential: whenever both the fast reader and the full JSONDecoder path accept a value, they must agree.
import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzEnvelope(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    guard let fast = try? OutboxEnvelope.recordedEvent(from: bytes) else { return 0 }
    guard let full = try? OutboxEnvelope.decode(bytes).recordedEvent() else { return 0 }
    precondition(fast.eventID == full.eventID && fast.streamID == full.streamID && fast.streamVersion == full.streamVersion,
                 "fast and full envelope readers disagree on identity")
    precondition(fast.eventType == full.eventType && fast.schemaVersion == full.schemaVersion, "disagree on type")
    precondition(fast.metadata == full.metadata, "disagree on metadata")
    precondition(fast.occurredAt == full.occurredAt, "disagree on occurredAt")
    let fastPayload = try? EventJSON.decoder.decode(JSONValue.self, from: Data(fast.payload.utf8))
    let fullPayload = try? EventJSON.decoder.decode(JSONValue.self, from: Data(full.payload.utf8))
    precondition(fastPayload == fullPayload, "disagree on payload")
    return 0
}
