import BlockingIO
import Foundation
import HTTPTypes
import Hummingbird
import JWTKit

/// Who is calling the API: the `sub` of a verified bearer token, and whether its scope lets it act on any
/// account.
public struct Caller: Sendable, Equatable {
    /// The token's subject: the owner of the accounts it opens, and the actor of the events it causes.
    public var subject: String
    /// The token's `scope` holds ``CallerAuthentication/adminScope``.
    public var isAdmin: Bool

    public init(subject: String, isAdmin: Bool = false) {
        self.subject = subject
        self.isAdmin = isAdmin
    }
}

/// How the API learns who calls: HS256 JSON Web Tokens in `Authorization: Bearer …`, or nobody (explicitly
/// disabled, for local experiments: every caller may act on every account).
public struct CallerAuthentication: Sendable {
    /// The scope that lets a caller act on any account.
    public static let adminScope = "accounts:admin"
    /// Shorter shared secrets are refused: HS256 wants at least its digest's 32 bytes.
    public static let minimumSecretBytes = 32

    let keys: JWTKeyCollection?

    /// No authentication: every request is served, the events' actor is the service's name.
    public static let disabled = CallerAuthentication(keys: nil)

    public var isEnabled: Bool { keys != nil }

    /// Verifies HS256 tokens signed with `secret`.
    /// - Throws: ``CallerAuthenticationError`` if `secret` is shorter than ``minimumSecretBytes``.
    public static func hs256(secret: [UInt8]) async throws -> CallerAuthentication {
        guard secret.count >= minimumSecretBytes else {
            throw CallerAuthenticationError(
                "the JWT secret has \(secret.count) bytes; HS256 needs at least \(minimumSecretBytes) (e.g. `head -c 48 /dev/urandom | base64`)")
        }
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        return CallerAuthentication(keys: keys)
    }

    /// Reads the secret from a file (trailing newline removed), as Kubernetes mounts secrets.
    public static func hs256(secretFile path: String) async throws -> CallerAuthentication {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CallerAuthenticationError("cannot read the JWT secret file '\(path)'")
        }
        var bytes = Array(data)
        while let last = bytes.last, last == UInt8(ascii: "\n") || last == UInt8(ascii: "\r") { bytes.removeLast() }
        return try await hs256(secret: bytes)
    }

    /// The caller of `request`; `nil` when authentication is disabled.
    /// - Throws: ``Problem`` 401 when the token is missing, malformed, forged, expired or not yet valid.
    func caller(of request: Request) async throws -> Caller? {
        guard let keys else { return nil }
        let values = request.headers[values: .authorization]
        guard values.count == 1, let value = values.first else {
            throw Self.unauthorized(values.isEmpty ? "send a bearer token: Authorization: Bearer <JWT>" : "send one Authorization header")
        }
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer", !parts[1].isEmpty else {
            throw Self.unauthorized("the Authorization header must be 'Bearer <JWT>'")
        }
        let token: AccessToken
        do {
            token = try await keys.verify(String(parts[1]), as: AccessToken.self)
        } catch {
            throw Self.unauthorized("the bearer token is not valid (its signature, its expiry, or its form)")
        }
        guard !token.sub.value.isEmpty, token.sub.value.utf8.count <= 200 else {
            throw Self.unauthorized("the bearer token needs a subject (sub) of 1 to 200 bytes")
        }
        let scopes = (token.scope ?? "").split(separator: " ")
        return Caller(subject: token.sub.value, isAdmin: scopes.contains(Substring(Self.adminScope)))
    }

    /// A token for `subject`, signed with this authentication's secret: for development and tests.
    public func mint(subject: String, scope: String? = nil, expiresIn: Duration = .seconds(3600)) async throws -> String {
        guard let keys else { throw CallerAuthenticationError("authentication is disabled: there is no secret to sign with") }
        return try await keys.sign(
            AccessToken(sub: SubjectClaim(value: subject), exp: ExpirationClaim(value: Date().addingTimeInterval(expiresIn.inSeconds)), scope: scope))
    }

    static func unauthorized(_ detail: String) -> Problem {
        Problem(.unauthorized, "Unauthorized", detail: detail, type: "/problems/unauthorized")
    }
}

/// The claims the API reads: `sub`, `exp` (required), `nbf` (optional) and `scope` (space-separated).
struct AccessToken: JWTPayload {
    var sub: SubjectClaim
    var exp: ExpirationClaim
    var nbf: NotBeforeClaim?
    var scope: String?

    init(sub: SubjectClaim, exp: ExpirationClaim, nbf: NotBeforeClaim? = nil, scope: String? = nil) {
        self.sub = sub
        self.exp = exp
        self.nbf = nbf
        self.scope = scope
    }

    func verify(using algorithm: some JWTAlgorithm) throws {
        try exp.verifyNotExpired()
        try nbf?.verifyNotBefore()
    }
}

/// Authentication cannot be set up as asked.
public struct CallerAuthenticationError: Error, CustomStringConvertible, Sendable {
    public var description: String
    init(_ description: String) { self.description = description }
}
