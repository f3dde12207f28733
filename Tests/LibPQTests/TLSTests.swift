import Foundation
import LibPQ
import TestSupport
import Testing

/// TLS to PostgreSQL: a throwaway server with `ssl = on` and certificates made for the test (openssl).
@Suite("TLS to PostgreSQL (a throwaway server with its own certificates)")
struct TLSTests {
    /// Runs openssl in `directory` (off the cooperative threads: RSA key generation takes a while).
    func openssl(_ arguments: [String], in directory: String) async throws {
        let result = try await Tools.command(["openssl"] + arguments, in: URL(fileURLWithPath: directory))
        guard result.status == 0 else {
            throw ThrowawayPostgresError(description: "openssl \(arguments.joined(separator: " ")) failed: \(result.output)")
        }
    }

    @Test("sslmode=verify-full connects with the server's CA (and the session is encrypted); another CA is a clear error")
    func verifyFull() async throws {
        let certificates = "/tmp/" + uniqueName("tls")
        try FileManager.default.createDirectory(atPath: certificates, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(atPath: certificates) }
        for ca in ["ca", "other-ca"] {
            try await openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=EventOutbox test \(ca)",
                         "-keyout", "\(ca).key", "-out", "\(ca).crt"], in: certificates)
        }
        try "subjectAltName=DNS:localhost\n".write(toFile: certificates + "/san.ext", atomically: true, encoding: .utf8)
        try await openssl(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"], in: certificates)
        try await openssl(["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
                     "-extfile", "san.ext", "-out", "server.crt"], in: certificates)

        let port = testPort()
        let server = try await ThrowawayPostgres.start(
            serverOptions: "-c listen_addresses=127.0.0.1 -c port=\(port) -c ssl=on -c ssl_cert_file=../server.crt -c ssl_key_file=../server.key",
            files: ["server.crt": certificates + "/server.crt", "server.key": certificates + "/server.key"])

        let base = "postgresql://postgres@localhost:\(port)/postgres?sslmode=verify-full"
        let connection = try await PQConnection.connect(to: base + "&sslrootcert=\(certificates)/ca.crt")
        let encrypted = try await connection.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").first!.decode(Bool.self, at: 0)
        #expect(encrypted)
        await connection.close()

        let refused = await #expect(throws: PQError.self) {
            try await PQConnection.connect(to: base + "&sslrootcert=\(certificates)/other-ca.crt")
        }
        #expect(refused?.description.contains("certificate verify failed") == true, "\(refused.map { "\($0)" } ?? "")")
        // verify-full also checks the name: the certificate is for localhost, not 127.0.0.1.
        let wrongName = await #expect(throws: PQError.self) {
            try await PQConnection.connect(
                to: "postgresql://postgres@127.0.0.1:\(port)/postgres?sslmode=verify-full&sslrootcert=\(certificates)/ca.crt")
        }
        #expect(wrongName?.description.contains("127.0.0.1") == true, "\(wrongName.map { "\($0)" } ?? "")")
        await server.remove()
    }
}
