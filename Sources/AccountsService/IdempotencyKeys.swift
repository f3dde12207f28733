import EventStore
import Foundation
import PostgresClient

/// The answers to requests that carried an `Idempotency-Key`, in `idempotency_keys`.
///
/// An answer is written by ``record(key:request:status:body:)`` in the transaction of the events the request
/// caused, so a key is recorded if and only if its events are. A retry finds it and gets the same answer; the same
/// key with another request is refused; two requests racing with one key write the events once (the second
/// insert of the key fails, its transaction rolls back, and it then finds the first one's answer).
struct IdempotencyKeys: Sendable {
    let pool: PostgresPool

    /// A stored answer.
    struct Answer: Sendable, Equatable {
        var request: String
        var status: Int
        var body: String
        var location: String?
    }

    static let maxKeyLength = 200

    func find(_ key: String) async throws -> Answer? {
        try await pool.withConnection { connection in
            try await connection.query(
                "SELECT request, status, body, location FROM idempotency_keys WHERE key = $1", [.text(key)], statement: "idempotency: find"
            ).first.map {
                Answer(
                    request: try $0.decode(String.self, "request"), status: try $0.decode(Int.self, "status"),
                    body: try $0.decode(String.self, "body"), location: try $0.decodeIfPresent(String.self, "location"))
            }
        }
    }

    /// The statement that stores an answer, to run with the request's events.
    static func record(key: String, request: String, status: Int, body: String, location: String?) -> TransactionalWrite {
        TransactionalWrite(
            "INSERT INTO idempotency_keys (key, request, status, body, location) VALUES ($1, $2, $3, $4, $5)",
            [.text(key), .text(request), .int(status), .text(body), .text(location)], statement: "idempotency: record")
    }

    /// `true` if `error` is the insert of a key another request recorded first.
    static func isTaken(_ error: any Error) -> Bool {
        (error as? PostgresError)?.constraint == "idempotency_keys_pkey"
    }
}
