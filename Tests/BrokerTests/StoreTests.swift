import ControlProtocol
@testable import BrokerCore
import Foundation
import GRDB
import Testing
import TestSupport

/// A new store at `path` holding one gateway, "gw".
private func storeWithGateway(_ path: String) async throws -> SQLiteBrokerStore {
    let store = try SQLiteBrokerStore(path: path)
    _ = try await store.createGateway(GatewayChanges(name: "gw", address: "gw.example.com"), now: Date())
    return store
}

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
        _ = try await storeWithGateway(path)
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

    @Test("sessions are cached until a commit changes them: logout, password, disable, role, user or login gateway removed; expiry still counts; other writes keep the cache")
    func sessionCache() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let store = try SQLiteBrokerStore(path: folder.path("broker.sqlite"))
        defer { store.close() }
        let now = Date()
        let admin = try await store.createUser(UserChanges(login: "root", passwordHash: "x", role: .admin), now: now)
        let gateway = try await store.createGateway(GatewayChanges(name: "gw", address: "203.0.113.10"), now: now)
        var number = 0
        /// A fresh user with a session through `gateway`, found once so that it is cached.
        func cachedSession(role: UserRole = .user) async throws -> (User, String) {
            number += 1
            let user = try await store.createUser(UserChanges(login: "u\(number)", passwordHash: "x", role: role), now: now)
            let hash = Secrets.sha256Hex(Secrets.token())
            try await store.createSession(Session(tokenHash: hash, userID: user.id, created: now, expires: now.addingTimeInterval(60),
                                                  clientAddress: "", loginGatewayID: gateway.id))
            let before = store.cachedSessions
            #expect(try await store.session(tokenHash: hash, now: now)?.user.id == user.id)
            #expect(store.cachedSessions == before + 1, "the session found is cached")
            return (user, hash)
        }

        let (_, kept) = try await cachedSession()
        #expect(try await store.session(tokenHash: kept, now: now) != nil)
        // Writes that change no session keep the cache: a login, another user, a gateway, a rule.
        let entries = store.cachedSessions
        _ = try await cachedSession()
        _ = try await store.createGateway(GatewayChanges(name: "gw-2", address: "203.0.113.11"), now: now)
        try await store.recordHeartbeat(id: gateway.id, load: 0.1, sessions: 1, now: now)
        #expect(store.cachedSessions == entries + 1)
        // Expiry needs no write.
        #expect(try await store.session(tokenHash: kept, now: now.addingTimeInterval(60)) == nil)

        // Each write that ends or changes sessions empties the cache before it returns.
        var (user, hash) = try await cachedSession()
        let (_, stillLoggedIn) = try await cachedSession()
        let cachedBefore = store.cachedSessions
        try await store.deleteSession(tokenHash: hash)
        #expect(store.cachedSessions == cachedBefore - 1, "a logout drops its own session, not the others'")
        #expect(try await store.session(tokenHash: hash, now: now) == nil, "logout")
        #expect(try await store.session(tokenHash: stillLoggedIn, now: now) != nil)
        #expect(store.cachedSessions == cachedBefore - 1)

        (user, hash) = try await cachedSession()
        _ = try await store.updateUser(id: user.id, UserChanges(passwordHash: "y"), now: now)
        #expect(try await store.session(tokenHash: hash, now: now) == nil, "a new password")

        (user, hash) = try await cachedSession()
        _ = try await store.updateUser(id: user.id, UserChanges(enabled: false), now: now)
        #expect(try await store.session(tokenHash: hash, now: now) == nil, "the user disabled")

        (user, hash) = try await cachedSession(role: .admin)
        _ = try await store.updateUser(id: user.id, UserChanges(role: .user), now: now)
        #expect(try await store.session(tokenHash: hash, now: now)?.user.role == .user, "the role changed")

        (user, hash) = try await cachedSession()
        try await store.deleteUser(id: user.id)
        #expect(try await store.session(tokenHash: hash, now: now) == nil, "the user deleted")

        (user, hash) = try await cachedSession()
        #expect(store.cachedSessions > 0)
        #expect(try await store.deleteExpiredSessions(now: now.addingTimeInterval(61)) > 0)
        #expect(store.cachedSessions == 0, "expired sessions removed")

        // The login gateway removed: the session stays, without it.
        let other = try await store.createGateway(GatewayChanges(name: "gw-3", address: "203.0.113.12"), now: now)
        let hash3 = Secrets.sha256Hex(Secrets.token())
        try await store.createSession(Session(tokenHash: hash3, userID: admin.id, created: now,
                                              expires: now.addingTimeInterval(60), clientAddress: "", loginGatewayID: other.id))
        #expect(try await store.session(tokenHash: hash3, now: now)?.session.loginGatewayID == other.id)
        try await store.deleteGateway(id: other.id)
        let found = try await store.session(tokenHash: hash3, now: now)
        #expect(found != nil && found?.session.loginGatewayID == nil, "the login gateway deleted")

        // A failed write changes nothing, the cache included.
        let entriesBefore = store.cachedSessions
        await #expect(throws: StoreError.self) { try await store.deleteUser(id: admin.id) }
        #expect(store.cachedSessions == entriesBefore)
    }

    @Test("the read caches do not keep what a read found before a change committed during it; an expired session is dropped")
    func readCacheGeneration() {
        let cache = ReadCache<String, AuthenticatedSession>()
        let now = Date()
        let session = AuthenticatedSession(
            session: Session(tokenHash: "h", userID: 1, created: now, expires: now.addingTimeInterval(60), clientAddress: ""),
            user: User(id: 1, login: "u", displayName: "", role: .user, enabled: true, created: now, updated: now))
        let (none, generation) = cache.session("h", now: now)
        #expect(none == nil)
        cache.invalidate()   // a commit while the read ran
        cache.insert("h", session, ifGeneration: generation)
        #expect(cache.session("h", now: now).found == nil)
        let (_, current) = cache.session("h", now: now)
        cache.insert("h", session, ifGeneration: current)
        #expect(cache.session("h", now: now).found == session)
        #expect(cache.session("h", now: now.addingTimeInterval(60)).found == nil, "expired")
        #expect(cache.count == 0, "an expired entry is dropped")
    }

    @Test("connect readings are cached until a desktop, its protocols or entitlements, a gateway or a cluster change; rule writes and logins keep them; readings with rule counts are not cached")
    func readingCache() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let store = try SQLiteBrokerStore(path: folder.path("broker.sqlite"))
        defer { store.close() }
        let now = Date()
        let gateway = try await store.createGateway(GatewayChanges(name: "gw", address: "203.0.113.10"), now: now)
        let key = ControlKey.generate()
        try await store.enrollGateway(id: gateway.id, key: key, now: now)
        let bob = try await store.createUser(UserChanges(login: "bob", passwordHash: "x", role: .user), now: now)
        let alice = try await store.createUser(UserChanges(login: "alice", passwordHash: "x", role: .user), now: now)
        let desktop = try await store.createDesktop(DesktopChanges(name: "d", address: "10.0.0.5", protocols: [DesktopProtocol(name: "rdp", port: 3389)],
                                                                   gatewayID: .set(gateway.id), users: [bob.id, alice.id]), now: now)
        /// The reading, read twice: the second from the cache.
        func reading() async throws -> ConnectReading {
            let first = try await store.connectReading(desktopID: desktop.id)
            #expect(store.cachedReadings == 1)
            let second = try await store.connectReading(desktopID: desktop.id)
            #expect(second.desktop == first.desktop && second.gateways == first.gateways && second.controlKeys == first.controlKeys)
            return first
        }
        #expect(try await reading().desktop.users == [bob.id, alice.id].sorted())

        // Rule writes, reservations, logins, logouts keep it.
        let rule = GatewayRule(id: GatewayRule.newID(), gatewayID: gateway.id, desktopID: desktop.id, userID: bob.id, protocolName: "rdp",
                               push: RulePush(protocol: .tcp, method: .randomPort, target: "10.0.0.5:3389"), port: 40000, created: now)
        try await store.reserveRules([PendingRule(id: rule.id, gatewayID: gateway.id)], now: now)
        try await store.createRules([rule])
        let hash = Secrets.sha256Hex(Secrets.token())
        try await store.createSession(Session(tokenHash: hash, userID: bob.id, created: now, expires: now.addingTimeInterval(60), clientAddress: ""))
        try await store.deleteSession(tokenHash: hash)
        try await store.deleteRules(connectionID: rule.id)
        #expect(store.cachedReadings == 1)

        // Each change of what a reading says empties the cache before the write returns.
        _ = try await store.updateDesktop(id: desktop.id, DesktopChanges(users: [alice.id]), now: now)
        #expect(store.cachedReadings == 0)
        #expect(try await reading().desktop.users == [alice.id], "an entitlement removed")
        _ = try await store.updateDesktop(id: desktop.id, DesktopChanges(protocols: [DesktopProtocol(name: "rdp", port: 3390)]), now: now)
        #expect(try await reading().desktop.protocols.map(\.port) == [3390], "a protocol changed")
        _ = try await store.updateGateway(id: gateway.id, GatewayChanges(address: "203.0.113.20"), now: now)
        #expect(try await reading().gateways.map(\.address) == ["203.0.113.20"], "a gateway changed")
        let newKey = ControlKey.generate()
        try await store.enrollGateway(id: gateway.id, key: newKey, now: now)
        #expect(try await reading().controlKeys == [gateway.id: newKey], "a gateway enrolled again")
        try await store.recordHeartbeat(id: gateway.id, load: 0.5, sessions: 3, now: now.addingTimeInterval(5))
        #expect(store.cachedReadings == 0, "a heartbeat (a gateway's liveness is read from its row)")
        _ = try await reading()
        try await store.deleteUser(id: alice.id)
        #expect(try await reading().desktop.users.isEmpty, "an entitled user deleted")

        // A desktop in a cluster: its members and the cluster itself.
        let cluster = try await store.createGatewayCluster(GatewayClusterChanges(name: "East", loadBalanceVia: .everyGateway), now: now)
        let pooled = try await store.createDesktop(DesktopChanges(name: "p", address: "10.0.0.6", protocols: [DesktopProtocol(name: "rdp", port: 3389)],
                                                                  loadBalancerID: .set(cluster.id)), now: now)
        #expect(try await store.connectReading(desktopID: pooled.id).gateways.isEmpty)
        #expect(store.cachedReadings == 1)
        let member = try await store.createGateway(GatewayChanges(name: "m1", address: "198.51.100.1", loadBalancerID: .set(cluster.id)), now: now)
        #expect(try await store.connectReading(desktopID: pooled.id).gateways.map(\.id) == [member.id], "a new member")
        // Balanced by rule counts: read every time (the counts change with every connect).
        _ = try await store.updateGatewayCluster(id: cluster.id, GatewayClusterChanges(loadBalanceVia: .leastConnections), now: now)
        #expect(store.cachedReadings == 0, "the cluster changed")
        #expect(try await store.connectReading(desktopID: pooled.id).cluster?.loadBalanceVia == .leastConnections)
        #expect(store.cachedReadings == 0, "a reading with counts is not kept")
    }

    @Test("one read-write store per file: a second is refused naming the file and the holder, a read-only one is not; the lock goes with the store")
    func oneWriterPerFile() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let path = folder.path("broker.sqlite")
        do {
            let store = try await storeWithGateway(path)
            #expect {
                _ = try SQLiteBrokerStore(path: path)
            } throws: { error in
                guard case .unavailable(let message) = error as? StoreError else { return false }
                return message.contains(path) && message.contains("this process") && message.contains("\(path).lock")
                    && message.contains("PostgreSQL")
            }
            let readOnly = try SQLiteBrokerStore(path: path, mode: .readOnly)
            #expect(try await readOnly.gateways().map(\.name) == ["gw"])
            #expect(try await store.gateways().map(\.name) == ["gw"], "the first store is unharmed")
            store.close()
        }
        // Released with the store: the file opens read-write again.
        let again = try SQLiteBrokerStore(path: path)
        #expect(try await again.gateways().map(\.name) == ["gw"])
    }
}
