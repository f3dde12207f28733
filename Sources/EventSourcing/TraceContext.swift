import Tracing

/// Trace context in the W3C form events carry (`EventMetadata.traceparent`, the Kafka `traceparent` header), through
/// whichever tracer the process installed (`InstrumentationSystem`; none by default, and then nothing is recorded).
public enum TraceContext {
    /// The `traceparent` of `context` as the installed tracer writes it; `nil` when it writes none.
    public static func traceparent(of context: ServiceContext) -> String? {
        var carrier: [String: String] = [:]
        InstrumentationSystem.instrument.inject(context, into: &carrier, using: DictionaryInjector())
        return carrier["traceparent"]
    }

    /// A context that continues the trace `traceparent` names (the top level when it is `nil` or not understood).
    public static func context(continuing traceparent: String?) -> ServiceContext {
        var context = ServiceContext.topLevel
        if let traceparent {
            InstrumentationSystem.instrument.extract(["traceparent": traceparent], into: &context, using: DictionaryExtractor())
        }
        return context
    }
}

private struct DictionaryInjector: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout [String: String]) { carrier[key] = value }
}

private struct DictionaryExtractor: Extractor {
    func extract(key: String, from carrier: [String: String]) -> String? { carrier[key] }
}
