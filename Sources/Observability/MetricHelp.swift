import Foundation

/// The `# HELP` text of every metric the executables serve, in one place: swift-metrics has no help text and
/// swift-prometheus's factory registers none, so ``OperationsEndpoint`` adds these lines to each scrape.
/// A family served without an entry here has no `# HELP` line (the process tests look for that).
public enum MetricHelp {
    public static let texts: [String: String] = [
        "eventoutbox_build_info": "The running release of EventOutbox (label version); always 1.",
        // outbox-relay
        "eventoutbox_relay_published_total": "Outbox rows Kafka acknowledged (with --delivery exactly-once: in committed transactions).",
        "eventoutbox_relay_delivery_errors_total": "Deliveries that failed (the rows go out again, or are dead-lettered).",
        "eventoutbox_relay_dead_lettered_total": "Outbox rows moved to outbox_dead_letters (their streams wait behind them).",
        "eventoutbox_relay_producer_restarts_total": "Kafka producers replaced after a failed delivery, a fatal error or fencing.",
        "eventoutbox_relay_kafka_errors_total": "Client-level errors librdkafka reported (brokers unreachable, fatal errors).",
        "eventoutbox_relay_order_violations_total": "Rows Kafka stored after an earlier row of their stream failed on the same producer (at-least-once).",
        "eventoutbox_relay_transactions_committed_total": "Kafka transactions committed (--delivery exactly-once).",
        "eventoutbox_relay_transactions_aborted_total": "Kafka transactions aborted (--delivery exactly-once); their rows went out again.",
        "eventoutbox_relay_producer_fenced_total": "Times another owner of the transactional.id fenced this relay's producer.",
        "eventoutbox_relay_rows_waiting": "Outbox rows not yet published, at the last housekeeping.",
        "eventoutbox_relay_oldest_waiting_age_seconds": "Age of the oldest waiting outbox row, at the last housekeeping.",
        "eventoutbox_relay_dead_letters": "Rows in outbox_dead_letters, at the last housekeeping.",
        "eventoutbox_relay_active": "1 while this relay publishes (holds the lock, a partition or the slot), 0 on standby.",
        "eventoutbox_relay_partitions_owned": "Outbox partitions this relay publishes (--partitions N).",
        "eventoutbox_relay_wal_retained_bytes": "WAL the replication slot holds back (--source wal).",
        "eventoutbox_relay_wal_unconfirmed_age_seconds": "Age of the oldest PostgreSQL transaction read from the slot and not yet confirmed (--source wal).",
        "eventoutbox_relay_commit_to_kafka_seconds": "From an outbox row's transaction start (created_at) to Kafka's acknowledgement.",
        // account-projector
        "eventoutbox_projection_applied_total": "Events applied to a projection (label projection).",
        "eventoutbox_projection_duplicates_skipped_total": "Events skipped because the projection already had them (redelivery, replay).",
        "eventoutbox_projection_dead_lettered_total": "Records set aside in projection_dead_letters.",
        "eventoutbox_projection_consumer_lag": "Records in the partition after the consumer's position (label partition).",
        "eventoutbox_projection_apply_duration_seconds": "Time to apply one batch of records in PostgreSQL.",
        // accounts-service
        "http_server_requests_total": "HTTP requests answered, by method, route pattern and status.",
        "http_server_request_duration_seconds": "Time to answer an HTTP request, by method, route pattern and status.",
        // AggregateRepository with an AggregateCache (accounts-service)
        "eventoutbox_aggregate_cache_hits_total": "Commands decided on a cached aggregate state, without a load (label category).",
        "eventoutbox_aggregate_cache_misses_total": "Commands whose aggregate was loaded from the store (not cached).",
        "eventoutbox_aggregate_cache_stale_total": "Cached states the append found out of date (another writer appended); the command was decided again.",
        "eventoutbox_command_conflicts_total": "Commands decided again after a concurrent append took their version.",
    ]

    /// The exposition with a `# HELP` line before each `# TYPE` line whose family has a text.
    public static func adding(to exposition: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(exposition.count + 4096)
        let typePrefix = Array("# TYPE ".utf8)
        for line in exposition.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            if line.starts(with: typePrefix) {
                let name = String(decoding: line.dropFirst(typePrefix.count).prefix { $0 != UInt8(ascii: " ") }, as: UTF8.self)
                if let help = texts[name] {
                    // The text format escapes backslash and newline in help text.
                    let escaped = help.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\n", with: "\\n")
                    out += Array("# HELP \(name) \(escaped)\n".utf8)
                }
            }
            out += line
            out.append(UInt8(ascii: "\n"))
        }
        // The split gives one piece more than there are newlines.
        out.removeLast()
        return out
    }
}
