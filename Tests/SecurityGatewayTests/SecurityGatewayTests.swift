import Foundation
import Testing
import SecurityGateway
import SessionGrants
import SystemLayer
import TestSupport

@Suite("SecurityGateway.conf", .offPool)
struct SecurityGatewayConfigTests {
    @Test("a full file parses; keys are case-insensitive; defaults as HP's")
    func full() throws {
        let config = try SecurityGatewayConfig.parse("""
            # written by pcoip-cmsg-setup
            MaxConnections = 4000
            ListenAddress = 0.0.0.0:4172
            gatewaygroup = sg-east   # trailing comment
            JwtVerifyingCert = /etc/cm/jwt.crt
            EnableCollaboration = true
            CollaborationSourcePorts = 56000-56010
            ClientHelloTimeout = 5s
            ControlListen = 10.0.0.2:4173
            """)
        #expect(config.maxConnections == 4000 && config.gatewayGroup == "sg-east" && config.enableCollaboration)
        #expect(config.collaborationSourcePorts == 56000...56010 && config.clientHelloTimeoutNanoseconds == 5_000_000_000)
        #expect(config.controlListen == SocketAddress("10.0.0.2:4173") && config.agentSourcePort == 55000)
        let minimal = try SecurityGatewayConfig.parse("GatewayGroup = g\nJwtVerifyingCert = c.pem\n")
        #expect(minimal.maxConnections == 5000 && minimal.listen == SocketAddress("0.0.0.0:4172"))
    }

    @Test("every error names the file, the line and the key", arguments: [
        ("MaxConnections = lots\nGatewayGroup = g\nJwtVerifyingCert = c", 1, "MaxConnections"),
        ("MaxConnections = 0\nGatewayGroup = g\nJwtVerifyingCert = c", 1, "MaxConnections"),
        ("GatewayGroup = g\nGatewayGroup = h\nJwtVerifyingCert = c", 2, "set twice"),
        ("GatewayGroup = g\nJwtVerifyingCert = c\nColour = blue", 3, "unknown key \"Colour\""),
        ("GatewayGroup = g\nJwtVerifyingCert = c\njust words", 3, "expected `Key = value`"),
        ("GatewayGroup = g\nJwtVerifyingCert = c\nListenAddress = somewhere", 3, "ListenAddress"),
        ("GatewayGroup = g\nJwtVerifyingCert = c\nEnableCollaboration = maybe", 3, "EnableCollaboration"),
        ("GatewayGroup = g\nJwtVerifyingCert = c\nCollaborationSourcePorts = 9-1", 3, "CollaborationSourcePorts"),
        ("GatewayGroup = g\nJwtVerifyingCert = c\nEnableCollaboration = true\nCollaborationSourcePorts = 54990-55010", 4, "must not contain AgentSourcePort"),
        ("GatewayGroup = g\nJwtVerifyingCert = c\nMaxConnections =", 3, "missing value"),
        ("JwtVerifyingCert = c", 0, "GatewayGroup is required"),
        ("GatewayGroup = g", 0, "JwtVerifyingCert is required"),
    ])
    func errors(text: String, line: Int, fragment: String) {
        #expect {
            try SecurityGatewayConfig.parse(text, file: "SG.conf")
        } throws: { error in
            guard let error = error as? SecurityGatewayConfigError else { return false }
            return error.line == line && error.file == "SG.conf" && error.description.contains(fragment)
        }
    }
}

@Suite("Prepared grants", .serialized, .offPool)
struct PreparedGrantsTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    func material() async throws -> (GrantSigner, GrantVerifier, String) {
        let dir = NSTemporaryDirectory() + "sg-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try SGTest.makeSigningPair(in: dir)
        let signer = try await GrantSigner.load(pem: try String(contentsOfFile: dir + "/k.pem", encoding: .utf8))
        let verifier = try await GrantVerifier.load(certificatePEM: try String(contentsOfFile: dir + "/c.pem", encoding: .utf8), audience: "g")
        return (signer, verifier, dir)
    }

    func grant(_ sni: String, client: String? = nil, session: String = "s", singleUse: Bool = false, life: TimeInterval = 300) -> SessionGrant {
        SessionGrant(sessionID: session, agent: "10.0.0.5:4172", serverName: sni, client: client, audience: "g",
                     issuedAt: now, expires: now.addingTimeInterval(life), singleUse: singleUse)
    }

    @Test("lookup by SNI, preferring the grant that names the client; expired ones are skipped")
    func lookup() async throws {
        let (signer, _, _) = try await material()
        let store = PreparedGrants(path: nil)
        let open = grant("agent.example", session: "open")
        let forA = grant("agent.example", client: "198.51.100.1", session: "a")
        #expect(store.prepare(open, token: try await signer.sign(open)) == .added)
        #expect(store.prepare(forA, token: try await signer.sign(forA)) == .added)
        #expect(store.prepare(forA, token: try await signer.sign(forA)) == .alreadyPrepared)
        #expect(store.lookup(serverName: "AGENT.example", client: "198.51.100.1", now: now)?.grant.sessionID == "a")
        #expect(store.lookup(serverName: "agent.example", client: "203.0.113.9", now: now)?.grant.sessionID == "open")
        #expect(store.lookup(serverName: "other.example", client: "198.51.100.1", now: now) == nil)
        #expect(store.lookup(serverName: "agent.example", client: "198.51.100.1", now: now.addingTimeInterval(400)) == nil)
        #expect(store.sweep(now: now.addingTimeInterval(400)) == 2 && store.count == 0)
    }

    @Test("a single-use grant admits one connection; preparing it again is a replay")
    func singleUse() async throws {
        let (signer, _, _) = try await material()
        let store = PreparedGrants(path: nil)
        let once = grant("one.example", singleUse: true)
        let token = try await signer.sign(once)
        #expect(store.prepare(once, token: token) == .added)
        #expect(store.lookup(serverName: "one.example", client: "x", now: now) != nil)
        #expect(store.lookup(serverName: "one.example", client: "x", now: now) == nil)
        #expect(store.prepare(once, token: token) == .alreadyUsed)
    }

    @Test("a burst of single-use lookups on a journalled store: each use is in the journal at once (a restart finds every grant used), made durable in the background")
    func singleUseBurstIsJournalled() async throws {
        let (signer, verifier, dir) = try await material()
        let path = dir + "/grants.json"
        let store = PreparedGrants(path: path)
        var tokens: [(SessionGrant, String)] = []
        for i in 0..<200 {
            let g = grant("burst\(i).example", session: "b\(i)", singleUse: true, life: 3600)
            let token = try await signer.sign(g)
            #expect(store.prepare(g, token: token) == .added)
            tokens.append((g, token))
        }
        for i in 0..<200 { #expect(store.lookup(serverName: "burst\(i).example", client: "c", now: now) != nil) }
        // Read back at once, before any background sync could have run: every use is there.
        let reborn = PreparedGrants(path: path)
        let restored = await reborn.restore(verifier: verifier, now: now)
        #expect(restored.kept == 0, "no single-use grant comes back usable")
        for (g, token) in tokens.prefix(5) { #expect(reborn.prepare(g, token: token) == .alreadyUsed) }
        // The background sync finishes without anyone waiting for it.
        #expect(eventually { store.unsyncedUses == 0 }, "uses still waiting for their sync")
        store.flush()
        #expect(store.storeProblem == nil)
    }

    @Test("revoke by session or grant id")
    func revoke() async throws {
        let (signer, _, _) = try await material()
        let store = PreparedGrants(path: nil)
        for i in 0..<3 {
            let g = grant("r\(i).example", session: i < 2 ? "shared" : "solo")
            _ = store.prepare(g, token: try await signer.sign(g))
        }
        #expect(store.revoke(sessionID: "shared") == 2 && store.count == 1)
        #expect(store.revoke(sessionID: "nobody") == 0 && store.count == 1)
    }

    @Test("prepared grants persist across a restart until they expire; used single-use grants stay used")
    func persistence() async throws {
        let (signer, verifier, dir) = try await material()
        let path = dir + "/grants.json"
        let store = PreparedGrants(path: path)
        let long = grant("long.example", session: "long", life: 3600)
        let short = grant("short.example", session: "short", life: 60)
        let once = grant("once.example", session: "once", singleUse: true, life: 3600)
        let onceToken = try await signer.sign(once)
        for (g, t) in [(long, try await signer.sign(long)), (short, try await signer.sign(short)), (once, onceToken)] {
            #expect(store.prepare(g, token: t) == .added)
        }
        #expect(store.lookup(serverName: "once.example", client: "c", now: now) != nil)
        // A new process, 10 minutes later: the short grant has expired.
        let reborn = PreparedGrants(path: path)
        let restored = await reborn.restore(verifier: verifier, now: now.addingTimeInterval(600))
        #expect(restored.kept == 1 && restored.dropped == 1)
        #expect(reborn.lookup(serverName: "long.example", client: "c", now: now.addingTimeInterval(600))?.grant.sessionID == "long")
        #expect(reborn.prepare(once, token: onceToken) == .alreadyUsed)
        // A damaged file: nothing restored, nothing crashes.
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: path))
        #expect(await PreparedGrants(path: path).restore(verifier: verifier, now: now) == (0, 0))
    }

    @Test("used ids are told apart exactly as written (a UUID kept as 16 bytes; another case or any other id as the string), through a restart")
    func usedIDs() async throws {
        let (signer, verifier, dir) = try await material()
        let path = dir + "/grants.json"
        let store = PreparedGrants(path: path)
        let upper = UUID().uuidString
        // The last: characters the journal's hand-written JSON line must escape (quote, backslash, newline, a control character) and a non-ASCII one.
        let ids = [upper, upper.lowercased(), "jti-\(UUID().uuidString)", "\(UUID().uuidString)x", "odd \"id\" \\ with\na line\u{01} é"]
        var grants: [(SessionGrant, String)] = []
        for (n, id) in ids.enumerated() {
            var g = grant("used\(n).example", session: "u\(n)", singleUse: true, life: 3600)
            g.id = id
            grants.append((g, try await signer.sign(g)))
        }
        // The upper-case UUID is used; the same letters in lower case are another grant.
        #expect(store.prepare(grants[0].0, token: grants[0].1) == .added)
        #expect(store.lookup(serverName: "used0.example", client: "c", now: now) != nil)
        #expect(store.prepare(grants[0].0, token: grants[0].1) == .alreadyUsed)
        for (g, t) in grants.dropFirst() {
            #expect(store.prepare(g, token: t) == .added, "\(g.id)")
            #expect(store.lookup(serverName: g.serverName, client: "c", now: now) != nil)
            #expect(store.prepare(g, token: t) == .alreadyUsed, "\(g.id)")
        }
        // After a restart every one is still used, each by its own id.
        let reborn = PreparedGrants(path: path)
        _ = await reborn.restore(verifier: verifier, now: now)
        for (g, t) in grants { #expect(reborn.prepare(g, token: t) == .alreadyUsed, "\(g.id)") }
        #expect(reborn.storeProblem == nil)
        // Every record read back whole: a damaged line would have set the journal aside as grants.json.bad-*.
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.contains(".bad-") } == [])
        let fresh = grant("fresh.example", session: "f", singleUse: true, life: 3600)
        #expect(reborn.prepare(fresh, token: try await signer.sign(fresh)) == .added)
    }
}
