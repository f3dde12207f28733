/// The toolkit's version: what every executable's `--version` prints and the `version` label of the
/// `eventoutbox_build_info` metric. Changed here only, when a release is cut.
public enum EventOutboxVersion {
    public static let current = "0.9.0"
}
