import BankAccount
import EventSourcing
import EventStore
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import LibPQ

/// The bank over HTTP: every command commits its events and outbox rows through ``Bank`` exactly as the `bank`
/// CLI does. Errors are `application/problem+json`; every POST honours an `Idempotency-Key` header.
public struct AccountsAPI: Sendable {
    /// One route: its method and its path as `openapi.yaml` writes it (`/accounts/{id}`).
    public struct Route: Sendable, Hashable, CustomStringConvertible {
        public var method: String
        public var path: String
        public var description: String { "\(method) \(path)" }
    }

    /// Every route the service serves; `openapi.yaml` describes exactly these (a test checks).
    public static let routes: [Route] = [
        Route(method: "POST", path: "/accounts"),
        Route(method: "GET", path: "/accounts/{id}"),
        Route(method: "GET", path: "/accounts/{id}/history"),
        Route(method: "POST", path: "/accounts/{id}/deposits"),
        Route(method: "POST", path: "/accounts/{id}/withdrawals"),
        Route(method: "GET", path: "/health/live"),
        Route(method: "GET", path: "/health/ready"),
    ]

    /// Request bodies larger than this are refused (413).
    public static let maxBodyBytes = 64 * 1024
    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
    static let traceparent = HTTPField.Name("traceparent")!
    static let correlationID = HTTPField.Name("X-Correlation-ID")!
    static let requestID = HTTPField.Name("X-Request-ID")!

    public let bank: Bank
    /// Who may call: bearer tokens, or nobody checked (``CallerAuthentication/disabled``).
    public let authentication: CallerAuthentication
    let keys: IdempotencyKeys
    /// The accounts' openers, for checking who may act on an account without a statement per request.
    let openers = AccountOpeners()
    /// Where what a public answer leaves out goes (why the service is not ready, say).
    let logger: Logger

    /// - Parameters:
    ///   - authentication: with tokens, a caller acts on the accounts it opened (any, with the admin scope) and is
    ///     the actor of the events it causes.
    ///   - idempotencyKeyLifetime: how long a caller's `Idempotency-Key` answers are replayed. Default: 24 h.
    public init(
        bank: Bank, authentication: CallerAuthentication = .disabled, idempotencyKeyLifetime: Duration = .seconds(86_400),
        logger: Logger = Logger(label: "accounts-service.api")
    ) {
        self.bank = bank
        self.authentication = authentication
        self.logger = logger
        keys = IdempotencyKeys(pool: bank.repository.store.pool, lifetime: idempotencyKeyLifetime)
    }

    /// A router serving ``routes``.
    public func makeRouter() -> Router<BasicRequestContext> {
        let router = Router()
        // A span per request, continuing the caller's trace (`traceparent`); commands continue it into their events.
        router.add(middleware: TracingMiddleware())
        // Requests by route, method and status, and their durations, named as Prometheus expects.
        router.add(middleware: RequestMetricsMiddleware())
        // Any other method on a served path (QUERY and methods yet unnamed included): 405 with `Allow`, not 404.
        router.add(middleware: MethodNotAllowedMiddleware(routes: Self.routes))
        router.post("accounts") { request, _ in
            await respond(request) { try await openAccount(request, caller: try await authentication.caller(of: request)) }
        }
        router.get("accounts/:id") { request, context in
            await respond(request) {
                let caller = try await authentication.caller(of: request)
                return try await account(request, id: try await authorized(caller, context.parameters.require("id")))
            }
        }
        router.get("accounts/:id/history") { request, context in
            await respond(request) {
                let caller = try await authentication.caller(of: request)
                return try await history(id: try await authorized(caller, context.parameters.require("id")))
            }
        }
        router.post("accounts/:id/deposits") { request, context in
            await respond(request) {
                let caller = try await authentication.caller(of: request)
                return try await move(request, id: try await authorized(caller, context.parameters.require("id")), caller: caller, deposit: true)
            }
        }
        router.post("accounts/:id/withdrawals") { request, context in
            await respond(request) {
                let caller = try await authentication.caller(of: request)
                return try await move(request, id: try await authorized(caller, context.parameters.require("id")), caller: caller, deposit: false)
            }
        }
        router.get("health/live") { _, _ in json(.ok, #"{"status":"live"}"#) }
        router.get("health/ready") { request, _ in await respond(request) { try await ready() } }
        return router
    }

    /// Runs a handler; a thrown error becomes its problem answer, so no request ends without one. A server error
    /// is logged with a request id, which the answer carries (`X-Request-ID`) for the caller to quote.
    private func respond(_ request: Request, _ body: () async throws -> Response) async -> Response {
        do {
            return try await body()
        } catch {
            let problem = Problem.from(error)
            var response = problem.response
            if problem.status.code >= 500 {
                let id = request.headers[Self.correlationID] ?? UUID().uuidString.lowercased()
                response.headers[Self.requestID] = id
                logger.error(
                    "request failed", metadata: [
                        "http.request.id": "\(id)", "http.method": "\(request.method)", "http.path": "\(request.uri.path)",
                        "http.status": "\(problem.status.code)", "error": "\(error)",
                    ])
            }
            return response
        }
    }

    // MARK: Commands

    struct OpenRequest: Decodable {
        var owner: String
        var initialDeposit: Int64?
    }

    struct MoveRequest: Decodable {
        var amount: Int64
        var description: String?
    }

    struct AccountView: Encodable {
        var id: String
        var owner: String
        var balance: Int64
        var version: Int64
    }

    /// `id` if `caller` may act on that account: authentication is off, the caller is an admin, or it opened the
    /// account. Anyone else is told there is no such account (404), as for an account that does not exist.
    private func authorized(_ caller: Caller?, _ id: String) async throws -> String {
        guard let caller, !caller.isAdmin else { return id }
        let opener = try await openers.opener(of: id) {
            try await bank.repository.store.pool.withConnection { connection in
                try await connection.query(
                    "SELECT metadata->>'actor' AS actor FROM events WHERE stream_id = $1 AND stream_version = 1", [.text(id)],
                    statement: "api: who opened the account"
                ).first?.decodeIfPresent(String.self, "actor")
            }
        }
        guard opener == caller.subject else { throw Problem(.notFound, "Not found", detail: "no account '\(id)'") }
        return id
    }

    private func openAccount(_ request: Request, caller: Caller?) async throws -> Response {
        var request = request
        let body: OpenRequest = try await decode(&request)
        let command = AccountCommand.open(owner: body.owner, initialDeposit: body.initialDeposit ?? 0)
        return try await idempotent(request, caller: caller, canonical: "POST /accounts \(canonical(command))") { alsoWriting in
            let result = try await bank.execute(command, metadata: metadata(request, caller), alsoWriting: alsoWriting)
            if let caller { openers.remember(result.accountID, openedBy: caller.subject) }
            return result
        } answer: { result in
            Answer(status: .created, body: try encode(AccountView(result)), location: "/accounts/\(result.accountID)")
        }
    }

    private func move(_ request: Request, id: String, caller: Caller?, deposit: Bool) async throws -> Response {
        var request = request
        let body: MoveRequest = try await decode(&request)
        let command: AccountCommand = deposit
            ? .deposit(amount: body.amount, description: body.description ?? "")
            : .withdraw(amount: body.amount, description: body.description ?? "")
        let path = "/accounts/\(id)/\(deposit ? "deposits" : "withdrawals")"
        return try await idempotent(request, caller: caller, canonical: "POST \(path) \(canonical(command))") { alsoWriting in
            try await bank.execute(command, on: id, metadata: metadata(request, caller), alsoWriting: alsoWriting)
        } answer: { result in
            if let rejection = result.rejection {
                // Refused, and still recorded (WithdrawalRejected): the answer says so, with where it was recorded.
                let problem = Problem(
                    .unprocessableContent, "Withdrawal rejected", detail: rejection, type: "/problems/insufficient-funds",
                    extra: ["balance": result.balance, "version": result.version])
                return Answer(status: problem.status, body: String(decoding: problem.jsonBody, as: UTF8.self), location: nil)
            }
            return Answer(status: .ok, body: try encode(AccountView(result)), location: nil)
        }
    }

    /// The canonical text of a command, for telling a retried request from another one with the same key.
    private func canonical(_ command: AccountCommand) -> String {
        switch command {
        case .open(let owner, let initialDeposit): "open owner=\(JSONText.string(owner)) initialDeposit=\(initialDeposit)"
        case .deposit(let amount, let description): "deposit amount=\(amount) description=\(JSONText.string(description))"
        case .withdraw(let amount, let description): "withdraw amount=\(amount) description=\(JSONText.string(description))"
        }
    }

    /// A command's answer: what is sent, and stored under an idempotency key.
    struct Answer: Sendable {
        var status: HTTPResponse.Status
        var body: String
        var location: String?

        func response(replayed: Bool = false) -> Response {
            var headers: HTTPFields = [.contentType: status.code >= 400 ? "application/problem+json" : "application/json"]
            if let location { headers[.location] = location }
            if replayed { headers[HTTPField.Name("Idempotent-Replayed")!] = "true" }
            return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: body)))
        }
    }

    /// Runs a command once per caller and `Idempotency-Key`: a retry within the key's lifetime gets the stored
    /// answer and writes nothing. Keys are the caller's own: another caller's same key is another request.
    private func idempotent(
        _ request: Request, caller: Caller?, canonical: String,
        run: (@escaping @Sendable (AccountCommandResult) throws -> [TransactionalWrite]) async throws -> AccountCommandResult,
        answer: @escaping @Sendable (AccountCommandResult) throws -> Answer
    ) async throws -> Response {
        let sent = request.headers[values: Self.idempotencyKey]
        guard sent.count <= 1 else {
            throw Problem(.badRequest, "Invalid Idempotency-Key", detail: "send one Idempotency-Key header, not \(sent.count)")
        }
        guard let key = sent.first else {
            return try answer(try await run { _ in [] }).response()
        }
        let owner = caller?.subject ?? ""
        guard !key.isEmpty, key.utf8.count <= IdempotencyKeys.maxKeyLength, key.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value < 0x7F }) else {
            throw Problem(.badRequest, "Invalid Idempotency-Key", detail: "an Idempotency-Key is 1 to \(IdempotencyKeys.maxKeyLength) printable ASCII characters")
        }
        // Twice at most: a request that loses the race for its key finds the winner's answer the second time.
        for _ in 0..<2 {
            if let stored = try await keys.find(key, caller: owner) {
                guard stored.request == canonical else {
                    throw Problem(
                        .unprocessableContent, "Idempotency-Key reused",
                        detail: "the Idempotency-Key '\(key)' was first used for another request; use a new key for a new request")
                }
                return Answer(status: HTTPResponse.Status(code: stored.status), body: stored.body, location: stored.location)
                    .response(replayed: true)
            }
            do {
                let result = try await run { result in
                    let answer = try answer(result)
                    return keys.record(
                        key: key, caller: owner, request: canonical, status: answer.status.code, body: answer.body,
                        location: answer.location)
                }
                return try answer(result).response()
            } catch where IdempotencyKeys.isTaken(error) {
                continue
            }
        }
        throw Problem(.conflict, "Idempotency-Key in use", detail: "another request with the Idempotency-Key '\(key)' is being processed; retry")
    }

    /// The events' metadata: the caller is their actor (the audit trail says who), or the service when no
    /// one is authenticated.
    private func metadata(_ request: Request, _ caller: Caller?) -> EventMetadata {
        EventMetadata(
            correlationID: request.headers[Self.correlationID], actor: caller?.subject ?? "accounts-service",
            traceparent: request.headers[Self.traceparent])
    }

    // MARK: Queries

    private func account(_ request: Request, id: String) async throws -> Response {
        let query = request.uri.queryParameters
        var version: Int64?
        var date: Date?
        if let text = query.get("version") {
            guard let value = Int64(text) else { throw Problem(.badRequest, "Invalid request", detail: "version must be a whole number (got '\(text)')") }
            version = value
        }
        if let text = query.get("at") {
            guard let value = ISOTimestamp.parse(text) else {
                throw Problem(.badRequest, "Invalid request", detail: "at must be an ISO 8601 time such as 2026-11-25T12:00:00Z (got '\(text)')")
            }
            date = value
        }
        guard version == nil || date == nil else { throw Problem(.badRequest, "Invalid request", detail: "give version or at, not both") }
        let state = try await bank.account(id, atVersion: version, asOf: date)
        return json(.ok, try encode(AccountView(id: id, owner: state.state.owner, balance: state.state.balance, version: state.version)))
    }

    private func history(id: String) async throws -> Response {
        let events = try await bank.history(id)
        let items = events.map { recorded, _ in
            JSONText.object([
                (key: "eventId", json: JSONText.string(recorded.eventID.uuidString.lowercased())),
                (key: "occurredAt", json: JSONText.string(ISOTimestamp.format(recorded.occurredAt))),
                (key: "payload", json: recorded.payload),
                (key: "schemaVersion", json: String(recorded.schemaVersion)),
                (key: "type", json: JSONText.string(recorded.eventType)),
                (key: "version", json: String(recorded.streamVersion)),
            ])
        }
        return json(.ok, JSONText.object([(key: "events", json: "[" + items.joined(separator: ",") + "]"), (key: "id", json: JSONText.string(id))]))
    }

    private func ready() async throws -> Response {
        do {
            try await bank.repository.store.pool.withConnection { _ = try await $0.query("SELECT 1", statement: "readiness") }
        } catch {
            // The probe is public: the reason (host, socket path, the server's message) goes to the log only.
            logger.warning("not ready: the database does not answer", metadata: ["error": "\(error)"])
            throw Problem(.serviceUnavailable, "Not ready", detail: "not ready")
        }
        return json(.ok, #"{"status":"ready"}"#)
    }

    // MARK: Plumbing

    private func decode<Body: Decodable>(_ request: inout Request) async throws -> Body {
        // JSON only: a browser's cross-site "simple" request (text/plain, a form) must not move money.
        let mediaType = request.headers[.contentType]?.split(separator: ";").first?.trimmingCharacters(in: .whitespaces).lowercased()
        guard let mediaType, mediaType == "application/json" || (mediaType.hasPrefix("application/") && mediaType.hasSuffix("+json")) else {
            throw Problem(
                .unsupportedMediaType, "Unsupported media type",
                detail: "send the body as Content-Type: application/json (got \(request.headers[.contentType].map { "'\($0)'" } ?? "none"))")
        }
        let buffer: ByteBuffer
        do {
            buffer = try await request.collectBody(upTo: Self.maxBodyBytes)
        } catch {
            throw Problem(.contentTooLarge, "Request too large", detail: "the body is larger than \(Self.maxBodyBytes) bytes")
        }
        do {
            return try EventJSON.decoder.decode(Body.self, from: Data(buffer.readableBytesView))
        } catch let error as DecodingError {
            throw Problem(.badRequest, "Malformed request", detail: "the body is not the JSON this route takes: \(Self.describe(error))")
        }
    }

    private static func describe(_ error: DecodingError) -> String {
        switch error {
        case .keyNotFound(let key, _): "missing '\(key.stringValue)'"
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            "'\(context.codingPath.map(\.stringValue).joined(separator: "."))' has the wrong type (amounts are whole numbers of minor units)"
        case .dataCorrupted(let context):
            context.codingPath.isEmpty ? "malformed JSON" : "'\(context.codingPath.map(\.stringValue).joined(separator: "."))' is out of range"
        @unknown default: "\(error)"
        }
    }

    private func encode(_ value: some Encodable) throws -> String {
        String(decoding: try EventJSON.encoder.encode(value), as: UTF8.self)
    }
}

extension AccountsAPI.AccountView {
    init(_ result: AccountCommandResult) {
        self.init(id: result.accountID, owner: result.owner, balance: result.balance, version: result.version)
    }
}


private func json(_ status: HTTPResponse.Status, _ body: String) -> Response {
    Response(status: status, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(string: body)))
}

/// Answers 405 with `Allow` for a request whose path is served but not with its method.
struct MethodNotAllowedMiddleware<Context: RequestContext>: RouterMiddleware {
    /// Each served path as its segments (`{id}` matches any one segment), with its methods.
    let paths: [(segments: [Substring], methods: [String])]

    init(routes: [AccountsAPI.Route]) {
        paths = Dictionary(grouping: routes, by: \.path).map { path, routes in
            (path.split(separator: "/"), routes.map(\.method).sorted())
        }
    }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let segments = request.uri.path.split(separator: "/")
        guard let served = paths.first(where: { Self.matches($0.segments, segments) }), !served.methods.contains(request.method.rawValue) else {
            return try await next(request, context)
        }
        let allow = served.methods.joined(separator: ", ")
        var response = Problem(
            .methodNotAllowed, "Method not allowed", detail: "\(request.uri.path) takes \(allow), not \(request.method.rawValue)"
        ).response
        response.headers[.allow] = allow
        return response
    }

    static func matches(_ pattern: [Substring], _ segments: [Substring]) -> Bool {
        pattern.count == segments.count && zip(pattern, segments).allSatisfy { $0 == $1 || $0.hasPrefix("{") }
    }
}
