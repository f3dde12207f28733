import BankAccount
import EventSourcing
import EventStore
import Foundation
import HTTPTypes
import Hummingbird
import LibPQ

/// An error answer in the form of RFC 9457 (`application/problem+json`).
public struct Problem: Error, Sendable, Equatable {
    public var status: HTTPResponse.Status
    public var title: String
    public var detail: String
    /// A URI naming the kind of problem; `about:blank` when the status says it all.
    public var type: String
    /// Extra members (for a rejected withdrawal: the balance and version it was recorded at).
    public var extra: [String: Int64]
    /// Sent as `Retry-After` (seconds) when set: the client may try again then.
    public var retryAfterSeconds: Int?

    public init(_ status: HTTPResponse.Status, _ title: String, detail: String, type: String = "about:blank", extra: [String: Int64] = [:]) {
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.extra = extra
    }

    /// The answer for an error a handler threw: refusals keep their message; anything unexpected is a 500 that
    /// says what failed without server details (they go to the log).
    static func from(_ error: any Error) -> Problem {
        switch error {
        case let problem as Problem:
            return problem
        case let refusal as BankError:
            switch refusal.kind {
            case .notFound: return Problem(.notFound, "Not found", detail: refusal.message)
            case .refused: return Problem(.unprocessableContent, "Refused", detail: refusal.message, type: "/problems/refused")
            case .invalid: return Problem(.badRequest, "Invalid request", detail: refusal.message)
            }
        case let conflict as ConcurrencyConflict:
            return Problem(
                .conflict, "Concurrent changes", detail: "the account kept changing while the command was retried (\(conflict)); try again")
        case let error as PQError where error.isOverloaded:
            var problem = Problem(
                .serviceUnavailable, "Busy", detail: "the database is too busy to answer in time; nothing was recorded; retry after a second",
                type: "/problems/busy")
            problem.retryAfterSeconds = 1
            return problem
        case let error as PQError where error.isRetriable:
            return Problem(.serviceUnavailable, "Database unavailable", detail: "the database cannot be reached right now; try again")
        default:
            return Problem(.internalServerError, "Internal error", detail: "the request failed on the server; nothing was recorded unless its answer said so")
        }
    }

    var jsonBody: [UInt8] {
        var members: [(String, String)] = [
            ("type", JSONText.string(type)), ("title", JSONText.string(title)), ("status", String(status.code)),
            ("detail", JSONText.string(detail)),
        ]
        for (key, value) in extra.sorted(by: { $0.key < $1.key }) { members.append((key, String(value))) }
        return Array(JSONText.object(members.map { (key: $0.0, json: $0.1) }).utf8)
    }

    var response: Response {
        var headers: HTTPFields = [.contentType: "application/problem+json"]
        // RFC 6750: a 401 names the scheme the client must use.
        if status == .unauthorized { headers[.wwwAuthenticate] = #"Bearer realm="accounts", error="invalid_token""# }
        if let retryAfterSeconds { headers[.retryAfter] = String(retryAfterSeconds) }
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: jsonBody)))
    }
}
