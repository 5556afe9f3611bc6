import ControlProtocol
@testable import BrokerCore
import Foundation
import GRDB
import Testing
import TestSupport

@Suite("SQLite store: its file", .offPool)
struct StoreTests {
    @Test("migrations run from an empty file: every table, WAL, foreign keys, schema current")
    func migrationsFromEmpty() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let path = folder.path("new.sqlite")
        #expect(!FileManager.default.fileExists(atPath: path))
        let store = try SQLiteBrokerStore(path: path)
        let schema = try await store.schema()
        #expect(schema.applied == ["0001-initial", "0002-control-plane", "0003-connection-groups", "0004-entitlements", "0005-forwarding-path", "0006-control-certificate", "0007-pending-rules"])
        #expect(schema.pending.isEmpty && schema.unknown.isEmpty)
        #expect(schema.version == "0007-pending-rules")
        #expect(try await store.synchronousSetting() == 2, "every commit synced (FULL), not GRDB's WAL default NORMAL")

        let queue = try DatabaseQueue(path: path)
        try await queue.read { db in
            let tables = try String.fetchAll(db, sql: "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            for table in ["desktop", "desktop_protocol", "desktop_user", "gateway", "gateway_cluster", "gateway_rule", "grdb_migrations", "user_account", "user_session"] {
                #expect(tables.contains(table), "table \(table) missing from \(tables)")
            }
            #expect(try String.fetchOne(db, sql: "PRAGMA journal_mode") == "wal")
            let gatewayColumns = try Row.fetchAll(db, sql: "PRAGMA table_info(gateway)").map { $0["name"] as String }
            for column in ["online", "version", "last_heartbeat", "key_fingerprint", "use_src_ip", "load_balancer_id", "control_key", "control_url"] {
                #expect(gatewayColumns.contains(column), "gateway.\(column) missing")
            }
        }
        try queue.close()
        let health = await store.health()
        #expect(health.isHealthy, "\(health)")
    }

    @Test("reopening keeps the data and applies no migration twice")
    func reopenKeepsData() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let path = folder.path("broker.sqlite")
        do {
            let store = try SQLiteBrokerStore(path: path)
            _ = try await store.createGateway(GatewayChanges(name: "gw", address: "gw.example.com"), now: Date())
        }
        let store = try SQLiteBrokerStore(path: path)
        #expect(try await store.gateways().map(\.name) == ["gw"])
        #expect(try await store.schema().applied == ["0001-initial", "0002-control-plane", "0003-connection-groups", "0004-entitlements", "0005-forwarding-path", "0006-control-certificate", "0007-pending-rules"])
    }

    @Test("a database from a newer broker is refused, naming the file and the migrations")
    func newerSchemaRefused() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let path = folder.path("broker.sqlite")
        _ = try SQLiteBrokerStore(path: path)
        let queue = try DatabaseQueue(path: path)
        try await queue.write { db in try db.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('9999-future')") }
        try queue.close()
        #expect {
            _ = try SQLiteBrokerStore(path: path)
        } throws: { error in
            guard case .unavailable(let message) = error as? StoreError else { return false }
            return message.contains(path) && message.contains("newer broker") && message.contains("9999-future")
        }
        let readOnly = try SQLiteBrokerStore(path: path, mode: .readOnly)
        let health = await readOnly.health()
        #expect(health.problem?.contains("9999-future") == true)
    }

    @Test("read-only mode: a missing file is an error, writes are refused, the file is not created")
    func readOnlyMode() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let missing = folder.path("missing.sqlite")
        #expect(throws: StoreError.unavailable("\(missing): no such database file")) {
            _ = try SQLiteBrokerStore(path: missing, mode: .readOnly)
        }
        #expect(!FileManager.default.fileExists(atPath: missing))

        let path = folder.path("broker.sqlite")
        _ = try SQLiteBrokerStore(path: path)
        let store = try SQLiteBrokerStore(path: path, mode: .readOnly)
        await #expect(throws: StoreError.self) {
            _ = try await store.createGateway(GatewayChanges(name: "gw", address: "gw.example.com"), now: Date())
        }
        #expect(try await store.gateways().isEmpty)
    }

    @Test("a file that is not a database is refused at open")
    func garbageFileRefused() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let path = folder.path("garbage.sqlite")
        try Data(repeating: 0x41, count: 8192).write(to: URL(fileURLWithPath: path))
        #expect {
            _ = try SQLiteBrokerStore(path: path)
        } throws: { error in
            guard case .unavailable(let message) = error as? StoreError else { return false }
            return message.contains(path) && message.contains("not a database")
        }
    }
}

@Suite("secrets and validation", .offPool)
struct SecretsTests {
    @Test("password hashes: salted, verified, the whole of a long password counts")
    func passwordHashes() {
        let hasher = PasswordHasher(cost: 4)
        let first = hasher.hash("correct horse")
        let second = hasher.hash("correct horse")
        #expect(first != second, "two hashes of one password must differ (salt)")
        #expect(first.hasPrefix("bcrypt-sha256$") && first.contains("$2b$04$"))
        #expect(hasher.verify("correct horse", against: first))
        #expect(hasher.verify("correct horse", against: second))
        #expect(!hasher.verify("correct horsE", against: first))
        #expect(!hasher.verify("correct horse", against: "garbage"))
        #expect(!hasher.verify("correct horse", against: "bcrypt-sha256$AAAA$x"))

        // bcrypt alone reads 72 bytes: these differ only at character 100.
        let long = String(repeating: "p", count: 99)
        let stored = hasher.hash(long + "a")
        #expect(hasher.verify(long + "a", against: stored))
        #expect(!hasher.verify(long + "b", against: stored))
        // Canonically equivalent forms of a password match (NFC).
        let composed = hasher.hash("caf\u{E9}-pass")
        #expect(hasher.verify("cafe\u{301}-pass", against: composed))
    }

    @Test("tokens: 256 random bits, base64url, never repeated; SHA-256 matches the standard vector")
    func tokens() {
        var seen = Set<String>()
        for _ in 0..<1000 {
            let token = Secrets.token()
            #expect(Secrets.looksLikeToken(token))
            #expect(seen.insert(token).inserted)
        }
        #expect(!Secrets.looksLikeToken("short"))
        #expect(!Secrets.looksLikeToken(String(repeating: "a", count: 42) + "!"))
        #expect(Secrets.sha256Hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test("field checks name the field and say what is wrong")
    func validation() throws {
        #expect(throws: FieldError("name", "must be 1 to 100 characters, got 101")) {
            try Validate.name(String(repeating: "n", count: 101), field: "name")
        }
        #expect(throws: FieldError("name", "is required (1 to 100 characters)")) { try Validate.name("", field: "name") }
        #expect(throws: FieldError("name", "must not be only blanks")) { try Validate.name("   ", field: "name") }
        #expect(throws: FieldError("name", "must not contain control character U+000A")) { try Validate.name("a\nb", field: "name") }
        try Validate.host("192.0.2.1", field: "address", required: true)
        try Validate.host("2001:db8::1", field: "address", required: true)
        try Validate.host("gw-1.example.com.", field: "address", required: true)
        #expect(throws: FieldError.self) { try Validate.host("bad host", field: "address", required: true) }
        #expect(throws: FieldError.self) { try Validate.host("-bad.example.com", field: "address", required: true) }
        #expect(throws: FieldError.self) { try Validate.host(String(repeating: "a", count: 256), field: "address", required: true) }
        #expect(throws: FieldError("use_src_ip", "must be 0 (random port, anyone), 1 (protocol port, client IP only) or 2 (random port, client IP only), got 3")) {
            _ = try SourceIPMode.parse(3)
        }
        #expect(try SourceIPMode.parse(1) == .protocolPortClientOnly)
        #expect(try LoadBalanceMethod.parse("P") == .loginGateway)
        #expect(throws: FieldError.self) { _ = try LoadBalanceMethod.parse("e") }
        try Validate.notes(String(repeating: "x", count: 4095) , field: "notes")
        #expect(throws: FieldError("notes", "must be at most 4095 characters, got 4096")) {
            try Validate.notes(String(repeating: "x", count: 4096), field: "notes")
        }
        try Validate.notes("line one\nline two\ttab", field: "notes")
    }
}
