import AccountsService
import BankAccount
import EventSourcing
import EventStore
import Foundation
#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Hummingbird
import InMemoryLogging
import Logging
import LibPQ
import TestSupport
import Testing

@Suite("accounts-service: hostile requests get 4xx problem+json and write nothing (real PostgreSQL)")
struct HostileRequestTests {
    @Test("a NUL character in an owner or description, a moment before 1970: 400, not 500; nothing written")
    func badValues() async throws {
        let service = try await Service.start()
        let opened = try await service.send("POST", "/accounts", #"{"owner": "Kim", "initialDeposit": 10}"#)
        let id = try #require(opened.json["id"] as? String)
        for (path, body) in [
            ("/accounts", #"{"owner": "Ki\u0000m"}"#),
            ("/accounts/\(id)/deposits", #"{"amount": 5, "description": "a\u0000b"}"#),
            ("/accounts/\(id)/withdrawals", #"{"amount": 5, "description": "\u0000"}"#),
        ] {
            let reply = try await service.send("POST", path, body)
            #expect(reply.status == 400, "\(path): \(reply.status) \(reply.body)")
            #expect((reply.json["detail"] as? String)?.contains("NUL") == true, "\(reply.body)")
        }
        for at in ["0001-01-02T00:00:00Z", "1969-12-31T23:59:59Z"] {
            let reply = try await service.send("GET", "/accounts/\(id)?at=\(at)")
            #expect(reply.status == 400, "at=\(at): \(reply.status) \(reply.body)")
            #expect(reply.header("Content-Type") == "application/problem+json")
        }
        #expect(try await service.events() == 1)
        try await service.stop()
    }

    @Test("a body that is not application/json is 415 (a browser's cross-site simple request cannot move money); nothing written")
    func mediaType() async throws {
        let service = try await Service.start()
        let id = try #require(try await service.send("POST", "/accounts", #"{"owner": "Kim"}"#).json["id"] as? String)
        for contentType in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""] {
            var request = URLRequest(url: URL(string: "http://127.0.0.1:\(service.port)/accounts/\(id)/deposits")!)
            request.httpMethod = "POST"
            request.httpBody = Data(#"{"amount": 5}"#.utf8)
            request.setValue(contentType, forHTTPHeaderField: "Content-Type")
            let (_, response) = try await URLSession.shared.data(for: request)
            #expect((response as? HTTPURLResponse)?.statusCode == 415, "Content-Type '\(contentType)'")
        }
        let charset = try await service.send("POST", "/accounts/\(id)/deposits", #"{"amount": 5}"#, headers: ["Content-Type": "application/json; charset=utf-8"])
        #expect(charset.status == 200)
        #expect(try await service.events() == 2)
        try await service.stop()
    }

    @Test("other methods on served paths: 405 with Allow, not 404")
    func methodNotAllowed() async throws {
        let service = try await Service.start()
        for (method, path, allow) in [
            ("DELETE", "/accounts/x", "GET"), ("PUT", "/accounts/x", "GET"), ("PUT", "/accounts", "POST"), ("GET", "/accounts", "POST"),
            ("PATCH", "/accounts/x/deposits", "POST"), ("DELETE", "/health/ready", "GET"),
        ] {
            let reply = try await service.send(method, path)
            #expect(reply.status == 405, "\(method) \(path): \(reply.status)")
            #expect(reply.header("Allow") == allow, "\(method) \(path): Allow \(reply.header("Allow") ?? "none")")
            #expect(reply.header("Content-Type") == "application/problem+json")
        }
        #expect(try await service.send("DELETE", "/nowhere").status == 404)
        try await service.stop()
    }

    @Test("a stalled database (events locked): 20 deposits get 503 with Retry-After within the bounds, never 500; then they succeed")
    func stalledDatabase() async throws {
        let test = try await TestEventStore.create(modules: [AccountsServiceSchema.module])
        let pool = PQPool(PQPool.Configuration(
            url: test.schema.url, maxConnections: 2, acquireTimeout: .seconds(1), maxWaiters: 4, statementTimeout: .seconds(1)))
        let bank = Bank(store: EventStore(pool: pool))
        let id = try await bank.open(owner: "Stall", initialDeposit: 0)
        let port = testPort()
        let app = Application(router: AccountsAPI(bank: bank).makeRouter(), configuration: .init(address: .hostname("127.0.0.1", port: port)))
        let task = Task { try await app.run() }
        defer { task.cancel() }
        try await waitUntil("the API answers") {
            (try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/health/live")!)) != nil
        }
        let locker = try await PQConnection.connect(to: test.schema.url)
        try await locker.executeScript("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        @Sendable func deposit() async throws -> (Int, String?) {
            var request = URLRequest(url: URL(string: "http://127.0.0.1:\(port)/accounts/\(id)/deposits")!)
            request.httpMethod = "POST"
            request.httpBody = Data(#"{"amount": 1}"#.utf8)
            request.setValue("application/json", forHTTPHeaderField: "Content-Type")
            request.timeoutInterval = 60
            let (_, response) = try await URLSession.shared.data(for: request)
            let http = try #require(response as? HTTPURLResponse)
            return (http.statusCode, http.value(forHTTPHeaderField: "Retry-After"))
        }
        let answers = try await withThrowingTaskGroup(of: (Int, String?).self) { group in
            for _ in 0..<20 { group.addTask { try await deposit() } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(answers.allSatisfy { $0.0 == 503 && $0.1 == "1" }, "\(answers)")
        try await locker.executeScript("ROLLBACK")
        await locker.close()
        #expect(try await deposit().0 == 200, "the database is back: so is the service")
        #expect(try await bank.account(id).state.balance == 1, "only the deposit after the stall was recorded")
        await pool.close()
        try await test.drop()
    }

    @Test("connections that hold on: one above the cap is closed at once, a silent one after the idle timeout; the service still answers")
    func connectionLimits() async throws {
        let test = try await TestEventStore.create(modules: [AccountsServiceSchema.module])
        let port = testPort()
        let limits = ConnectionLimits(idleTimeout: .seconds(1), maxOpenConnections: 3)
        let app = Application(
            router: AccountsAPI(bank: Bank(store: test.store)).makeRouter(), server: limits.server,
            configuration: .init(address: .hostname("127.0.0.1", port: port)))
        let task = Task { try await app.run() }
        defer { task.cancel() }
        try await waitUntil("the API answers") {
            (try? await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/health/live")!)) != nil
        }
        // Five silent clients: the server closes the two above the cap at once, the rest after a second of silence.
        let clients = RawConnection.opened(port: port, count: 5)
        try await waitUntil("two connections above the cap are closed", timeout: .seconds(10)) {
            clients.filter { !$0.isOpen(within: .milliseconds(10)) }.count >= 2
        }
        try await waitUntil("the silent ones are closed after the idle timeout", timeout: .seconds(10)) {
            clients.allSatisfy { !$0.isOpen(within: .milliseconds(10)) }
        }
        for client in clients { client.shut() }
        let (_, response) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/health/live")!)
        #expect((response as? HTTPURLResponse)?.statusCode == 200, "the service still answers")
        try await test.drop()
    }

    @Test("the connection cap stays below the descriptor limit (raised to its hard limit), less a reserve; a lower cap stays")
    func capBelowDescriptorLimit() throws {
        let capped = ConnectionLimits(maxOpenConnections: Int(Int32.max)).withinDescriptorLimit(reserve: 64)
        var limit = rlimit()
        #expect(getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0)
        #expect(limit.rlim_cur == limit.rlim_max, "the soft limit was raised to the hard one")
        #expect(capped.maxOpenConnections == max(1, Int(clamping: limit.rlim_cur) - 64))
        #expect(ConnectionLimits(maxOpenConnections: 10).withinDescriptorLimit(reserve: 64).maxOpenConnections == 10)
    }

    @Test("every 5xx is logged with a request id, which the answer carries")
    func serverErrorsLogged() async throws {
        let handler = InMemoryLogHandler()
        let pool = PQPool(url: "postgresql://app@127.0.0.1:1/app?connect_timeout=2", maxConnections: 1)
        let api = AccountsAPI(bank: Bank(store: EventStore(pool: pool)), logger: Logger(label: "test", factory: { _ in handler }))
        let port = testPort()
        let app = Application(router: api.makeRouter(), configuration: .init(address: .hostname("127.0.0.1", port: port)))
        let task = Task { try await app.run() }
        defer { task.cancel() }
        var request = URLRequest(url: URL(string: "http://127.0.0.1:\(port)/accounts")!)
        request.httpMethod = "POST"
        request.httpBody = Data(#"{"owner": "Kim"}"#.utf8)
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        var answer: (Data, URLResponse)?
        try await waitUntil("the API answers") {
            answer = try? await URLSession.shared.data(for: request)
            return answer != nil
        }
        let response = try #require(answer?.1 as? HTTPURLResponse)
        #expect(response.statusCode >= 500)
        let id = try #require(response.value(forHTTPHeaderField: "X-Request-ID"))
        let logged = handler.entries.filter { $0.level == .error && $0.metadata["http.request.id"] == "\(id)" }
        #expect(logged.count == 1, "\(handler.entries.map(\.message))")
        #expect(logged.first?.metadata["http.path"] == "/accounts")
        await pool.close()
    }
}

/// A plain TCP connection that sends nothing: to see when the server closes it.
final class RawConnection: Sendable {
    let descriptor: Int32

    init?(port: Int) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else {
            Glibc.close(fd)
            return nil
        }
        descriptor = fd
    }

    static func opened(port: Int, count: Int) -> [RawConnection] { (0..<count).compactMap { _ in RawConnection(port: port) } }

    /// `false` once the server closed it (a read returns end of file or an error within `timeout`).
    func isOpen(within timeout: Duration) -> Bool {
        var poller = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        let ready = poll(&poller, 1, Int32(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000))
        guard ready > 0 else { return true }
        var byte: UInt8 = 0
        return recv(descriptor, &byte, 1, Int32(MSG_PEEK)) > 0
    }

    func shut() { Glibc.close(descriptor) }
}
