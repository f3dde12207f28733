import AccountsService
import BankAccount
import EventSourcing
import EventStore
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Hummingbird
import LibPQ
import TestSupport
import Testing

/// The service on a test schema, listening on a port of its own, and a client for it.
/// An API whose database does not answer: its readiness says "not ready" and nothing else.
@Test("/health/ready on the API port: 503 'not ready', without the connection string, host or password")
func readinessSaysNothingMore() async throws {
    let secret = "Zq7Secret"
    let pool = PQPool(url: "postgresql://app@127.0.0.1:1/app?passwor%64=\(secret)&connect_timeout=2", maxConnections: 1)
    let api = AccountsAPI(bank: Bank(store: EventStore(pool: pool)))
    let port = testPort()
    let app = Application(router: api.makeRouter(), configuration: .init(address: .hostname("127.0.0.1", port: port)))
    let task = Task { try await app.run() }
    defer { task.cancel() }
    var reply: (Data, URLResponse)?
    try await waitUntil("the API answers") {
        reply = try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/health/ready")!)
        return reply != nil
    }
    let (body, response) = try #require(reply)
    let text = String(decoding: body, as: UTF8.self)
    #expect((response as? HTTPURLResponse)?.statusCode == 503)
    #expect(text.contains("not ready"), "\(text)")
    for leak in [secret, "127.0.0.1", "passwor", "connect", "refused"] { #expect(!text.contains(leak), "\(leak) in \(text)") }
    await pool.close()
}

struct Service {
    let test: TestEventStore
    let api: AccountsAPI
    let port: Int
    let task: Task<Void, any Error>

    static func start(
        authentication: CallerAuthentication = .disabled, idempotencyKeyLifetime: Duration = .seconds(86_400)
    ) async throws -> Service {
        let test = try await TestEventStore.create(maxConnections: 8, modules: [AccountsServiceSchema.module])
        let api = AccountsAPI(
            bank: Bank(store: test.store), authentication: authentication, idempotencyKeyLifetime: idempotencyKeyLifetime)
        let port = testPort()
        let app = Application(router: api.makeRouter(), configuration: .init(address: .hostname("127.0.0.1", port: port)))
        let task = Task { try await app.run() }
        let service = Service(test: test, api: api, port: port, task: task)
        try await waitUntil("the service answers") { (try? await service.send("GET", "/health/live").status) == 200 }
        return service
    }

    struct Reply {
        var status: Int
        var headers: [String: String]
        var body: String
        var json: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any] ?? [:] }
        func header(_ name: String) -> String? { headers.first { $0.key.lowercased() == name.lowercased() }?.value }
    }

    func send(_ method: String, _ path: String, _ body: String? = nil, headers: [String: String] = [:]) async throws -> Reply {
        var request = URLRequest(url: URL(string: "http://127.0.0.1:\(port)\(path)")!)
        request.httpMethod = method
        request.httpBody = body.map { Data($0.utf8) }
        if body != nil { request.setValue("application/json", forHTTPHeaderField: "Content-Type") }
        for (name, value) in headers { request.setValue(value, forHTTPHeaderField: name) }
        let (data, response) = try await URLSession.shared.data(for: request)
        let http = response as! HTTPURLResponse
        var fields: [String: String] = [:]
        for (name, value) in http.allHeaderFields { fields["\(name)"] = "\(value)" }
        return Reply(status: http.statusCode, headers: fields, body: String(decoding: data, as: UTF8.self))
    }

    func events(_ type: String? = nil) async throws -> Int {
        try await test.count(
            "SELECT count(*) FROM events WHERE $1::text IS NULL OR event_type = $1", [.text(type)])
    }

    func stop() async throws {
        task.cancel()
        _ = await task.result
        try await test.drop()
    }
}

@Suite("accounts-service over HTTP (real PostgreSQL)")
struct AccountsServiceTests {
    @Test("open, deposit, withdraw, a rejected withdrawal (422, recorded), time travel and history")
    func story() async throws {
        let service = try await Service.start()
        let opened = try await service.send("POST", "/accounts", #"{"owner": "Kim", "initialDeposit": 100}"#)
        #expect(opened.status == 201)
        let id = try #require(opened.json["id"] as? String)
        #expect(opened.header("Location") == "/accounts/\(id)")
        #expect(opened.json["balance"] as? Int == 100 && opened.json["version"] as? Int == 1)
        let deposited = try await service.send("POST", "/accounts/\(id)/deposits", #"{"amount": 250, "description": "salary"}"#)
        #expect(deposited.status == 200 && deposited.json["balance"] as? Int == 350 && deposited.json["version"] as? Int == 2)
        let withdrawn = try await service.send("POST", "/accounts/\(id)/withdrawals", #"{"amount": 50}"#)
        #expect(withdrawn.status == 200 && withdrawn.json["balance"] as? Int == 300)
        let rejected = try await service.send("POST", "/accounts/\(id)/withdrawals", #"{"amount": 1000}"#)
        #expect(rejected.status == 422)
        #expect(rejected.header("Content-Type") == "application/problem+json")
        #expect(rejected.json["type"] as? String == "/problems/insufficient-funds")
        #expect((rejected.json["detail"] as? String)?.contains("insufficient funds") == true)
        #expect(rejected.json["balance"] as? Int == 300 && rejected.json["version"] as? Int == 4)
        #expect(try await service.events("WithdrawalRejected") == 1)

        let now = try await service.send("GET", "/accounts/\(id)")
        #expect(now.status == 200 && now.json["balance"] as? Int == 300 && now.json["owner"] as? String == "Kim" && now.json["version"] as? Int == 4)
        let first = try await service.send("GET", "/accounts/\(id)?version=1")
        #expect(first.json["balance"] as? Int == 100 && first.json["version"] as? Int == 1)
        let times = try await service.test.store.readStream(id).map(\.occurredAt)
        let atSecond = try await service.send("GET", "/accounts/\(id)?at=\(ISOTimestamp.format(times[1]))")
        #expect(atSecond.json["balance"] as? Int == 350)
        let history = try await service.send("GET", "/accounts/\(id)/history")
        let events = try #require(history.json["events"] as? [[String: Any]])
        #expect(events.map { $0["type"] as? String } == ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn", "WithdrawalRejected"])
        #expect((events[1]["payload"] as? [String: Any])?["description"] as? String == "salary")
        #expect(try await service.send("GET", "/health/ready").status == 200)
        try await service.stop()
    }

    @Test("bad input gets a problem+json answer and writes nothing")
    func badInput() async throws {
        let service = try await Service.start()
        let id = try #require(try await service.send("POST", "/accounts", #"{"owner": "Lee"}"#).json["id"] as? String)
        let cases: [(String, String, String?, Int)] = [
            ("POST", "/accounts", "{not json", 400),
            ("POST", "/accounts", #"{"initialDeposit": 5}"#, 400),
            ("POST", "/accounts", #"{"owner": "   "}"#, 400),
            ("POST", "/accounts", #"{"owner": "X", "initialDeposit": -1}"#, 400),
            ("POST", "/accounts/\(id)/deposits", #"{"amount": "ten"}"#, 400),
            ("POST", "/accounts/\(id)/deposits", #"{"amount": 1.5}"#, 400),
            ("POST", "/accounts/\(id)/deposits", #"{"amount": 0}"#, 400),
            ("POST", "/accounts/\(id)/deposits", #"{"amount": -5}"#, 400),
            ("POST", "/accounts/\(id)/deposits", #"{"amount": 100000000000000000000000}"#, 400),
            ("POST", "/accounts/\(id)/withdrawals", "", 400),
            ("POST", "/accounts/nope/deposits", #"{"amount": 5}"#, 404),
            ("POST", "/accounts/%27%22%3B%20DROP%20TABLE%20events%3B--/withdrawals", #"{"amount": 5}"#, 404),
            ("GET", "/accounts/nope", nil, 404),
            ("GET", "/accounts/nope/history", nil, 404),
            ("GET", "/accounts/\(id)?version=abc", nil, 400),
            ("GET", "/accounts/\(id)?version=99", nil, 404),
            ("GET", "/accounts/\(id)?version=0", nil, 400),
            ("GET", "/accounts/\(id)?at=yesterday", nil, 400),
            ("GET", "/accounts/\(id)?version=1&at=2026-11-25T00:00:00Z", nil, 400),
            ("POST", "/accounts/\(id)/deposits", "{\"amount\": 5, \"description\": \"" + String(repeating: "x", count: 70_000) + "\"}", 413),
        ]
        for (method, path, body, status) in cases {
            let reply = try await service.send(method, path, body)
            #expect(reply.status == status, "\(method) \(path.prefix(60)) \(body?.prefix(60) ?? ""): \(reply.status) \(reply.body.prefix(200))")
            #expect(reply.header("Content-Type") == "application/problem+json", "\(method) \(path.prefix(60))")
            #expect(reply.json["status"] as? Int == status && (reply.json["detail"] as? String)?.isEmpty == false)
        }
        #expect(try await service.events() == 1, "only the opening was recorded")
        // The largest balance opens; a deposit on top is well-formed but refused (422) before anything is written.
        let big = try #require(
            try await service.send("POST", "/accounts", #"{"owner": "Big", "initialDeposit": 9223372036854775807}"#).json["id"] as? String)
        let refused = try await service.send("POST", "/accounts/\(big)/deposits", #"{"amount": 1}"#)
        #expect(refused.status == 422 && refused.json["type"] as? String == "/problems/refused", "\(refused.body)")
        #expect(try await service.events() == 2)
        try await service.stop()
    }

    @Test("Idempotency-Key: a retry gets the first answer and writes nothing; another request with the key gets 422")
    func idempotency() async throws {
        let service = try await Service.start()
        let open = #"{"owner": "Idem", "initialDeposit": 10}"#
        let first = try await service.send("POST", "/accounts", open, headers: ["Idempotency-Key": "open-1"])
        let again = try await service.send("POST", "/accounts", open, headers: ["Idempotency-Key": "open-1"])
        #expect(first.status == 201 && again.status == 201)
        #expect(again.body == first.body && again.header("Location") == first.header("Location"))
        #expect(again.header("Idempotent-Replayed") == "true" && first.header("Idempotent-Replayed") == nil)
        #expect(try await service.events("AccountOpened") == 1)
        let id = try #require(first.json["id"] as? String)

        let other = try await service.send("POST", "/accounts", #"{"owner": "Other"}"#, headers: ["Idempotency-Key": "open-1"])
        #expect(other.status == 422 && (other.json["title"] as? String) == "Idempotency-Key reused")

        // Ten clients send the same deposit with one key at once: one deposit, ten equal answers.
        let replies = try await withThrowingTaskGroup(of: Service.Reply.self) { group in
            for _ in 0..<10 {
                group.addTask { try await service.send("POST", "/accounts/\(id)/deposits", #"{"amount": 7}"#, headers: ["Idempotency-Key": "dep-1"]) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(Set(replies.map(\.status)) == [200])
        #expect(Set(replies.map(\.body)).count == 1)
        #expect(try await service.events("MoneyDeposited") == 1)
        #expect(try await service.send("GET", "/accounts/\(id)").json["balance"] as? Int == 17)

        // A refused withdrawal is an answer too: replayed, recorded once.
        for _ in 0..<2 {
            let refused = try await service.send("POST", "/accounts/\(id)/withdrawals", #"{"amount": 1000}"#, headers: ["Idempotency-Key": "wd-1"])
            #expect(refused.status == 422 && refused.header("Content-Type") == "application/problem+json")
        }
        #expect(try await service.events("WithdrawalRejected") == 1)
        // A request refused before writing anything stores no answer: fixed, the same key then works.
        #expect(try await service.send("POST", "/accounts/\(id)/deposits", #"{"amount": 0}"#, headers: ["Idempotency-Key": "dep-2"]).status == 400)
        #expect(try await service.send("POST", "/accounts/\(id)/deposits", #"{"amount": 1}"#, headers: ["Idempotency-Key": "dep-2"]).status == 200)
        let badKey = try await service.send("POST", "/accounts/\(id)/deposits", #"{"amount": 1}"#, headers: ["Idempotency-Key": String(repeating: "k", count: 300)])
        #expect(badKey.status == 400)
        try await service.stop()
    }

    @Test("openapi.yaml describes exactly the routes served, and each of them answers")
    func openAPIMatchesRoutes() async throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let spec = try String(contentsOf: root.appendingPathComponent("openapi.yaml"), encoding: .utf8)
        var documented: Set<String> = []
        var path: String?
        var inPaths = false
        for line in spec.split(separator: "\n", omittingEmptySubsequences: false) {
            if line == "paths:" { inPaths = true; continue }
            if inPaths, let first = line.first, first != " " { inPaths = false }
            guard inPaths else { continue }
            if line.hasPrefix("  /"), line.hasSuffix(":") { path = String(line.dropFirst(2).dropLast()) }
            for method in ["get", "post", "put", "patch", "delete"] where line == "    \(method):" {
                documented.insert("\(method.uppercased()) \(path!)")
            }
        }
        #expect(documented == Set(AccountsAPI.routes.map(\.description)))
        let service = try await Service.start()
        for route in AccountsAPI.routes {
            let reply = try await service.send(route.method, route.path.replacingOccurrences(of: "{id}", with: "no-such-account"), route.method == "POST" ? "{}" : nil)
            // Served by the route (JSON or a problem), not the router's bare 404 for an unknown path.
            #expect(reply.header("Content-Type")?.hasPrefix("application/") == true, "\(route): \(reply.status) \(reply.body)")
        }
        try await service.stop()
    }

    @Test("accounts-service --help explains itself; it refuses to start on a database without the tables")
    func executable() async throws {
        let help = try await Tools.run("accounts-service", ["--help"])
        #expect(help.status == 0 && help.stdout.contains("Idempotency-Key") && help.stdout.contains("openapi.yaml"))
        let schema = try await TestSchema.create("bare")
        let refused = try await Tools.run("accounts-service", ["--insecure-no-auth", "--port", "0"], environment: ["EVENTOUTBOX_DATABASE_URL": schema.url])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("eventoutbox migrate"), "\(refused.stderr)")
        #expect(refused.stderr.contains("event-store 1 (events, outbox, snapshots)"), "names what is missing: \(refused.stderr)")
        try await schema.drop()

        // Running: the API on one port, metrics and probes on another; SIGTERM stops it with status 0.
        let test = try await TestEventStore.create()
        let (port, metricsPort) = (testPort(), testPort())
        let log = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("accounts-service") + ".log")
        let service = try Tools.start(
            "accounts-service", ["--insecure-no-auth", "--port", String(port), "--metrics-port", String(metricsPort)],
            environment: ["EVENTOUTBOX_DATABASE_URL": test.schema.url], output: log)
        defer { if service.isRunning { kill(service.processIdentifier, SIGKILL) } }
        do {
            try await waitUntil("the service and its operations endpoint answer", timeout: .seconds(60)) {
                guard service.isRunning else { return true }
                let api = try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/health/ready")!)
                let ready = try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(metricsPort)/health/ready")!)
                return (api?.1 as? HTTPURLResponse)?.statusCode == 200 && (ready?.1 as? HTTPURLResponse)?.statusCode == 200
            }
        } catch {
            Issue.record("accounts-service log: \((try? String(contentsOf: log, encoding: .utf8)) ?? "")")
            throw error
        }
        try #require(service.isRunning, "accounts-service exited: \((try? String(contentsOf: log, encoding: .utf8)) ?? "")")
        // The service applied its own schema module when it started.
        #expect(try await test.count("SELECT count(*) FROM eventoutbox_schema_migrations WHERE module = 'accounts-service'") == 2)
        var request = URLRequest(url: URL(string: "http://127.0.0.1:\(port)/accounts")!)
        request.httpMethod = "POST"
        request.httpBody = Data(#"{"owner": "Process"}"#.utf8)
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        let (body, created) = try await URLSession.shared.data(for: request)
        #expect((created as? HTTPURLResponse)?.statusCode == 201)
        // Two deposits, both decided on the cache the service keeps by default (opening the account filled it).
        let account = try #require((created as? HTTPURLResponse)?.value(forHTTPHeaderField: "Location"), "\(String(decoding: body, as: UTF8.self))")
        for _ in 0..<2 {
            var deposit = URLRequest(url: URL(string: "http://127.0.0.1:\(port)\(account)/deposits")!)
            deposit.httpMethod = "POST"
            deposit.httpBody = Data(#"{"amount": 5}"#.utf8)
            deposit.setValue("application/json", forHTTPHeaderField: "Content-Type")
            #expect((try await URLSession.shared.data(for: deposit).1 as? HTTPURLResponse)?.statusCode == 200)
        }
        let (metrics, _) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(metricsPort)/metrics")!)
        let exposition = String(decoding: metrics, as: UTF8.self)
        #expect(exposition.contains(#"http_server_requests_total{method="POST",route="/accounts",status="201"} 1"#), "\(exposition.prefix(1500))")
        #expect(exposition.contains("http_server_request_duration_seconds_bucket"), "a histogram in seconds")
        #expect(exposition.contains(#"eventoutbox_aggregate_cache_hits_total{category="account"} 2"#), "\(exposition.prefix(3000))")
        #expect(exposition.contains(#"eventoutbox_aggregate_cache_misses_total{category="account"} 0"#))
        #expect(!exposition.contains("hb_requests"))
        #expect(Exposition.familiesWithoutHelp(exposition).isEmpty, "families without # HELP: \(Exposition.familiesWithoutHelp(exposition))")
        #expect(String(decoding: metrics, as: UTF8.self).contains(#"eventoutbox_build_info{version="\#(EventOutboxVersion.current)"} 1"#))
        kill(service.processIdentifier, SIGTERM)
        try await waitUntil("the service stops") { !service.isRunning }
        #expect(service.terminationStatus == 0)
        try await test.drop()
    }
}
