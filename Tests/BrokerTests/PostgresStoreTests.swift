import BrokerCore
import BrokerPostgres
import ControlProtocol
import Foundation
import Testing
import TestSupport

@Suite("PostgreSQL store: a cluster of brokers, switch-database, settings", .offPool)
struct PostgresStoreTests {
    @Test("two stores on one database: each sees the other's writes; races end as if the calls ran one after the other")
    func twoBrokersOneDatabase() async throws {
        try await TestPostgres.withDatabase { settings in
            // Both open (and migrate) at once: the advisory lock makes one migrate.
            async let openedA = TestPostgres.open(settings)
            async let openedB = TestPostgres.open(settings)
            let (a, b) = try await (openedA, openedB)
            defer { Task { await a.close(); await b.close() } }
            #expect(try await a.schema().applied == StoreContractTests.known)

            let now = Date()
            let gateway = try await a.createGateway(GatewayChanges(name: "gw-a", address: "198.51.100.10"), now: now)
            _ = try await b.registerGateway(id: gateway.id, GatewayRegistration(version: "2", controlURL: "http://198.51.100.10:9443",
                                                                               portRange: PortRange(first: 41000, last: 41999), ruleIDs: []), now: now)
            let seen = try await a.gateway(id: gateway.id)
            #expect(seen.online && seen.version == "2", "a registration through one broker is seen by the other")

            // A rule one broker is pushing is kept by a registration with the other.
            let pushing = GatewayRule.newID()
            try await a.reserveRules([PendingRule(id: pushing, gatewayID: gateway.id)], now: now)
            let kept = try await b.registerGateway(id: gateway.id, GatewayRegistration(version: "2", controlURL: "http://198.51.100.10:9443",
                                                                                      portRange: PortRange(first: 41000, last: 41999),
                                                                                      ruleIDs: [pushing]), now: now)
            #expect(kept == [pushing], "one broker's reservation is seen by the other's registration")
            try await a.releaseRules(ids: [pushing])

            // The same name created through both at once, 10 times: exactly one wins each time.
            for round in 0..<10 {
                async let first: Result<Gateway, StoreError> = Self.result { try await a.createGateway(GatewayChanges(name: "race-\(round)", address: "192.0.2.\(round * 2 + 1)"), now: now) }
                async let second: Result<Gateway, StoreError> = Self.result { try await b.createGateway(GatewayChanges(name: "RACE-\(round)", address: "192.0.2.\(round * 2 + 2)"), now: now) }
                let outcomes = await [first, second]
                let created = outcomes.filter { if case .success = $0 { true } else { false } }
                #expect(created.count == 1, "round \(round): \(outcomes)")
                for case .failure(let error) in outcomes {
                    guard case .conflict(let field, _) = error else { Issue.record("round \(round): \(error)"); continue }
                    #expect(field == "name")
                }
            }

            // Two admins; each broker demotes a different one at the same time:
            // the last-admin rule holds across brokers (one demotion is refused).
            for round in 0..<5 {
                let x = try await a.createUser(UserChanges(login: "admin-x\(round)", passwordHash: "h", role: .admin), now: now)
                let y = try await a.createUser(UserChanges(login: "admin-y\(round)", passwordHash: "h", role: .admin), now: now)
                for other in try await a.users() where other.role == .admin && other.id != x.id && other.id != y.id {
                    _ = try await a.updateUser(id: other.id, UserChanges(role: .user), now: now)
                }
                async let demoteX = Self.result { try await a.updateUser(id: x.id, UserChanges(role: .user), now: now) }
                async let demoteY = Self.result { try await b.updateUser(id: y.id, UserChanges(role: .user), now: now) }
                _ = await (demoteX, demoteY)
                let admins = try await b.users().filter { $0.role == .admin && $0.enabled }
                #expect(admins.count == 1, "round \(round): \(admins.map(\.login)) enabled admins left")
            }

            // Offline marking: both brokers sweep at once, each silent gateway is reported once in all.
            var silent: [Int64] = []
            for index in 0..<6 {
                let quiet = try await a.createGateway(GatewayChanges(name: "quiet-\(index)", address: "203.0.113.\(index + 1)"), now: now)
                try await a.recordHeartbeat(id: quiet.id, load: 0, sessions: 0, now: now.addingTimeInterval(-600))
                silent.append(quiet.id)
            }
            let cutoff = now.addingTimeInterval(-60)
            async let sweepA = a.markGatewaysOffline(heartbeatBefore: cutoff)
            async let sweepB = b.markGatewaysOffline(heartbeatBefore: cutoff)
            let (marksA, marksB) = try await (sweepA, sweepB)
            #expect((marksA + marksB).sorted() == silent, "A marked \(marksA), B marked \(marksB)")
            #expect(try await a.markGatewaysOffline(heartbeatBefore: cutoff).isEmpty)
            #expect(try await b.markGatewaysOffline(heartbeatBefore: cutoff).isEmpty)
        }
    }

    @Test("switch-database copies every row with its id, keys and hashes; a second copy is refused and changes nothing")
    func switchDatabase() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let path = folder.path("broker.sqlite")
        let now = Date(timeIntervalSince1970: 1_850_000_000.25)
        let source = try SQLiteBrokerStore(path: path)
        let cluster = try await source.createGatewayCluster(GatewayClusterChanges(name: "E", loadBalanceVia: .everyGateway), now: now)
        _ = try await source.createGatewayCluster(GatewayClusterChanges(name: "gone", loadBalanceVia: .everyGateway), now: now)
        try await source.deleteGatewayCluster(id: 2)   // a hole in the ids
        let gateway = try await source.createGateway(GatewayChanges(name: "gw", address: "gw.example.com", loadBalancerID: .set(cluster.id)), now: now)
        let key = ControlKey.generate()
        try await source.enrollGateway(id: gateway.id, key: key, now: now)
        _ = try await source.registerGateway(id: gateway.id, GatewayRegistration(version: "3", controlURL: "http://10.0.0.1:9443",
                                                                                portRange: PortRange(first: 40000, last: 40100), ruleIDs: []), now: now)
        try await source.recordHeartbeat(id: gateway.id, load: 0.75, sessions: 2, now: now)
        let user = try await source.createUser(UserChanges(login: "alice", passwordHash: "bcrypt-sha256$secret-hash", displayName: "Alice", role: .admin), now: now)
        let desktop = try await source.createDesktop(DesktopChanges(name: "desk", address: "10.1.0.5",
                                                                    protocols: [DesktopProtocol(name: "rdp", port: 3389), DesktopProtocol(name: "pcoip", port: 4172, transport: .both)],
                                                                    gatewayID: .set(gateway.id), users: [user.id]), now: now)
        let session = Session(tokenHash: Secrets.sha256Hex("token"), userID: user.id, created: now, expires: now.addingTimeInterval(3600),
                              clientAddress: "192.0.2.1", loginGatewayID: gateway.id)
        try await source.createSession(session)
        let rule = GatewayRule(id: GatewayRule.newID(), gatewayID: gateway.id, desktopID: desktop.id, userID: user.id, protocolName: "rdp",
                               push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.5:3389"), port: 40007, created: now)
        try await source.createRules([rule])
        let before = try await Snapshot(source)
        source.close()

        try await TestPostgres.withDatabase { settings in
            let target = try await TestPostgres.open(settings)
            do {
                let report = try await DatabaseSwitch.copy(from: path, to: target)
                #expect(report.rows["gateway"] == 1 && report.rows["desktop_protocol"] == 2 && report.rows["user_session"] == 1)
                let after = try await Snapshot(target)
                #expect(after == before)
                #expect(try await target.controlKey(gatewayID: gateway.id) == key)
                #expect(try await target.credentials(login: "ALICE")?.passwordHash == "bcrypt-sha256$secret-hash")
                #expect(try await target.session(tokenHash: session.tokenHash, now: now)?.session == session)
                // New ids continue after the copied ones.
                let next = try await target.createGatewayCluster(GatewayClusterChanges(name: "W", loadBalanceVia: .loginGateway), now: now)
                #expect(next.id == 3)

                // A second copy into the now non-empty database: refused, nothing changed.
                let snapshot = try await Snapshot(target)
                await #expect {
                    _ = try await DatabaseSwitch.copy(from: path, to: target)
                } throws: { error in
                    guard case .unavailable(let message) = error as? StoreError else { return false }
                    return message.contains("is not empty") && message.contains("nothing was copied")
                }
                #expect(try await Snapshot(target) == snapshot)
                await target.close()
            } catch {
                await target.close()
                throw error
            }
        }

        // A missing file is named.
        try await TestPostgres.withDatabase { settings in
            let target = try await TestPostgres.open(settings)
            await #expect(throws: StoreError.unavailable("\(folder.path("missing.sqlite")): no such database file")) {
                _ = try await DatabaseSwitch.copy(from: folder.path("missing.sqlite"), to: target)
            }
            await target.close()
        }
    }

    @Test("a database from a newer broker is refused; an unreachable server is unavailable, naming it")
    func refusals() async throws {
        try await TestPostgres.withDatabase { settings in
            let store = try await TestPostgres.open(settings)
            let (server, password, _) = try TestPostgres.environment
            try await TestPostgres.administer(server, password: password, "INSERT INTO broker_migrations (identifier) VALUES ('9999-future')",
                                              database: settings.database)
            await store.close()
            await #expect {
                _ = try await TestPostgres.open(settings)
            } throws: { error in
                guard case .unavailable(let message) = error as? StoreError else { return false }
                return message.contains("newer broker") && message.contains("9999-future") && message.contains(settings.database)
            }
            let readOnly = try await TestPostgres.open(settings, migrate: false)
            #expect(await readOnly.health().problem?.contains("9999-future") == true)
            await readOnly.close()
        }
        var nowhere = try TestPostgres.environment.settings
        nowhere.port = 1
        let store = try PostgresBrokerStore(settings: nowhere, password: "x", logger: TestPostgres.logger)
        let health = await store.health()
        #expect(health.problem?.contains("127.0.0.1:1") == true, "\(health)")
        await store.close()
        // A wrong password: the server's refusal, named.
        let wrong = try PostgresBrokerStore(settings: try TestPostgres.environment.settings, password: "wrong", logger: TestPostgres.logger)
        let refused = await wrong.health()
        #expect(refused.problem?.contains("password authentication failed") == true, "\(refused)")
        await wrong.close()
    }

    @Test("TLS to the server: required, and verified against its CA")
    func tls() async throws {
        let (server, _, ca) = try TestPostgres.environment
        var settings = server
        settings.tlsMode = .require
        let required = try PostgresBrokerStore(settings: settings, password: try TestPostgres.password, logger: TestPostgres.logger)
        #expect(await required.health().problem?.contains("schema is not current") == true, "connects over TLS to the bare postgres database")
        await required.close()
        guard let ca else { Issue.record("RDG_TEST_POSTGRES_CA is not set"); return }
        settings.host = "localhost"
        settings.tlsMode = .verifyFull
        settings.rootCertificate = ca
        let verified = try PostgresBrokerStore(settings: settings, password: try TestPostgres.password, logger: TestPostgres.logger)
        #expect(await verified.health().problem?.contains("schema is not current") == true)
        await verified.close()
        // Verification against a CA that did not sign the server's certificate fails.
        settings.rootCertificate = "/etc/ssl/certs/ca-certificates.crt"
        let wrongCA = try PostgresBrokerStore(settings: settings, password: try TestPostgres.password, logger: TestPostgres.logger)
        let problem = await wrongCA.health().problem ?? ""
        #expect(!problem.contains("schema"), "connected although the certificate does not chain to the given CA: \(problem)")
        await wrongCA.close()
    }

    @Test("database URLs: parsed as libpq writes them; a password in the URL and unknown parts are refused, named")
    func settings() throws {
        let plain = try PostgresSettings.parse("postgres://broker@db.example.com/leostream")
        #expect(plain == PostgresSettings(host: "db.example.com", port: 5432, user: "broker", database: "leostream"))
        #expect(plain.location == "postgres://broker@db.example.com:5432/leostream")
        let full = try PostgresSettings.parse("postgresql://broker@[2001:db8::5]:6432/lb?sslmode=verify-full&sslrootcert=/etc/ca.pem")
        #expect(full.host == "2001:db8::5" && full.port == 6432 && full.tlsMode == .verifyFull && full.rootCertificate == "/etc/ca.pem")
        let socket = try PostgresSettings.parse("postgres://broker@/lb?host=/run/postgresql")
        #expect(socket.socketDirectory == "/run/postgresql" && socket.host == "localhost")

        func refusal(_ url: String) -> String {
            do { _ = try PostgresSettings.parse(url); return "" } catch { return error.description }
        }
        #expect(refusal("postgres://broker:hunter2@db/lb").contains("must not hold the password"))
        #expect(!refusal("postgres://broker:hunter2@db/lb").contains("hunter2"))
        #expect(refusal("postgres://db/lb").contains("names no user"))
        #expect(refusal("postgres://broker@db/").contains("names no database"))
        #expect(refusal("postgres://broker@db/lb?sslmode=sometimes").contains("sslmode must be one of disable, prefer, require, verify-full"))
        #expect(refusal("postgres://broker@db/lb?colour=blue").contains("unknown parameter 'colour'"))
        #expect(refusal("postgres://broker@db/lb?sslrootcert=/x").contains("only with sslmode=verify-full"))
        #expect(refusal("mysql://broker@db/lb").contains("must be postgres://"))
    }

    static func result<T>(_ body: () async throws -> T) async -> Result<T, StoreError> {
        do { return .success(try await body()) } catch let error as StoreError { return .failure(error) } catch {
            return .failure(.unavailable("not a StoreError: \(error)"))
        }
    }
}

/// Everything a store answers through the interface, for before/after comparisons.
struct Snapshot: Equatable {
    var gateways: [Gateway]
    var clusters: [GatewayCluster]
    var desktops: [Desktop]
    var users: [User]
    var rules: [GatewayRule]

    init(_ store: any BrokerStore) async throws {
        gateways = try await store.gateways()
        clusters = try await store.gatewayClusters()
        desktops = try await store.desktops()
        users = try await store.users()
        rules = try await store.rules(gatewayID: nil)
    }
}
