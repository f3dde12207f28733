@testable import PostgresClient
import Testing

/// Passwords never reach an error message, whatever surrounds them (cases first found by scripts/fuzz).
@Suite("PostgresURL.redacted")
struct RedactionTests {
    @Test("every form and case of a password is hidden", arguments: [
        "postgresql://user:Zq7Secret@host/db",
        "postgres://us@er:Zq7Secret@host:5432/db",  // an "@" before the real one
        "postgres://\u{34A}@:Zq7Secret@host:5432/db",  // a combining mark that glues itself to "/"
        "postgresql:///db?sslmode=require&password=Zq7Secret&application_name=x",
        "postgresql:///db?password=decoy&password=Zq7Secret",  // the second one too
        "host=h PASSWORD=Zq7Secret",  // a mistyped key is still a password
        "host=h password=Zq7Secret port=5432",
        "host=h password='Zq7 Secret' port=5432",  // quoted, with a space
        "host=h password='it\\'s Zq7Secret' port=5432",  // an escaped quote inside
        "host=h password='Zq7Secret",  // unterminated
    ])
    func hidden(_ url: String) {
        let shown = PostgresURL.redacted(url)
        #expect(!shown.contains("Zq7Secret") && !shown.contains("Secret"), "\(shown)")
        #expect(shown.contains("***"))
    }

    @Test("what is not a password stays readable")
    func readable() {
        #expect(PostgresURL.redacted("postgresql://app@db.example:5432/app?sslmode=verify-full") == "'postgresql://app@db.example:5432/app?sslmode=verify-full'")
    }
}
