import CRdKafka
import Foundation

/// `rd_kafka_producev` is variadic and cannot be called from Swift; `rd_kafka_produceva` takes the same
/// arguments as an array of `rd_kafka_vu_t`.
enum RDKafkaProduce {
    /// Enqueues one record. Returns the error if librdkafka refused it (then it will never report on it).
    static func produce(_ client: OpaquePointer, _ message: KafkaOutgoingMessage, opaque: UnsafeMutableRawPointer)
        -> KafkaError?
    {
        // C strings and buffers that must outlive the call; librdkafka copies them (RD_KAFKA_MSG_F_COPY).
        var allocations: [UnsafeMutableRawPointer] = []
        defer { allocations.forEach { free($0) } }
        func cString(_ string: String) -> UnsafePointer<CChar> {
            let pointer = strdup(string)!
            allocations.append(UnsafeMutableRawPointer(pointer))
            return UnsafePointer(pointer)
        }
        func buffer(_ bytes: [UInt8]) -> UnsafeMutableRawPointer {
            let pointer = malloc(max(bytes.count, 1))!
            bytes.withUnsafeBytes { source in
                if let base = source.baseAddress { pointer.copyMemory(from: base, byteCount: bytes.count) }
            }
            allocations.append(pointer)
            return pointer
        }

        var values: [rd_kafka_vu_t] = []
        var entry = rd_kafka_vu_t()
        entry.vtype = RD_KAFKA_VTYPE_TOPIC
        entry.u.cstr = cString(message.topic)
        values.append(entry)

        entry = rd_kafka_vu_t()
        entry.vtype = RD_KAFKA_VTYPE_MSGFLAGS
        entry.u.i = RD_KAFKA_MSG_F_COPY
        values.append(entry)

        entry = rd_kafka_vu_t()
        entry.vtype = RD_KAFKA_VTYPE_OPAQUE
        entry.u.ptr = opaque
        values.append(entry)

        if let partition = message.partition {
            entry = rd_kafka_vu_t()
            entry.vtype = RD_KAFKA_VTYPE_PARTITION
            entry.u.i32 = partition
            values.append(entry)
        }
        if let key = message.key {
            entry = rd_kafka_vu_t()
            entry.vtype = RD_KAFKA_VTYPE_KEY
            entry.u.mem.ptr = buffer(key)
            entry.u.mem.size = key.count
            values.append(entry)
        }
        if let value = message.value {
            entry = rd_kafka_vu_t()
            entry.vtype = RD_KAFKA_VTYPE_VALUE
            entry.u.mem.ptr = buffer(value)
            entry.u.mem.size = value.count
            values.append(entry)
        }
        for header in message.headers {
            entry = rd_kafka_vu_t()
            entry.vtype = RD_KAFKA_VTYPE_HEADER
            entry.u.header.name = cString(header.name)
            if let value = header.value {
                entry.u.header.val = UnsafeRawPointer(buffer(value))
                entry.u.header.size = value.count
            } else {
                entry.u.header.val = nil  // a null header value; -1 would mean "NUL-terminated string"
                entry.u.header.size = 0
            }
            values.append(entry)
        }
        guard let error = rd_kafka_produceva(client, values, values.count) else { return nil }
        return KafkaError(consuming: error, context: "cannot enqueue record for topic '\(message.topic)'")
    }
}
