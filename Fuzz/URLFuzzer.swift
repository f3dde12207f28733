// libFuzzer target: PostgresURL.redacted, which every connection error message goes through. Property: a
// password placed in any of the forms libpq reads never survives into the message, whatever surrounds it.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzURL(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    let parts = text.split(separator: "\u{1}", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
    let (head, tail) = (parts[0], parts.count > 1 ? parts[1] : "")
    let secret = "Zq7Secret" + String(size)
    for url in [
        "postgresql://user:\(secret)@host/db?\(tail)",
        "postgres://\(head):\(secret)@host:5432/db",
        "postgresql:///db?\(head)&password=\(secret)&\(tail)",
        "host=h \(head) password=\(secret) \(tail)",
        "host=h \(head) PASSWORD=\(secret)",
        // The spellings libpq also takes: spaces around "=", a percent-encoded parameter name.
        "host=h \(head) password = \(secret) \(tail)",
        "host=h password=  \(secret)",
        "postgresql:///db?\(head)&passwor%64=\(secret)&\(tail)",
        "postgresql:///db?%70assword=\(secret)&\(tail)",
        // Inside quotes, where the value ends at the closing quote: the head must not close it early (scalars,
        // not characters: a combining mark would hide a quote from a character filter).
        "host=h password='\(String(String.UnicodeScalarView(head.unicodeScalars.filter { $0 != "'" && $0 != "\\" }))) \(secret)' \(tail)",
    ] {
        precondition(!PostgresURL.redacted(url).contains(secret), "the password survives redaction in: \(url)")
    }
    return 0
}
