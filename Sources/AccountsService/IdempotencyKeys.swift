import EventStore
import Foundation
import LibPQ

/// The service's own table, `idempotency_keys`: the `SchemaModule` named `accounts-service`, which
/// `accounts-service` applies when it starts (after `eventoutbox migrate` made the event store's).
public enum AccountsServiceSchema {
    public static let module = SchemaModule("accounts-service", migrations: [
        SchemaMigration(
            version: 1, name: "idempotency keys",
            sql: """
                -- A service's answer to a request that carried an Idempotency-Key, written in the transaction of
                -- the events it caused: a retry with the same key gets the same answer and writes nothing.
                CREATE TABLE idempotency_keys (
                    key          text        PRIMARY KEY,
                    -- The request in a canonical form (method, path, decoded body): the same key with another
                    -- request is refused.
                    request      text        NOT NULL,
                    status       int         NOT NULL,
                    body         text        NOT NULL,
                    location     text,
                    created_at   timestamptz NOT NULL DEFAULT now()
                );
                """),
        SchemaMigration(
            version: 2, name: "idempotency keys per caller, with expiry",
            sql: """
                -- A key is the caller's own (the token's subject; '' without authentication): another caller's
                -- same key is another request. Answers expire (accounts-service --idempotency-key-lifetime).
                ALTER TABLE idempotency_keys ADD COLUMN caller text NOT NULL DEFAULT '';
                ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
                ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (caller, key);
                CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
                """),
    ])
}

/// The answers to requests that carried an `Idempotency-Key`, in `idempotency_keys`.
///
/// Keys are per caller (the token's subject; empty without authentication) and live for a configurable time.
/// An answer is written by ``record(key:caller:request:status:body:location:)`` in the transaction of the events the request
/// caused, so a key is recorded if and only if its events are. A retry finds it and gets the same answer; the same
/// key with another request is refused; two requests racing with one key write the events once (the second
/// insert of the key fails, its transaction rolls back, and it then finds the first one's answer).
struct IdempotencyKeys: Sendable {
    let pool: PQPool
    /// How long an answer is replayed; older keys are free again (and deleted as new ones are recorded).
    let lifetime: Duration

    /// A stored answer.
    struct Answer: Sendable, Equatable {
        var request: String
        var status: Int
        var body: String
        var location: String?
    }

    static let maxKeyLength = 200

    private var lifetimeSeconds: Int64 { max(lifetime.components.seconds, 1) }

    /// The answer stored for `caller`'s `key` within its lifetime (`caller` is empty without authentication).
    func find(_ key: String, caller: String) async throws -> Answer? {
        try await pool.withConnection { connection in
            try await connection.query(
                "SELECT request, status, body, location FROM idempotency_keys WHERE caller = $1 AND key = $2 "
                    + "AND created_at > now() - $3::bigint * interval '1 second'",
                [.text(caller), .text(key), .int64(lifetimeSeconds)], statement: "idempotency: find"
            ).first.map {
                Answer(
                    request: try $0.decode(String.self, "request"), status: try $0.decode(Int.self, "status"),
                    body: try $0.decode(String.self, "body"), location: try $0.decodeIfPresent(String.self, "location"))
            }
        }
    }

    /// The statements that store an answer, to run with the request's events: the key's expired answer (if
    /// any) and up to 100 other expired ones are deleted first, so that expired keys do not pile up.
    func record(key: String, caller: String, request: String, status: Int, body: String, location: String?) -> [TransactionalWrite] {
        [
            TransactionalWrite(
                "DELETE FROM idempotency_keys WHERE (caller = $1 AND key = $2 AND created_at <= now() - $3::bigint * interval '1 second') "
                    + "OR ctid IN (SELECT ctid FROM idempotency_keys WHERE created_at <= now() - $3::bigint * interval '1 second' LIMIT 100)",
                [.text(caller), .text(key), .int64(lifetimeSeconds)], statement: "idempotency: expire"),
            TransactionalWrite(
                "INSERT INTO idempotency_keys (caller, key, request, status, body, location) VALUES ($1, $2, $3, $4, $5, $6)",
                [.text(caller), .text(key), .text(request), .int(status), .text(body), .text(location)], statement: "idempotency: record"),
        ]
    }

    /// `true` if `error` is the insert of a key another request recorded first.
    static func isTaken(_ error: any Error) -> Bool {
        (error as? PQError)?.constraint == "idempotency_keys_pkey"
    }
}
