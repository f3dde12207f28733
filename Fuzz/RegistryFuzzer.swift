// libFuzzer target: the event registry (with the bank's MoneyDeposited v1 → v2 upcaster) on arbitrary JSON,
// for every registered type and schema version: an error, never a trap.
import Foundation

private let registry = BankEvents.registry
private let types = ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn", "WithdrawalRejected", "Unknown"]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzRegistry(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1 else { return 0 }
    let selector = Int(data[0])
    let payload = String(decoding: UnsafeBufferPointer(start: data + 1, count: size - 1), as: UTF8.self)
    let recorded = RecordedEvent(
        position: 1, eventID: UUID(), streamID: "s", streamVersion: 1, eventType: types[selector % types.count],
        schemaVersion: selector / types.count % 4, payload: payload, metadata: EventMetadata(), occurredAt: Date())
    if let event = try? registry.decode(recorded) {
        var account = Account()
        _ = try? account.apply(event)
    }
    return 0
}
