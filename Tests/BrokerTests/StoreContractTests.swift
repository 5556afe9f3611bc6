import BrokerCore
import ControlProtocol
import Foundation
import Testing
import TestSupport

/// The `BrokerStore` contract, run on both stores: the embedded SQLite one
/// and PostgreSQL (a real server started by scripts/test).
@Suite("store contract (SQLite and PostgreSQL)", .offPool)
struct StoreContractTests {
    static let known = ["0001-initial", "0002-control-plane", "0003-connection-groups", "0004-entitlements", "0005-forwarding-path", "0006-control-certificate", "0007-pending-rules"]

    @Test("a new store has every migration applied and is healthy", arguments: StoreBackend.allCases)
    func migrated(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            let schema = try await store.schema()
            #expect(schema.applied == Self.known)
            #expect(schema.pending.isEmpty && schema.unknown.isEmpty)
            let health = await store.health()
            #expect(health.isHealthy, "\(health)")
            #expect(try await store.userCount() == 0)
        }
    }

    @Test("store rules: references, uniqueness without case, in-use deletes, the last admin", arguments: StoreBackend.allCases)
    func storeRules(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            let now = Date()
            let cluster = try await store.createGatewayCluster(GatewayClusterChanges(name: "East", loadBalanceVia: .leastConnections), now: now)
            let gateway = try await store.createGateway(GatewayChanges(name: "gw-1", address: "203.0.113.10",
                                                                       loadBalancerID: .set(cluster.id), useSourceIP: .randomPortClientOnly), now: now)
            #expect(gateway.loadBalancerID == cluster.id)
            #expect(gateway.useSourceIP == .randomPortClientOnly)
            #expect(!gateway.online)

            await #expect(throws: StoreError.conflict(field: "name", message: "a gateway named 'GW-1' already exists (id \(gateway.id))")) {
                _ = try await store.createGateway(GatewayChanges(name: "GW-1", address: "203.0.113.11"), now: now)
            }
            await #expect(throws: StoreError.invalid(FieldError("load_balancer_id", "no gateway cluster with id 99"))) {
                _ = try await store.createGateway(GatewayChanges(name: "gw-2", address: "203.0.113.12", loadBalancerID: .set(99)), now: now)
            }
            await #expect(throws: StoreError.inUse("gateway cluster \(cluster.id) is in use: 1 gateway(s) and 0 desktop(s) name it in load_balancer_id")) {
                try await store.deleteGatewayCluster(id: cluster.id)
            }
            await #expect(throws: StoreError.notFound("no gateway with id 42")) {
                try await store.deleteGateway(id: 42)
            }

            // Control-plane columns.
            let beat = Date(timeIntervalSince1970: 1_800_000_000)
            try await store.recordGatewayState(id: gateway.id, online: true, version: "1.2.3", heartbeat: beat)
            let key = ControlKey.generate()
            try await store.enrollGateway(id: gateway.id, key: key, now: now)
            let updated = try await store.gateway(id: gateway.id)
            #expect(updated.online && updated.version == "1.2.3" && updated.lastHeartbeat == beat)
            #expect(updated.keyFingerprint == Secrets.fingerprint(key) && updated.enrolled)
            #expect(try await store.controlKey(gatewayID: gateway.id) == key)
            #expect(try await store.controlKey(gatewayID: 4242) == nil)

            let admin = try await store.createUser(UserChanges(login: "root", passwordHash: "x", role: .admin), now: now)
            await #expect(throws: StoreError.inUse("user \(admin.id) is the last enabled admin and cannot be deleted")) {
                try await store.deleteUser(id: admin.id)
            }
            await #expect(throws: StoreError.self) { _ = try await store.updateUser(id: admin.id, UserChanges(role: .user), now: now) }
            await #expect(throws: StoreError.self) { _ = try await store.updateUser(id: admin.id, UserChanges(enabled: false), now: now) }
            await #expect(throws: StoreError.conflict(field: "login", message: "a user with login 'ROOT' already exists (id \(admin.id))")) {
                _ = try await store.createUser(UserChanges(login: "ROOT", passwordHash: "x", role: .user), now: now)
            }
            _ = try await store.createUser(UserChanges(login: "second", passwordHash: "x", role: .admin), now: now)
            try await store.deleteUser(id: admin.id)
            #expect(try await store.users().map(\.login) == ["second"])
            #expect(try await store.credentials(login: "SECOND")?.passwordHash == "x")
            #expect(try await store.credentials(login: "nobody") == nil)
        }
    }

    @Test("sessions: found by hash until they expire, gone with their user", arguments: StoreBackend.allCases)
    func sessions(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            let now = Date()
            let user = try await store.createUser(UserChanges(login: "u", passwordHash: "x", role: .user), now: now)
            let hash = Secrets.sha256Hex(Secrets.token())
            try await store.createSession(Session(tokenHash: hash, userID: user.id, created: now, expires: now.addingTimeInterval(60), clientAddress: ""))
            #expect(try await store.session(tokenHash: hash, now: now)?.user.login == "u")
            #expect(try await store.session(tokenHash: hash, now: now.addingTimeInterval(61)) == nil)
            #expect(try await store.deleteExpiredSessions(now: now.addingTimeInterval(61)) == 1)
            try await store.createSession(Session(tokenHash: hash, userID: user.id, created: now, expires: now.addingTimeInterval(60), clientAddress: ""))
            // A new password ends the user's sessions.
            _ = try await store.updateUser(id: user.id, UserChanges(passwordHash: "y"), now: now)
            #expect(try await store.session(tokenHash: hash, now: now) == nil)
            try await store.createSession(Session(tokenHash: hash, userID: user.id, created: now, expires: now.addingTimeInterval(60), clientAddress: "192.0.2.7"))
            #expect(try await store.session(tokenHash: hash, now: now)?.session.clientAddress == "192.0.2.7")
            try await store.deleteUser(id: user.id)
            #expect(try await store.session(tokenHash: hash, now: now) == nil)
        }
    }

    @Test("desktops: protocols in order, entitlements, references, in-use deletes", arguments: StoreBackend.allCases)
    func desktops(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            let now = Date()
            let gateway = try await store.createGateway(GatewayChanges(name: "gw", address: "gw.example.com"), now: now)
            let alice = try await store.createUser(UserChanges(login: "alice", passwordHash: "x", role: .user), now: now)
            let bob = try await store.createUser(UserChanges(login: "bob", passwordHash: "x", role: .user), now: now)
            let protocols = [DesktopProtocol(name: "rdp", port: 3389), DesktopProtocol(name: "pcoip", port: 4172, transport: .both)]
            let desktop = try await store.createDesktop(DesktopChanges(name: "Desk", address: "10.0.0.5", protocols: protocols,
                                                                       gatewayID: .set(gateway.id), users: [bob.id, alice.id]), now: now)
            #expect(desktop.protocols == protocols)
            #expect(desktop.users == [alice.id, bob.id].sorted())
            #expect(try await store.desktop(id: desktop.id) == desktop)
            #expect(try await store.desktops() == [desktop])

            await #expect(throws: StoreError.invalid(FieldError("users", "no user with id 999"))) {
                _ = try await store.createDesktop(DesktopChanges(name: "Other", address: "10.0.0.6", protocols: protocols, users: [999]), now: now)
            }
            await #expect(throws: StoreError.conflict(field: "name", message: "a desktop named 'desk' already exists (id \(desktop.id))")) {
                _ = try await store.createDesktop(DesktopChanges(name: "desk", address: "10.0.0.6", protocols: protocols), now: now)
            }
            #expect(try await store.desktops().count == 1, "a refused create stored nothing")

            let later = now.addingTimeInterval(5)
            let changed = try await store.updateDesktop(id: desktop.id, DesktopChanges(protocols: [DesktopProtocol(name: "ssh", port: 22)], users: []), now: later)
            #expect(changed.protocols.map(\.name) == ["ssh"] && changed.users.isEmpty)
            #expect(try await store.desktop(id: desktop.id) == changed)

            // A rule leads to it: neither it nor its gateway can go.
            let rule = GatewayRule(id: GatewayRule.newID(), gatewayID: gateway.id, desktopID: desktop.id, userID: alice.id,
                                   protocolName: "ssh", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.0.0.5:22"),
                                   port: 40001, created: now)
            try await store.createRules([rule])
            await #expect(throws: StoreError.inUse("desktop \(desktop.id) is in use: 1 connection rule(s) lead to it (DELETE /v1/connect/{rule_id} first)")) {
                try await store.deleteDesktop(id: desktop.id)
            }
            await #expect(throws: StoreError.inUse("gateway \(gateway.id) is in use: 1 desktop(s) name it in gateway_id")) {
                try await store.deleteGateway(id: gateway.id)
            }
            try await store.deleteRule(id: rule.id)
            try await store.deleteDesktop(id: desktop.id)
            await #expect(throws: StoreError.notFound("no desktop with id \(desktop.id)")) { _ = try await store.desktop(id: desktop.id) }
            try await store.deleteGateway(id: gateway.id)
        }
    }

    @Test("rules: one connect call all or none, by gateway, by connection, ports, deletes", arguments: StoreBackend.allCases)
    func rules(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            // Whole seconds: rules are compared with what the store gives back.
            let now = Date(timeIntervalSince1970: 1_900_000_100)
            let one = try await store.createGateway(GatewayChanges(name: "one", address: "198.51.100.1"), now: now)
            let two = try await store.createGateway(GatewayChanges(name: "two", address: "198.51.100.2"), now: now)
            let push = RulePush(protocol: .tcp, method: .randomPort, target: "10.0.0.5:3389")
            let first = GatewayRule(id: GatewayRule.newID(), gatewayID: one.id, desktopID: nil, userID: nil, protocolName: "rdp",
                                    push: push, port: 40000, created: now)
            let sibling = GatewayRule(id: GatewayRule.newID(), gatewayID: two.id, desktopID: nil, userID: nil, protocolName: "rdp",
                                      push: push, port: 40000, created: now, connectionID: first.id)
            // One rule names a gateway that does not exist: nothing is stored.
            let orphan = GatewayRule(id: GatewayRule.newID(), gatewayID: 999, desktopID: nil, userID: nil, protocolName: "rdp",
                                     push: push, port: 40000, created: now, connectionID: first.id)
            await #expect(throws: StoreError.self) { try await store.createRules([first, sibling, orphan]) }
            #expect(try await store.rules(gatewayID: nil).isEmpty)

            try await store.createRules([sibling, first])
            #expect(try await store.rules(connectionID: first.id).map(\.id) == [first.id, sibling.id])
            #expect(try await store.rules(gatewayID: two.id) == [sibling])
            #expect(try await store.rule(id: first.id) == first)
            #expect(try await store.ruleCounts() == [one.id: 1, two.id: 1])
            try await store.updateRulePort(id: sibling.id, port: 40100)
            #expect(try await store.rule(id: sibling.id).port == 40100)
            await #expect(throws: StoreError.notFound("no connection rule with id 'nope'")) { try await store.updateRulePort(id: "nope", port: 1) }
            await #expect(throws: StoreError.notFound("no connection rule with id 'nope'")) { try await store.deleteRule(id: "nope") }

            // Registration keeps the rules the broker still has, in the order reported.
            let kept = try await store.registerGateway(id: one.id, GatewayRegistration(version: "9", controlURL: "http://198.51.100.1:9443",
                                                                                      portRange: PortRange(first: 40000, last: 40999),
                                                                                      ruleIDs: ["gone", first.id, first.id]), now: now)
            #expect(kept == [first.id])
            let registered = try await store.gateway(id: one.id)
            #expect(registered.online && registered.portRange == PortRange(first: 40000, last: 40999) && registered.controlURL == "http://198.51.100.1:9443")

            try await store.deleteRules(connectionID: first.id)
            #expect(try await store.rules(gatewayID: nil).isEmpty)
            await #expect(throws: StoreError.notFound("no connection with rule_id '\(first.id)'")) { try await store.deleteRules(connectionID: first.id) }
        }
    }

    @Test("a rule being pushed is kept by a registration until it is stored or released; a reservation past its lifetime is not", arguments: StoreBackend.allCases)
    func reservations(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            let now = Date(timeIntervalSince1970: 1_900_000_200)
            let one = try await store.createGateway(GatewayChanges(name: "one", address: "198.51.100.1"), now: now)
            let two = try await store.createGateway(GatewayChanges(name: "two", address: "198.51.100.2"), now: now)
            func register(_ gateway: Gateway, _ ids: [String], at time: Date) async throws -> [String] {
                try await store.registerGateway(id: gateway.id, GatewayRegistration(version: "9", controlURL: "http://\(gateway.address):9443",
                                                                                   portRange: PortRange(first: 40000, last: 40999),
                                                                                   ruleIDs: ids), now: time)
            }
            let stored = GatewayRule.newID(), released = GatewayRule.newID(), elsewhere = GatewayRule.newID()
            try await store.reserveRules([PendingRule(id: stored, gatewayID: one.id), PendingRule(id: released, gatewayID: one.id),
                                          PendingRule(id: elsewhere, gatewayID: two.id)], now: now)
            // The gateway holds them before the broker stored them: kept, in the order reported.
            #expect(try await register(one, ["gone", released, stored, elsewhere], at: now) == [released, stored],
                    "reserved rules are kept; another gateway's reservation is not this gateway's rule")
            #expect(try await register(two, [elsewhere], at: now) == [elsewhere])
            #expect(try await store.rules(gatewayID: nil).isEmpty, "a reservation is not a stored rule")

            // Stored: kept as a rule; the reservation ended with it (a later release changes nothing).
            let push = RulePush(protocol: .tcp, method: .randomPort, target: "10.0.0.5:3389")
            try await store.createRules([GatewayRule(id: stored, gatewayID: one.id, desktopID: nil, userID: nil, protocolName: "rdp",
                                                     push: push, port: 40000, created: now)])
            try await store.releaseRules(ids: [released])
            #expect(try await register(one, [released, stored], at: now) == [stored])
            try await store.deleteRule(id: stored)
            #expect(try await register(one, [stored], at: now) == [], "createRules ended the reservation")

            // A reservation left behind (a broker that died mid-connect) counts only within its lifetime.
            #expect(try await register(two, [elsewhere], at: now.addingTimeInterval(PendingRule.lifetime - 1)) == [elsewhere])
            #expect(try await register(two, [elsewhere], at: now.addingTimeInterval(PendingRule.lifetime + 1)) == [])
            #expect(try await register(two, [elsewhere], at: now) == [], "the stale reservation was removed, not only skipped")

            // Reserving the same id again moves it (a retried push) and nothing else.
            try await store.reserveRules([PendingRule(id: elsewhere, gatewayID: two.id)], now: now)
            try await store.reserveRules([PendingRule(id: elsewhere, gatewayID: one.id)], now: now)
            #expect(try await register(two, [elsewhere], at: now) == [])
            #expect(try await register(one, [elsewhere], at: now) == [elsewhere])
            try await store.releaseRules(ids: [elsewhere, "never-reserved"])
            #expect(try await register(one, [elsewhere], at: now) == [])
            try await store.releaseRules(ids: [])
            try await store.reserveRules([], now: now)
        }
    }

    @Test("connect and disconnect readings: the desktop, only its candidate gateways, their keys, counts where the choice uses them", arguments: StoreBackend.allCases)
    func readings(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            let now = Date(timeIntervalSince1970: 1_900_000_100)
            let cluster = try await store.createGatewayCluster(GatewayClusterChanges(name: "East", loadBalanceVia: .leastConnections), now: now)
            let member = try await store.createGateway(GatewayChanges(name: "m1", address: "198.51.100.1", loadBalancerID: .set(cluster.id)), now: now)
            let unenrolled = try await store.createGateway(GatewayChanges(name: "m2", address: "198.51.100.2", loadBalancerID: .set(cluster.id)), now: now)
            let alone = try await store.createGateway(GatewayChanges(name: "alone", address: "198.51.100.3"), now: now)
            let memberKey = ControlKey.generate(), aloneKey = ControlKey.generate()
            try await store.enrollGateway(id: member.id, key: memberKey, now: now)
            try await store.enrollGateway(id: alone.id, key: aloneKey, now: now)
            let protocols = [DesktopProtocol(name: "rdp", port: 3389)]
            let bob = try await store.createUser(UserChanges(login: "bob", passwordHash: "x", role: .user), now: now)
            let alice = try await store.createUser(UserChanges(login: "alice", passwordHash: "x", role: .user), now: now)
            // Several protocols (their order and transports) and entitlements come back whole.
            let pinned = try await store.createDesktop(DesktopChanges(name: "pinned", address: "10.0.0.5",
                                                                      protocols: [DesktopProtocol(name: "rdp", port: 3389),
                                                                                  DesktopProtocol(name: "pcoip", port: 4172, transport: .both),
                                                                                  DesktopProtocol(name: "echo", port: 7, transport: .udp)],
                                                                      gatewayID: .set(alone.id), users: [bob.id, alice.id]), now: now)
            #expect(pinned.protocols.count == 3 && pinned.users.count == 2)
            let pooled = try await store.createDesktop(DesktopChanges(name: "pooled", address: "10.0.0.6", protocols: protocols,
                                                                      loadBalancerID: .set(cluster.id)), now: now)
            let push = RulePush(protocol: .tcp, method: .randomPort, target: "10.0.0.5:3389")
            let first = GatewayRule(id: GatewayRule.newID(), gatewayID: member.id, desktopID: pooled.id, userID: nil, protocolName: "rdp",
                                    push: push, port: 40000, created: now)
            let sibling = GatewayRule(id: GatewayRule.newID(), gatewayID: alone.id, desktopID: pooled.id, userID: nil, protocolName: "rdp",
                                      push: push, port: 40000, created: now, connectionID: first.id)
            try await store.createRules([first, sibling])

            let own = try await store.connectReading(desktopID: pinned.id)
            #expect(own.desktop == pinned && own.cluster == nil)
            #expect(own.gateways == [try await store.gateway(id: alone.id)])
            #expect(own.controlKeys == [alone.id: aloneKey] && own.ruleCounts.isEmpty)

            let balanced = try await store.connectReading(desktopID: pooled.id)
            #expect(balanced.desktop == pooled && balanced.cluster == cluster)
            #expect(balanced.gateways.map(\.id) == [member.id, unenrolled.id])
            #expect(balanced.controlKeys == [member.id: memberKey])
            // Only the cluster's gateways are counted: the rule on "alone" is not.
            #expect(balanced.ruleCounts == [member.id: 1])
            // Rules being pushed count as the gateway's (connects that arrive together spread out); released, they do not.
            let pushing = GatewayRule.newID()
            try await store.reserveRules([PendingRule(id: pushing, gatewayID: unenrolled.id), PendingRule(id: GatewayRule.newID(), gatewayID: alone.id)],
                                         now: Date())
            #expect(try await store.connectReading(desktopID: pooled.id).ruleCounts == [member.id: 1, unenrolled.id: 1],
                    "only the cluster's reservations count")
            try await store.releaseRules(ids: [pushing])
            #expect(try await store.connectReading(desktopID: pooled.id).ruleCounts == [member.id: 1])
            // The choice with E does not use counts, so none are read.
            _ = try await store.updateGatewayCluster(id: cluster.id, GatewayClusterChanges(loadBalanceVia: .everyGateway), now: now)
            #expect(try await store.connectReading(desktopID: pooled.id).ruleCounts.isEmpty)
            await #expect(throws: StoreError.notFound("no desktop with id 999")) { _ = try await store.connectReading(desktopID: 999) }
            // A desktop whose own gateway is not enrolled, and one in a cluster with no members: read, with nothing to choose.
            let bare = try await store.createGateway(GatewayChanges(name: "bare", address: "198.51.100.4"), now: now)
            let onBare = try await store.createDesktop(DesktopChanges(name: "on-bare", address: "10.0.0.7", protocols: protocols,
                                                                      gatewayID: .set(bare.id)), now: now)
            let unkeyed = try await store.connectReading(desktopID: onBare.id)
            #expect(unkeyed.desktop == onBare && unkeyed.gateways.map(\.id) == [bare.id] && unkeyed.controlKeys.isEmpty)
            let empty = try await store.createGatewayCluster(GatewayClusterChanges(name: "Empty", loadBalanceVia: .leastConnections), now: now)
            let stranded = try await store.createDesktop(DesktopChanges(name: "stranded", address: "10.0.0.8", protocols: protocols,
                                                                        loadBalancerID: .set(empty.id)), now: now)
            let nothing = try await store.connectReading(desktopID: stranded.id)
            #expect(nothing.desktop == stranded && nothing.cluster == empty && nothing.gateways.isEmpty && nothing.ruleCounts.isEmpty)

            let reading = try await store.disconnectReading(ruleID: sibling.id)
            #expect(reading.rule == sibling)
            #expect(reading.rules.map(\.rule) == [first, sibling])
            #expect(reading.rules.map(\.gateway.id) == [member.id, alone.id])
            #expect(reading.rules.map(\.controlKey) == [memberKey, aloneKey])
            await #expect(throws: StoreError.notFound("no connection rule with id 'nope'")) { _ = try await store.disconnectReading(ruleID: "nope") }
        }
    }

    @Test("heartbeats and the offline sweep", arguments: StoreBackend.allCases)
    func heartbeats(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            let start = Date(timeIntervalSince1970: 1_900_000_000)
            let quiet = try await store.createGateway(GatewayChanges(name: "quiet", address: "198.51.100.3"), now: start)
            let busy = try await store.createGateway(GatewayChanges(name: "busy", address: "198.51.100.4"), now: start)
            try await store.recordHeartbeat(id: quiet.id, load: 0.5, sessions: 3, now: start)
            try await store.recordHeartbeat(id: busy.id, load: 1.25, sessions: 7, now: start.addingTimeInterval(60))
            let seen = try await store.gateway(id: busy.id)
            #expect(seen.online && seen.load == 1.25 && seen.activeSessions == 7)
            #expect(try await store.markGatewaysOffline(heartbeatBefore: start.addingTimeInterval(30)) == [quiet.id])
            #expect(try await store.markGatewaysOffline(heartbeatBefore: start.addingTimeInterval(30)) == [])
            #expect(try await !store.gateway(id: quiet.id).online)
            await #expect(throws: StoreError.notFound("no gateway with id 77")) {
                try await store.recordHeartbeat(id: 77, load: 0, sessions: 0, now: start)
            }
        }
    }

    @Test("clusters: create, rename, uniqueness, delete", arguments: StoreBackend.allCases)
    func clusters(_ backend: StoreBackend) async throws {
        try await backend.with { store in
            let now = Date()
            let east = try await store.createGatewayCluster(GatewayClusterChanges(name: "East", loadBalanceVia: .everyGateway), now: now)
            let west = try await store.createGatewayCluster(GatewayClusterChanges(name: "West", loadBalanceVia: .loginGateway), now: now)
            await #expect(throws: StoreError.conflict(field: "name", message: "a gateway cluster named 'EAST' already exists (id \(east.id))")) {
                _ = try await store.updateGatewayCluster(id: west.id, GatewayClusterChanges(name: "EAST"), now: now)
            }
            let renamed = try await store.updateGatewayCluster(id: west.id, GatewayClusterChanges(name: "North"), now: now.addingTimeInterval(1))
            #expect(renamed.name == "North" && renamed.loadBalanceVia == .loginGateway)
            #expect(try await store.gatewayClusters().map(\.name) == ["East", "North"])
            try await store.deleteGatewayCluster(id: east.id)
            await #expect(throws: StoreError.notFound("no gateway cluster with id \(east.id)")) { _ = try await store.gatewayCluster(id: east.id) }
            // Ids are never handed out twice.
            let next = try await store.createGatewayCluster(GatewayClusterChanges(name: "South", loadBalanceVia: .leastConnections), now: now)
            #expect(next.id > west.id)
        }
    }
}
