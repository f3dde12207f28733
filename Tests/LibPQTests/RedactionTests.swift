@testable import LibPQ
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
        // Spellings libpq takes as a password (the audit found each printed in clear):
        "host=h password = Zq7Secret port=5432",  // spaces around "="
        "host=h password= Zq7Secret",
        "host=h password =Zq7Secret",
        "host=h\tpassword\t=\t'Zq7 Secret'",
        "postgresql:///db?passwor%64=Zq7Secret",  // the name percent-encoded
        "postgresql:///db?%70assword=Zq7Secret&sslmode=disable",
        "postgresql:///db?%70%61%73%73%77%6F%72%64=Zq7Secret",
        "postgresql:///db?sslpassword=Zq7Secret",  // the client key's password
        "host=h password=Zq7&Secret",  // "&" is no delimiter in the keyword form
    ])
    func hidden(_ url: String) {
        let shown = PostgresURL.redacted(url)
        #expect(!shown.contains("Zq7Secret") && !shown.contains("Secret"), "\(shown)")
        #expect(shown.contains("***"))
    }

    @Test("what is not a password stays readable")
    func readable() {
        #expect(PostgresURL.redacted("host=h port=5432 dbname=app user=me") == "'host=h port=5432 dbname=app user=me'")
        #expect(PostgresURL.redacted("postgresql:///db?host=/tmp&user=u&password=x") == "'postgresql:///db?host=/tmp&user=u&password=***'")
        #expect(PostgresURL.redacted("host=h password = x port=1") == "'host=h password = *** port=1'")
        #expect(PostgresURL.redacted("postgresql://app@db.example:5432/app?sslmode=verify-full") == "'postgresql://app@db.example:5432/app?sslmode=verify-full'")
    }
}
