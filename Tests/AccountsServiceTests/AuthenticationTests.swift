@testable import AccountsService
import BankAccount
import EventSourcing
import EventStore
import Foundation
import LibPQ
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import TestSupport
import Testing

@Suite("accounts-service: bearer tokens, ownership, the caller as actor, idempotency keys per caller (real PostgreSQL)")
struct AuthenticationTests {
    static let secret = Array("a development secret of more than thirty-two bytes".utf8)

    func bearer(_ token: String) -> [String: String] { ["Authorization": "Bearer \(token)"] }

    @Test("no token, a malformed, forged or expired one: 401 problem+json with WWW-Authenticate; nothing written")
    func unauthorized() async throws {
        let authentication = try await CallerAuthentication.hs256(secret: Self.secret)
        let forged = try await CallerAuthentication.hs256(secret: Array("another secret, also longer than 32 bytes!".utf8))
        let service = try await Service.start(authentication: authentication)
        let expired = try await authentication.mint(subject: "alice", expiresIn: .seconds(-60))
        let cases: [(String, [String: String])] = [
            ("none", [:]),
            ("not bearer", ["Authorization": "Basic YWxpY2U6cHc="]),
            ("malformed", bearer("not.a.jwt")),
            ("forged", bearer(try await forged.mint(subject: "alice"))),
            ("expired", bearer(expired)),
            ("empty subject", bearer(try await authentication.mint(subject: ""))),
        ]
        for (name, headers) in cases {
            for (method, path, body) in [("POST", "/accounts", #"{"owner": "X"}"#), ("GET", "/accounts/x", nil), ("GET", "/accounts/x/history", nil)] {
                let reply = try await service.send(method, path, body, headers: headers)
                #expect(reply.status == 401, "\(name) \(method) \(path): \(reply.status) \(reply.body)")
                #expect(reply.header("Content-Type") == "application/problem+json")
                #expect(reply.header("WWW-Authenticate")?.hasPrefix("Bearer") == true, "\(name)")
                #expect(reply.json["type"] as? String == "/problems/unauthorized")
            }
        }
        #expect(try await service.send("GET", "/health/ready").status == 200, "probes need no token")
        #expect(try await service.events() == 0)
        try await service.stop()
    }

    @Test("an account belongs to the subject that opened it: others get 404, accounts:admin may act on any; the events' actor is the caller")
    func ownership() async throws {
        let authentication = try await CallerAuthentication.hs256(secret: Self.secret)
        let service = try await Service.start(authentication: authentication)
        let alice = bearer(try await authentication.mint(subject: "alice"))
        let bob = bearer(try await authentication.mint(subject: "bob"))
        let admin = bearer(try await authentication.mint(subject: "ops-1", scope: "openid accounts:admin"))
        let opened = try await service.send("POST", "/accounts", #"{"owner": "Alice", "initialDeposit": 100}"#, headers: alice)
        #expect(opened.status == 201)
        let id = try #require(opened.json["id"] as? String)
        #expect(try await service.send("POST", "/accounts/\(id)/deposits", #"{"amount": 5}"#, headers: alice).status == 200)
        for (method, path, body) in [
            ("GET", "/accounts/\(id)", nil), ("GET", "/accounts/\(id)/history", nil),
            ("POST", "/accounts/\(id)/deposits", #"{"amount": 1}"#), ("POST", "/accounts/\(id)/withdrawals", #"{"amount": 1}"#),
        ] {
            let reply = try await service.send(method, path, body, headers: bob)
            #expect(reply.status == 404, "bob \(method) \(path): \(reply.status)")
            #expect((reply.json["detail"] as? String)?.contains("no account") == true, "the same answer as for an account that does not exist")
        }
        // The opener of an account opened here is known: no request above asked the database who it was.
        #expect(service.api.openers.databaseLookUps == 0)
        #expect(try await service.send("GET", "/accounts/\(id)", headers: admin).json["balance"] as? Int == 105)
        #expect(try await service.send("POST", "/accounts/\(id)/withdrawals", #"{"amount": 5}"#, headers: admin).status == 200)
        let actors = try await service.test.store.readStream(id).map(\.metadata.actor)
        #expect(actors == ["alice", "alice", "ops-1"], "the audit trail says who")
        try await service.stop()
    }

    @Test("an opener is looked up once and then known (events are append-only); a missing account is looked up each time; bounded")
    func openersAreLookedUpOnce() async throws {
        let openers = AccountOpeners(capacity: 3)
        var calls = 0
        for _ in 0..<3 {
            #expect(try await openers.opener(of: "a") { calls += 1; return "alice" } == "alice")
        }
        #expect(calls == 1)
        for _ in 0..<2 { #expect(try await openers.opener(of: "missing") { nil } == nil) }
        #expect(openers.databaseLookUps == 3)
        for n in 0..<10 { openers.remember("s\(n)", openedBy: "bob") }
        // Past its capacity the map starts again: "a" is looked up anew, and found as before.
        #expect(try await openers.opener(of: "a") { "alice" } == "alice")
        #expect(openers.databaseLookUps == 4)
    }

    @Test("Idempotency-Key: a caller's own (another's same key is another request), expired after its lifetime, one header only")
    func idempotencyKeysPerCaller() async throws {
        let authentication = try await CallerAuthentication.hs256(secret: Self.secret)
        let service = try await Service.start(authentication: authentication, idempotencyKeyLifetime: .seconds(3600))
        let alice = bearer(try await authentication.mint(subject: "alice"))
        let bob = bearer(try await authentication.mint(subject: "bob"))
        let first = try await service.send("POST", "/accounts", #"{"owner": "A"}"#, headers: alice.merging(["Idempotency-Key": "k1"]) { $1 })
        let again = try await service.send("POST", "/accounts", #"{"owner": "A"}"#, headers: alice.merging(["Idempotency-Key": "k1"]) { $1 })
        #expect(again.header("Idempotent-Replayed") == "true" && again.body == first.body)
        // Bob's k1 is his own: not alice's answer.
        let bobs = try await service.send("POST", "/accounts", #"{"owner": "A"}"#, headers: bob.merging(["Idempotency-Key": "k1"]) { $1 })
        #expect(bobs.status == 201 && bobs.header("Idempotent-Replayed") == nil && bobs.json["id"] as? String != first.json["id"] as? String)
        #expect(try await service.events("AccountOpened") == 2)
        // Past its lifetime, a key is free again: the same request runs anew.
        _ = try await service.test.pool.withConnection {
            try await $0.execute("UPDATE idempotency_keys SET created_at = now() - interval '2 hours' WHERE caller = 'alice'")
        }
        let later = try await service.send("POST", "/accounts", #"{"owner": "A"}"#, headers: alice.merging(["Idempotency-Key": "k1"]) { $1 })
        #expect(later.status == 201 && later.header("Idempotent-Replayed") == nil)
        #expect(try await service.events("AccountOpened") == 3)
        #expect(try await service.test.count("SELECT count(*) FROM idempotency_keys WHERE caller = 'alice'") == 1, "the expired answer was replaced")
        // Two Idempotency-Key headers: refused, nothing written (curl sends them as two header lines).
        let curl = try await Tools.command([
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "http://127.0.0.1:\(service.port)/accounts",
            "-H", "Authorization: \(alice["Authorization"]!)", "-H", "Content-Type: application/json",
            "-H", "Idempotency-Key: k2", "-H", "Idempotency-Key: k3", "-d", #"{"owner": "B"}"#,
        ], in: URL(fileURLWithPath: "/tmp"))
        #expect(curl.output == "400")
        #expect(try await service.events("AccountOpened") == 3)
        try await service.stop()
    }

    @Test("accounts-service --mint-token prints a token the service accepts; a secret under 32 bytes is refused")
    func mintToken() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("jwt"))
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let file = directory.appendingPathComponent("secret")
        try Data(Self.secret + [0x0a]).write(to: file)
        let minted = try await Tools.run("accounts-service", ["--jwt-secret-file", file.path, "--mint-token", "kim", "--token-scope", "accounts:admin"])
        #expect(minted.status == 0, "\(minted.stderr)")
        let token = minted.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let authentication = try await CallerAuthentication.hs256(secret: Self.secret)
        let service = try await Service.start(authentication: authentication)
        let opened = try await service.send("POST", "/accounts", #"{"owner": "Kim"}"#, headers: bearer(token))
        #expect(opened.status == 201)
        try Data("short".utf8).write(to: file)
        let refused = try await Tools.run("accounts-service", ["--jwt-secret-file", file.path, "--mint-token", "kim"])
        #expect(refused.status == 64 && refused.stderr.contains("at least 32"), "\(refused.stderr)")
        try? FileManager.default.removeItem(at: directory)
        try await service.stop()
    }
}
