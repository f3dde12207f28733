import EventStore

/// The toolkit's schema modules, in the order `eventoutbox migrate` applies them: the event store's
/// (`events`, `snapshots`, `outbox`) and the relay's (`outbox_dead_letters`).
///
/// A service of your own adds its modules to the same migrator:
///
/// ```swift
/// try await SchemaMigrator(EventOutboxSchema.modules + [orders]).migrate(pool)
/// ```
public enum EventOutboxSchema {
    public static let modules: [SchemaModule] = [EventStoreSchema.module, OutboxRelaySchema.module]
}
