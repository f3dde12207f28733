import EventSourcing
import Foundation
import Logging
import Synchronization

/// How the long-running executables write their log.
public enum LogFormat: String, Sendable, CaseIterable {
    /// swift-log's text lines, for people.
    case text
    /// One JSON object a line, for log pipelines (Loki, Elasticsearch, Cloud Logging).
    case json

    /// `--log-format`, else `EVENTOUTBOX_LOG_FORMAT`, else text.
    /// - Throws: `LogFormatError` naming the value when it is neither.
    public static func resolve(_ option: String?) throws -> LogFormat {
        let value = option ?? ProcessInfo.processInfo.environment["EVENTOUTBOX_LOG_FORMAT"] ?? "text"
        guard let format = LogFormat(rawValue: value) else { throw LogFormatError(value: value) }
        return format
    }
}

public struct LogFormatError: Error, CustomStringConvertible, Sendable {
    public var value: String
    public var description: String { "the log format is 'text' or 'json', not '\(value)' (--log-format or EVENTOUTBOX_LOG_FORMAT)" }
}

/// Writes each log record to standard error as one JSON object on one line: `time` (ISO 8601, UTC,
/// microseconds), `level`, `logger` (the label), `message`, `source`, the metadata as string members, and
/// `trace_id`/`span_id` taken from a `traceparent` in the metadata (W3C), so that a log line joins its trace.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    let label: String

    public init(label: String, metadataProvider: Logger.MetadataProvider? = nil) {
        self.label = label
        self.metadataProvider = metadataProvider
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { $1 } }
        if let extra = event.metadata { all.merge(extra) { $1 } }
        let line = Self.line(label: label, level: event.level, message: "\(event.message)", metadata: all, source: event.source, at: Date())
        JSONLogHandler.output.withLock { _ in FileHandle.standardError.write(Data((line + "\n").utf8)) }
    }

    /// One record as its JSON line (without the newline).
    public static func line(
        label: String, level: Logger.Level, message: String, metadata: Logger.Metadata, source: String, at date: Date
    ) -> String {
        var members: [(key: String, json: String)] = [
            ("time", JSONText.string(ISOTimestamp.format(date))), ("level", JSONText.string(level.rawValue)),
            ("logger", JSONText.string(label)), ("message", JSONText.string(message)), ("source", JSONText.string(source)),
        ]
        if case .string(let traceparent)? = metadata["traceparent"] {
            let parts = traceparent.split(separator: "-")
            if parts.count == 4, parts[1].count == 32, parts[2].count == 16 {
                members.append(("trace_id", JSONText.string(String(parts[1]))))
                members.append(("span_id", JSONText.string(String(parts[2]))))
            }
        }
        let reserved: Set = ["time", "level", "logger", "message", "source", "trace_id", "span_id"]
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) where !reserved.contains(key) {
            members.append((key, JSONText.string("\(value)")))
        }
        return JSONText.object(members)
    }

    /// Lines from concurrent loggers must not interleave.
    private static let output = Mutex<Void>(())
}
