extension Duration {
    /// Whole milliseconds, clamped to `Int32` (what libpq and librdkafka take): a very long wait waits as long
    /// as they can, never traps; a negative one is 0.
    public var clampedMilliseconds: Int32 {
        let (seconds, attoseconds) = components
        let milliseconds = seconds.multipliedReportingOverflow(by: 1000)
        guard !milliseconds.overflow else { return seconds < 0 ? 0 : .max }
        return Int32(clamping: max(0, milliseconds.partialValue.addingReportingOverflow(attoseconds / 1_000_000_000_000_000).partialValue))
    }

    /// Seconds as a `Double` (for rates and for APIs that take seconds).
    public var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
