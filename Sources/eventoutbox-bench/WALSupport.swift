import ArgumentParser
import EventStore
import Foundation
import OutboxRelayStore
import LibPQ

/// A publication and slot of a bench schema's own (`--source wal`), dropped afterwards.
func withWAL<T>(_ url: String, _ body: (OutboxWAL) async throws -> T) async throws -> T {
    let suffix = UUID().uuidString.prefix(8).lowercased()
    let wal = try OutboxWAL(publication: "bench_pub_\(suffix)", slot: "bench_slot_\(suffix)")
    let connection = try await PQConnection.connect(to: url)
    try await wal.setUp(on: connection)
    func drop() async throws {
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            do {
                _ = try await wal.dropSlot(on: connection)
                break
            } catch let error as PQError where error.sqlState == SQLState.objectInUse && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        try await wal.dropPublication(on: connection)
    }
    do {
        let value = try await body(wal)
        try await drop()
        return value
    } catch {
        try? await drop()
        throw error
    }
}

/// The server's current WAL position.
func currentLSN(_ connection: PQConnection) async throws -> PostgresLSN {
    let text = try await connection.queryOne("SELECT pg_current_wal_lsn()::text AS lsn").decode(String.self, "lsn")
    return PostgresLSN(text)!
}

/// The slot's confirmed position.
func confirmedLSN(_ connection: PQConnection, _ wal: OutboxWAL) async throws -> PostgresLSN {
    let text = try await connection.queryOne(
        "SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = $1", [.text(wal.slot)]
    ).decode(String.self, "lsn")
    return PostgresLSN(text)!
}

/// A PostgreSQL client program (pgbench, pg_recvlogical) from `EO_PG_BINDIR` or Debian's folders.
func postgresProgram(_ name: String) throws -> String {
    var folders: [String] = []
    if let bindir = ProcessInfo.processInfo.environment["EO_PG_BINDIR"] { folders.append(bindir) }
    let versions = (try? FileManager.default.contentsOfDirectory(atPath: "/usr/lib/postgresql")) ?? []
    folders += versions.sorted(by: >).map { "/usr/lib/postgresql/\($0)/bin" }
    folders.append("/usr/bin")
    guard let folder = folders.first(where: { FileManager.default.isExecutableFile(atPath: "\($0)/\(name)") }) else {
        throw ValidationError("\(name) not found: install postgresql (scripts/bench does) or set EO_PG_BINDIR")
    }
    return "\(folder)/\(name)"
}

/// Runs a program to completion with its output discarded (or captured); throws on a non-zero exit.
@discardableResult
func runProgram(_ path: String, _ arguments: [String], capture: Bool = false) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = capture ? pipe : FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    let output = capture ? pipe.fileHandleForReading.readDataToEndOfFile() : Data()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw ValidationError("\((path as NSString).lastPathComponent) exited with status \(process.terminationStatus)")
    }
    return String(decoding: output, as: UTF8.self)
}
