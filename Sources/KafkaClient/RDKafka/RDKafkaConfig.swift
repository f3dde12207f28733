import CRdKafka
import Foundation
import Synchronization

/// Builds an `rd_kafka_conf_t` from property names and values, failing with the name librdkafka rejected.
package enum RDKafkaConfig {
    /// Text that librdkafka wrote into an error buffer.
    static func string(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Returns a new configuration; the caller hands it to `rd_kafka_new` (which takes ownership on success)
    /// or destroys it.
    package static func make(_ properties: [String: String]) throws(KafkaError) -> OpaquePointer {
        let conf = rd_kafka_conf_new()!
        for (key, value) in properties.sorted(by: { $0.key < $1.key }) {
            var errorText = [CChar](repeating: 0, count: 512)
            let result = rd_kafka_conf_set(conf, key, value, &errorText, errorText.count)
            if result != RD_KAFKA_CONF_OK {
                rd_kafka_conf_destroy(conf)
                // A mistyped name (`sasl.pasword=...`) or a secret's value must not reach a log.
                let hidden = result == RD_KAFKA_CONF_UNKNOWN || mayHoldSecret(key)
                var reason = RDKafkaConfig.string(errorText)
                if hidden && !value.isEmpty { reason = reason.replacingOccurrences(of: value, with: "***") }
                throw KafkaError(
                    code: .invalidConfiguration,
                    message: "librdkafka rejected property '\(key)'" + (hidden ? " (value hidden)" : " = '\(value)'") + ": \(reason); "
                        + "see librdkafka's CONFIGURATION.md for valid names and values"
                )
            }
        }
        return conf
    }

    /// Whether a property's value may be a credential (passwords, secrets, keys, tokens, JAAS configs).
    static func mayHoldSecret(_ key: String) -> Bool {
        let key = key.lowercased()
        return ["password", "secret", "key", "token", "jaas", "credential"].contains { key.contains($0) }
    }
}

/// Owns one `rd_kafka_t` and destroys it. `rd_kafka_t` is thread-safe, so this is shared freely.
package final class RDKafkaHandle: @unchecked Sendable {
    package let pointer: OpaquePointer
    /// Kept alive as long as the handle: librdkafka's callbacks find it through `rd_kafka_opaque`.
    let context: RDKafkaContext

    /// Creates a client of `type` (`RD_KAFKA_PRODUCER` or `RD_KAFKA_CONSUMER`). Takes ownership of `conf`.
    package init(type: rd_kafka_type_t, conf: OpaquePointer, context: RDKafkaContext) throws(KafkaError) {
        rd_kafka_conf_set_opaque(conf, Unmanaged.passUnretained(context).toOpaque())
        rd_kafka_conf_set_log_cb(conf, rdKafkaLogCallback)
        var errorText = [CChar](repeating: 0, count: 512)
        guard let pointer = rd_kafka_new(type, conf, &errorText, errorText.count) else {
            rd_kafka_conf_destroy(conf)  // rd_kafka_new only takes `conf` on success
            throw KafkaError(code: .invalidConfiguration, message: "cannot create Kafka client: \(RDKafkaConfig.string(errorText))")
        }
        self.pointer = pointer
        self.context = context
    }

    deinit {
        let pointer = UnsafeSendablePointer(pointer)
        let context = self.context
        if Self.mustNotDestroy(pointer.value) {
            // librdkafka 2.0.2 never finishes destroying a consumer after a fatal error: its group cannot reach its
            // terminated state, and rdk:main waits for that, waking every millisecond: a core at 100% for the
            // rest of the process (seen starving a whole test run). Such a consumer fetches and commits nothing
            // more; it is left to the process's exit, its context kept for callbacks that may still come.
            Self.abandoned.withLock { $0.append((pointer, context)) }
            return
        }
        // rd_kafka_destroy waits for librdkafka's threads and outstanding requests (seconds, or longer when a
        // broker never answers). The last reference may be dropped on Swift's cooperative pool, which must not
        // block, so destruction happens on a thread of its own. The context stays alive until then because
        // callbacks can still fire during destroy.
        let name = String(cString: rd_kafka_name(pointer.value))
        Self.destroying.withLock { _ = $0.insert(name) }
        let thread = Thread {
            rd_kafka_destroy(pointer.value)
            withExtendedLifetime(context) {}
            Self.destroying.withLock { _ = $0.remove(name) }
        }
        thread.name = "eventoutbox-kafka-destroy"
        thread.start()
    }

    /// Whether `client` is a consumer that hit a fatal error (see `deinit`).
    private static func mustNotDestroy(_ client: OpaquePointer) -> Bool {
        rd_kafka_type(client) == RD_KAFKA_CONSUMER && rd_kafka_fatal_error(client, nil, 0) != RD_KAFKA_RESP_ERR_NO_ERROR
    }

    /// Clients (`rd_kafka_name`) whose `rd_kafka_destroy` has not returned yet.
    package static var clientsBeingDestroyed: Set<String> { destroying.withLock { $0 } }
    /// Clients left undestroyed (see `deinit`).
    package static var abandonedClientCount: Int { abandoned.withLock { $0.count } }
    private static let destroying = Mutex<Set<String>>([])
    private static let abandoned = Mutex<[(UnsafeSendablePointer, RDKafkaContext)]>([])

    /// librdkafka's name of this client, e.g. `rdkafka#consumer-3`.
    package var name: String { String(cString: rd_kafka_name(pointer)) }

    /// The context of the client that a callback belongs to.
    static func context(of client: OpaquePointer?) -> RDKafkaContext? {
        guard let client, let opaque = rd_kafka_opaque(client) else { return nil }
        return Unmanaged<RDKafkaContext>.fromOpaque(opaque).takeUnretainedValue()
    }
}

/// Moves a C handle to the thread that destroys it; nothing else uses it afterwards.
package struct UnsafeSendablePointer: @unchecked Sendable {
    package let value: OpaquePointer
    package init(_ value: OpaquePointer) { self.value = value }
}
