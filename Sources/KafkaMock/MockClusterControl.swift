import CRdKafka
import KafkaClient

/// One fault-injection command for a ``MockCluster``, as typed on `kafka-mock-cluster --control`:
///
/// ```
/// broker 2 down        broker 2 up          all down       all up
/// errors Produce 5 NOT_LEADER_FOR_PARTITION                clear Produce
/// rtt 2 200ms          rtt 2 0ms
/// ```
public enum MockClusterCommand: Sendable, Equatable {
    case brokerDown(Int32)
    case brokerUp(Int32)
    case allDown
    case allUp
    /// The next `count` requests of `api` fail with `code`.
    case errors(KafkaAPI, count: Int, code: KafkaError.Code)
    case clearErrors(KafkaAPI)
    /// Delays every response of a broker by this many milliseconds (0: none).
    case roundTrip(broker: Int32, milliseconds: Int32)

    /// The commands' syntax, for `--help` and error messages.
    public static let syntax = """
        broker N down | broker N up | all down | all up | errors API COUNT ERROR_NAME | clear API | rtt N MILLISECONDSms
        (API: \(KafkaAPI.named.keys.sorted().joined(separator: ", ")); ERROR_NAME: librdkafka's, e.g. NOT_LEADER_FOR_PARTITION)
        """

    /// Parses one line; the error says what is wrong and how a command looks.
    public init(parsing line: String) throws(MockClusterCommandError) {
        let words = line.split(whereSeparator: \.isWhitespace).map(String.init)
        func broker(_ text: String) throws(MockClusterCommandError) -> Int32 {
            guard let id = Int32(text), id >= 1 else { throw MockClusterCommandError(line: line, reason: "'\(text)' is not a broker id (1, 2, ...)") }
            return id
        }
        func api(_ text: String) throws(MockClusterCommandError) -> KafkaAPI {
            guard let api = KafkaAPI.named[text.lowercased()] else {
                throw MockClusterCommandError(line: line, reason: "unknown API '\(text)'")
            }
            return api
        }
        switch words.map({ $0.lowercased() }) {
        case let w where w.count == 3 && w[0] == "broker" && w[2] == "down": self = .brokerDown(try broker(words[1]))
        case let w where w.count == 3 && w[0] == "broker" && w[2] == "up": self = .brokerUp(try broker(words[1]))
        case ["all", "down"]: self = .allDown
        case ["all", "up"]: self = .allUp
        case let w where w.count == 4 && w[0] == "errors":
            guard let count = Int(words[2]), (1...10_000).contains(count) else {
                throw MockClusterCommandError(line: line, reason: "'\(words[2])' is not a count from 1 to 10000")
            }
            guard let code = KafkaError.Code(named: words[3]) else {
                throw MockClusterCommandError(line: line, reason: "unknown error name '\(words[3])'")
            }
            self = .errors(try api(words[1]), count: count, code: code)
        case let w where w.count == 2 && w[0] == "clear": self = .clearErrors(try api(words[1]))
        case let w where w.count == 3 && w[0] == "rtt":
            let text = w[2].hasSuffix("ms") ? String(w[2].dropLast(2)) : w[2]
            guard let milliseconds = Int32(text), milliseconds >= 0 else {
                throw MockClusterCommandError(line: line, reason: "'\(words[2])' is not a delay like 200ms")
            }
            self = .roundTrip(broker: try broker(words[1]), milliseconds: milliseconds)
        default:
            throw MockClusterCommandError(line: line, reason: "not a command")
        }
    }
}

/// A control line that is not a command.
public struct MockClusterCommandError: Error, CustomStringConvertible, Sendable, Equatable {
    public var line: String
    public var reason: String
    public var description: String { "cannot run '\(line)': \(reason); commands: \(MockClusterCommand.syntax)" }
}

extension MockCluster {
    /// Carries out a control command.
    public func apply(_ command: MockClusterCommand) throws {
        switch command {
        case .brokerDown(let id): try setBrokerDown(id)
        case .brokerUp(let id): try setBrokerUp(id)
        case .allDown: try setAllBrokersDown()
        case .allUp: try setAllBrokersUp()
        case .errors(let api, let count, let code): pushRequestErrors(api, Array(repeating: code, count: count))
        case .clearErrors(let api): clearRequestErrors(api)
        case .roundTrip(let broker, let milliseconds): try setRoundTrip(broker: broker, milliseconds: milliseconds)
        }
    }
}

extension KafkaAPI {
    /// Request kinds by lower-cased name, for commands typed by people.
    public static let named: [String: KafkaAPI] = [
        "produce": .produce, "fetch": .fetch, "listoffsets": .listOffsets, "metadata": .metadata,
        "offsetcommit": .offsetCommit, "offsetfetch": .offsetFetch, "findcoordinator": .findCoordinator,
        "joingroup": .joinGroup, "heartbeat": .heartbeat, "initproducerid": .initProducerID,
    ]
}

extension KafkaError.Code {
    /// The code librdkafka calls `name` (e.g. `NOT_LEADER_FOR_PARTITION`, `_TRANSPORT`), if any.
    public init?(named name: String) {
        var descriptions: UnsafePointer<rd_kafka_err_desc>?
        var count = 0
        rd_kafka_get_err_descs(&descriptions, &count)
        guard let descriptions else { return nil }
        for index in 0..<count {
            let description = descriptions[index]
            guard let cName = description.name, String(cString: cName).uppercased() == name.uppercased() else { continue }
            self.init(rawValue: description.code.rawValue)
            return
        }
        return nil
    }
}
