import ConnectionManager
import Foundation
import Glibc
import Hummingbird
import Logging
import Relay
import SecurityGateway
import ServiceLifecycle
import SessionGrants
import Synchronization
import SystemLayer
import Testing
import TestSupport

/// A Security Gateway on loopback with its control endpoint, an agent
/// (`openssl s_server` on TCP and a UDP echo on the same port number) and
/// the CM's signing key. Everything real; ports from the kernel.
final class GatewayFixture: @unchecked Sendable {
    let dir: String
    let signer: GrantSigner
    let gateway: SecurityGateway
    let sgPort: UInt16
    let agentPort: UInt16
    let agentSourcePort: UInt16
    let controlURL: String
    let group: String = "sg-test"
    private let server: ChildProcess
    private let echo: UDPEcho
    private let services: ServiceGroup
    private let serviceTask: Task<Void, any Error>

    static func start(helloTimeout: String = "10", collaboration: Bool = false) async throws -> GatewayFixture {
        let dir = try SGTest.temporaryDirectory()
        try SGTest.openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "cm.key"], in: dir)
        try SGTest.openssl(["req", "-x509", "-new", "-key", "cm.key", "-days", "2", "-subj", "/CN=cm", "-out", "cm.crt"], in: dir)
        try SGTest.openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "agent.key", "-days", "2",
                            "-subj", "/CN=agent.test", "-out", "agent.crt"], in: dir)
        let sgPort = TestPorts.free()
        let agentPort = TestPorts.free()
        let sourcePorts = TestPorts.freeBlock(4)
        let sourcePort = sourcePorts.lowerBound
        let text = """
            GatewayGroup = sg-test
            JwtVerifyingCert = \(dir)/cm.crt
            ListenAddress = 127.0.0.1:\(sgPort)
            ControlListen = 127.0.0.1:0
            AgentSourcePort = \(sourcePort)
            EnableCollaboration = \(collaboration)
            CollaborationSourcePorts = \(sourcePort + 1)-\(sourcePorts.upperBound)
            ClientHelloTimeout = \(helloTimeout)
            """
        let config = try SecurityGatewayConfig.parse(text)
        var quiet = Logger(label: "sg-test")
        quiet.logLevel = .error
        let signer = try await GrantSigner.load(pem: try String(contentsOfFile: dir + "/cm.key", encoding: .utf8))
        let verifier = try await GrantVerifier.load(certificatePEM: try String(contentsOfFile: dir + "/cm.crt", encoding: .utf8),
                                                    audience: "sg-test")
        let gateway = try SecurityGateway(config: config, verifier: verifier, grants: PreparedGrants(path: dir + "/grants.json"),
                                          relaySettings: RelaySettings(loops: 2), logger: quiet)
        try gateway.start()

        let server = try ChildProcess("/usr/bin/openssl", ["s_server", "-accept", "127.0.0.1:\(agentPort)", "-cert", dir + "/agent.crt",
                                                           "-key", dir + "/agent.key", "-quiet"], standardInput: true)
        let echo = try UDPEcho(port: agentPort)

        let bound = BoundAddress()
        var logger = Logger(label: "sg-test")
        logger.logLevel = .warning
        let app = try SecurityGatewayControl.application(gateway: gateway, host: "127.0.0.1", port: 0, logger: logger,
                                                     onServerRunning: { address in bound.value.withLock { $0 = address } })
        let services = ServiceGroup(configuration: .init(services: [app], gracefulShutdownSignals: [], logger: logger))
        let task = Task { try await services.run() }
        let fixture = GatewayFixture(dir: dir, signer: signer, gateway: gateway, sgPort: sgPort, agentPort: agentPort,
                                     agentSourcePort: sourcePort, server: server, echo: echo, services: services,
                                     serviceTask: task, control: bound)
        try await waitUntilAsync("the Security Gateway's control endpoint listening") { bound.value.withLock { $0 } != nil }
        // The agent's TLS server is up when it accepts.
        try await waitUntilAsync("openssl s_server accepting on 127.0.0.1:\(agentPort)") { (try? RawClient(port: agentPort)) != nil }
        return fixture
    }

    private let control: BoundAddress

    private init(dir: String, signer: GrantSigner, gateway: SecurityGateway, sgPort: UInt16, agentPort: UInt16,
                 agentSourcePort: UInt16, server: ChildProcess, echo: UDPEcho, services: ServiceGroup,
                 serviceTask: Task<Void, any Error>, control: BoundAddress) {
        self.dir = dir
        self.signer = signer
        self.gateway = gateway
        self.sgPort = sgPort
        self.agentPort = agentPort
        self.agentSourcePort = agentSourcePort
        self.server = server
        self.echo = echo
        self.services = services
        self.serviceTask = serviceTask
        self.control = control
        controlURL = ""
    }

    var control_: String { "http://" + (control.value.withLock { $0 } ?? "127.0.0.1:0") }

    func grant(sni: String = "agent.test", client: String? = nil, audience: String = "sg-test", session: String = "s1",
               singleUse: Bool = false, from: TimeInterval = -10, life: TimeInterval = 300, agent: String? = nil) -> SessionGrant {
        let now = Date()
        return SessionGrant(sessionID: session, agent: agent ?? "127.0.0.1:\(agentPort)", serverName: sni, client: client, audience: audience,
                            issuedAt: now.addingTimeInterval(min(from, -10)), notBefore: now.addingTimeInterval(from),
                            expires: now.addingTimeInterval(from + life), singleUse: singleUse)
    }

    func prepare(_ grant: SessionGrant) async throws -> Int {
        let token = try await signer.sign(grant)
        return try SGTest.curl("POST", control_ + "/v1/sessions", json: #"{"grant":"\#(token)"}"#).0
    }

    func status() -> SecurityGateway.Status { gateway.status() }

    func stop() async {
        await services.triggerGracefulShutdown()
        _ = try? await serviceTask.value
        gateway.shutdown()
        // s_server does not always end on SIGTERM.
        server.stop()
        echo.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

final class TextBox: Sendable {
    let value = Mutex("")
}

final class BoundAddress: Sendable {
    let value = Mutex<String?>(nil)
}

/// `openssl s_client` through the gateway, kept open until `close()`.
final class TLSClient: Sendable {
    let child: ChildProcess

    init(port: UInt16, arguments: [String]) throws {
        child = try ChildProcess("/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(port)", "-brief"] + arguments,
                                 standardInput: true)
    }

    /// What it printed (standard output, then standard error).
    var text: String { child.output }

    /// Closes its input (it then ends) and waits for it.
    func close() {
        child.closeInput()
        if child.waitForExit() == nil { child.stop() }
    }
}

@Suite("Security Gateway data path", .serialized, .offPool)
struct SecurityGatewayDataPathTests {
    @Test("a prepared grant carries the client's TLS handshake to the agent; its UDP goes from AgentSourcePort; others' UDP is dropped")
    func endToEnd() async throws {
        let sg = try await GatewayFixture.start()
        #expect(try await sg.prepare(sg.grant(session: "e2e")) == 201)
        let client = try TLSClient(port: sg.sgPort, arguments: ["-servername", "agent.test"])
        let handshake = await eventuallyAsync { client.text.contains("CONNECTION ESTABLISHED") }
        #expect(handshake, "s_client through the gateway: \(client.text)")
        #expect(client.text.contains("agent.test") || client.text.contains("Peer certificate"), "\(client.text)")
        #expect(sg.status().activeSessions == 1)

        // UDP from the same client IP reaches the agent from the configured source port.
        let udp = try UDPClient()
        var answer: String? = nil
        _ = await eventuallyAsync {
            answer = udp.exchange("hello", port: sg.sgPort)
            return answer != nil
        }
        #expect(answer == "hello|\(sg.agentSourcePort)")

        // An address without a session: dropped and counted, never relayed.
        let stranger = try UDPClient(host: "127.0.0.2")
        #expect(stranger.exchange("intruder", port: sg.sgPort) == nil)
        #expect(await eventuallyAsync { sg.status().udpDropped["not_allowed", default: 0] >= 1 })

        client.close()
        #expect(await eventuallyAsync { sg.status().activeSessions == 0 && sg.status().activeConnections == 0 })
        sg.gateway.settle()
        #expect(await eventuallyAsync { sg.status().udpBindings == 0 })
        #expect(udp.exchange("late", port: sg.sgPort) == nil, "UDP must stop with the session")
        let status = sg.status()
        #expect(status.bytesClientToAgent > 0 && status.bytesAgentToClient > 0)
        await sg.stop()
    }

    @Test("two users behind one address with sessions to two agents: each UDP flow reaches its own user's agent; one leaving moves no other flow; the last leaving closes the address's flows")
    func sharedAddressRoutesUDPPerFlow() async throws {
        let sg = try await GatewayFixture.start()
        // A second agent: a TCP listener (the relayed ClientHello waits in its
        // backlog) and a UDP echo that tags its answers.
        let listener = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        defer { listener.close() }
        let agent2Port = Socket.localAddress(listener)!.port
        let echo2 = try UDPEcho(port: agent2Port, tag: "agent2")
        defer { echo2.stop() }
        #expect(try await sg.prepare(sg.grant(sni: "user1.test", session: "user-1")) == 201)
        #expect(try await sg.prepare(sg.grant(sni: "user2.test", session: "user-2", agent: "127.0.0.1:\(agent2Port)")) == 201)

        let user1 = try TLSClient(port: sg.sgPort, arguments: ["-servername", "user1.test"])
        #expect(await eventuallyAsync { user1.text.contains("CONNECTION ESTABLISHED") }, "\(user1.text)")
        var user2: RawClient? = try RawClient(port: sg.sgPort)
        user2?.send(clientHello(sni: "user2.test"))
        #expect(await eventuallyAsync { sg.status().activeSessions == 2 && sg.status().udpBindings == 2 })
        let agent2Side = accept(listener.rawValue, nil, nil)
        #expect(agent2Side >= 0)

        // Both users come from 127.0.0.1, each from its own UDP port. The
        // newest session's user sends first and gets its own agent; then the other.
        let udp2 = try UDPClient(), udp1 = try UDPClient()
        var answer2: String?, answer1: String?
        _ = await eventuallyAsync { answer2 = udp2.exchange("from-2", port: sg.sgPort); return answer2 != nil }
        #expect(answer2 == "from-2|\(sg.agentSourcePort)|agent2")
        _ = await eventuallyAsync { answer1 = udp1.exchange("from-1", port: sg.sgPort); return answer1 != nil }
        #expect(answer1 == "from-1|\(sg.agentSourcePort)", "user 1's datagrams must reach user 1's agent")
        #expect(udp2.exchange("again-2", port: sg.sgPort) == "again-2|\(sg.agentSourcePort)|agent2", "a flow keeps its path")

        // User 2 leaves (both ends close): only its flow ends; user 1's flow goes on.
        user2 = nil
        close(agent2Side)
        #expect(await eventuallyAsync { sg.status().activeSessions == 1 && sg.status().udpBindings == 1 })
        #expect(await eventuallyAsync { sg.gateway.engine.flows().allSatisfy { $0.target.port != agent2Port } },
                "the flow toward the departed user's agent was not closed")
        #expect(udp1.exchange("still-1", port: sg.sgPort) == "still-1|\(sg.agentSourcePort)")

        // The last user leaves: the address's last path ends, its flow is closed, and its datagrams now have no route.
        user1.close()
        #expect(await eventuallyAsync { sg.status().activeSessions == 0 && sg.status().udpBindings == 0 })
        #expect(await eventuallyAsync { sg.gateway.engine.flows().isEmpty }, "the last path's flow was not closed")
        let dropped = sg.status().udpDropped["not_allowed", default: 0]
        #expect(udp1.exchange("gone-1", port: sg.sgPort) == nil)
        #expect(await eventuallyAsync { sg.status().udpDropped["not_allowed", default: 0] > dropped })
        await sg.stop()
    }

    @Test("revoking a session resets its live connection and ends its UDP binding; other sessions go on; a reconnect is refused")
    func revokeEndsLiveSession() async throws {
        let sg = try await GatewayFixture.start()
        #expect(try await sg.prepare(sg.grant(sni: "doomed.test", session: "doomed")) == 201)
        #expect(try await sg.prepare(sg.grant(sni: "kept.test", session: "kept")) == 201)
        // s_server serves one client at a time: the kept session holds it with
        // a real handshake; the doomed one is relayed and waits in its backlog.
        let kept = try TLSClient(port: sg.sgPort, arguments: ["-servername", "kept.test"])
        #expect(await eventuallyAsync { kept.text.contains("CONNECTION ESTABLISHED") }, "\(kept.text)")
        let doomed = try RawClient(port: sg.sgPort)
        doomed.send(clientHello(sni: "doomed.test"))
        #expect(await eventuallyAsync { sg.status().activeSessions == 2 && sg.status().activeConnections == 2 })

        let (status, body) = try SGTest.curl("DELETE", sg.control_ + "/v1/sessions/doomed")
        #expect(status == 200 && body.contains(#""closed_connections":1"#) && body.contains(#""revoked":1"#), "\(status) \(body)")
        #expect(doomed.wait() == .closed, "the revoked session's connection is still open")
        #expect(await eventuallyAsync { sg.status().activeSessions == 1 && sg.status().activeConnections == 1 })
        #expect(kept.child.isRunning, "the other session goes on")

        // Its grant is gone: the same SNI is refused now; a second revoke finds nothing.
        let again = try RawClient(port: sg.sgPort)
        again.send(clientHello(sni: "doomed.test"))
        #expect(again.wait() == .closed)
        #expect(await eventuallyAsync { sg.status().refusals["no_grant", default: 0] >= 1 })
        #expect(try SGTest.curl("DELETE", sg.control_ + "/v1/sessions/doomed").0 == 404)

        kept.close()
        #expect(await eventuallyAsync { sg.status().activeSessions == 0 })
        await sg.stop()
    }

    @Test("bad bodies on the control endpoint: 400 naming the body or the field, nothing prepared; session ids are percent-decoded")
    func badControlBodies() async throws {
        let sg = try await GatewayFixture.start()
        let url = sg.control_ + "/v1/sessions"
        for (body, mentions) in [
            ("not json", #""field":"body""#), ("[1,2]", #""field":"body""#), (#""grant""#, #""field":"body""#),
            ("{}", #""field":"grant""#), (#"{"grant":5}"#, #""field":"grant""#), (#"{"grant":""}"#, #""field":"grant""#),
            (#"{"grant":null}"#, #""field":"grant""#),
            (#"{"grant":"a.b.c","colour":"red"}"#, #""error":"colour: unknown field","field":"colour""#),
        ] {
            let (status, text) = try SGTest.curl("POST", url, json: body)
            #expect(status == 400 && text.contains(mentions), "\(body): \(status) \(text)")
        }
        #expect(sg.status().preparedGrants == 0)
        // A session id with a slash, percent-encoded in the path, names that session.
        #expect(try await sg.prepare(sg.grant(sni: "slash.test", session: "a/b é")) == 201)
        let (status, body) = try SGTest.curl("DELETE", url + "/a%2Fb%20%C3%A9")
        #expect(status == 200 && body.contains(#""revoked":1"#), "\(status) \(body)")
        // A broken escape or bytes that are not UTF-8 name no session.
        for bad in ["/a%2", "/a%zz", "/%FF"] {
            let (status, text) = try SGTest.curl("DELETE", url + bad)
            #expect(status == 400 && text.contains(#""field":"id""#), "\(bad): \(status) \(text)")
        }
        await sg.stop()
    }

    @Test("bad input on the TCP port: each refused and counted by reason, a split ClientHello accepted, nothing leaks")
    func badInput() async throws {
        let sg = try await GatewayFixture.start(helloTimeout: "0.5")
        #expect(try await sg.prepare(sg.grant(sni: "agent.test", session: "bad")) == 201)
        func refused(_ reason: String, _ send: (RawClient) -> Void, sourceLocation: SourceLocation = #_sourceLocation) async throws {
            let before = sg.status().refusals[reason, default: 0]
            let client = try RawClient(port: sg.sgPort)
            send(client)
            #expect(client.wait() == .closed, "\(reason): the gateway must close", sourceLocation: sourceLocation)
            #expect(await eventuallyAsync { sg.status().refusals[reason, default: 0] == before + 1 },
                    "\(reason): counted (\(sg.status().refusals))", sourceLocation: sourceLocation)
        }
        try await refused("not_tls") { $0.send(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)) }
        try await refused("not_tls") { $0.send((0..<64).map { _ in UInt8.random(in: 0...21) }) }
        let hello = clientHello(sni: "agent.test")
        try await refused("truncated") { client in
            client.send(Array(hello.prefix(hello.count / 2)))
            client.shutdownWrite()
        }
        try await refused("no_sni") { $0.send(clientHello(sni: nil)) }
        try await refused("bad_sni") { $0.send(clientHello(sni: String(repeating: "a", count: 300) + ".test")) }
        try await refused("no_grant") { $0.send(clientHello(sni: "unknown.test")) }
        // A client that sends nothing is released after ClientHelloTimeout (0.5 s here).
        try await refused("timeout") { _ in }
        try await refused("timeout") { $0.send(Array(hello.prefix(7))) }

        // A real ClientHello in 1-byte segments is accepted: the agent's TLS server answers.
        let split = try RawClient(port: sg.sgPort)
        for byte in hello {
            split.send([byte])
            usleep(1000)
        }
        guard case .bytes = split.wait() else {
            Issue.record("a ClientHello in 1-byte segments must reach the agent (\(sg.status().refusals))")
            return
        }
        #expect(sg.status().activeSessions == 1)
        shutdown(split.fd, Int32(SHUT_RDWR))
        #expect(await eventuallyAsync { sg.status().activeSessions == 0 && sg.status().activeConnections == 0 },
                "no session leaks: \(sg.status())")
        #expect(sg.gateway.problem == nil)
        await sg.stop()
    }

    @Test("the control endpoint: prepare, already prepared, forged, expired, not yet valid, other group, none, HMAC, replay, revoke, health, status")
    func controlEndpoint() async throws {
        let sg = try await GatewayFixture.start()
        let base = sg.control_
        let good = sg.grant(session: "ctl-1")
        #expect(try await sg.prepare(good) == 201)
        let token = try await sg.signer.sign(good)
        #expect(try SGTest.curl("POST", base + "/v1/sessions", json: #"{"grant":"\#(token)"}"#).0 == 200)

        // Forged: signed by another key.
        let other = try SGTest.temporaryDirectory()
        try SGTest.openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "k.pem"], in: other)
        let forger = try await GrantSigner.load(pem: try String(contentsOfFile: other + "/k.pem", encoding: .utf8))
        let forged = try await forger.sign(sg.grant(session: "forged"))
        func post(_ token: String) throws -> (Int, String) {
            try SGTest.curl("POST", base + "/v1/sessions", json: #"{"grant":"\#(token)"}"#)
        }
        let (forgedStatus, forgedBody) = try post(forged)
        #expect(forgedStatus == 401 && forgedBody.contains("signature"), "\(forgedBody)")
        let (expiredStatus, expiredBody) = try post(try await sg.signer.sign(sg.grant(session: "old", from: -1000, life: 300)))
        #expect(expiredStatus == 401 && expiredBody.contains("expired"), "\(expiredBody)")
        let (earlyStatus, earlyBody) = try post(try await sg.signer.sign(sg.grant(session: "early", from: 3600)))
        #expect(earlyStatus == 401 && earlyBody.contains("not yet valid"), "\(earlyBody)")
        let (groupStatus, groupBody) = try post(try await sg.signer.sign(sg.grant(audience: "sg-other", session: "elsewhere")))
        #expect(groupStatus == 401 && groupBody.contains("sg-other"), "\(groupBody)")
        func b64(_ bytes: [UInt8]) -> String {
            Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
                .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        }
        let payload = String(try await sg.signer.sign(sg.grant(session: "confused")).split(separator: ".")[1])
        let (noneStatus, noneBody) = try post(b64(Array(#"{"alg":"none","typ":"JWT"}"#.utf8)) + "." + payload + ".")
        #expect(noneStatus == 401 && noneBody.contains("none"), "\(noneBody)")
        let hs = b64(Array(#"{"alg":"HS256","typ":"JWT"}"#.utf8)) + "." + payload
        let certificate = Array(try String(contentsOfFile: sg.dir + "/cm.crt", encoding: .utf8).utf8)
        let (hsStatus, hsBody) = try post(hs + "." + b64(hmac(key: certificate, message: Array(hs.utf8), dir: other)))
        #expect(hsStatus == 401 && hsBody.contains("HS256"), "\(hsBody)")
        #expect(try post("not.a.jwt").0 == 400)
        #expect(try SGTest.curl("POST", base + "/v1/sessions", json: #"{"token":"x"}"#).0 == 400)
        #expect(try SGTest.curl("POST", base + "/v1/sessions", json: "[1,2").0 == 400)
        // No answer repeats a token.
        #expect(!forgedBody.contains(forged) && !hsBody.contains(hs))

        // Replay: a single-use grant, used by a real TLS connection, prepared again → 409.
        let once = sg.grant(sni: "once.test", session: "once", singleUse: true)
        #expect(try await sg.prepare(once) == 201)
        let client = try TLSClient(port: sg.sgPort, arguments: ["-servername", "once.test"])
        #expect(await eventuallyAsync { client.text.contains("CONNECTION ESTABLISHED") }, "\(client.text)")
        client.close()
        let (replayStatus, replayBody) = try post(try await sg.signer.sign(once))
        #expect(replayStatus == 409 && replayBody.contains("replay"), "\(replayBody)")
        // A second connection with the used grant is refused.
        let again = try TLSClient(port: sg.sgPort, arguments: ["-servername", "once.test"])
        again.close()
        #expect(!again.text.contains("CONNECTION ESTABLISHED"))
        #expect(await eventuallyAsync { sg.status().refusals["no_grant", default: 0] >= 1 })

        // Revoke.
        #expect(try SGTest.curl("DELETE", base + "/v1/sessions/ctl-1").0 == 200)
        #expect(try SGTest.curl("DELETE", base + "/v1/sessions/ctl-1").0 == 404)
        let (health, healthBody) = try SGTest.curl("GET", base + "/health")
        #expect(health == 200 && healthBody == #"{"code":200,"status":"success"}"#)
        let (statusCode, statusBody) = try SGTest.curl("GET", base + "/v1/status")
        #expect(statusCode == 200)
        let object = try JSONSerialization.jsonObject(with: Data(statusBody.utf8)) as? [String: Any]
        #expect(object?["active_sessions"] as? Int == 0 && (object?["refusals"] as? [String: Int])?["no_grant"] ?? 0 >= 1)
        #expect(object?["bytes_client_to_agent"] as? Int ?? 0 > 0)
        #expect(await eventuallyAsync { sg.status().activeSessions == 0 && sg.status().activeConnections == 0 })
        try? FileManager.default.removeItem(atPath: other)
        await sg.stop()
    }

    @Test("the Connection Manager's prepares in a burst: each grant's own outcome (prepared, or the gateway's refusal), some carried in batches")
    func connectionManagerBatches() async throws {
        let sg = try await GatewayFixture.start()
        let client = SecurityGatewayClient(tls: nil)
        let address = SecurityGatewayAddress(publicAddress: "127.0.0.1", publicPort: Int(sg.sgPort),
                                              control: SocketAddress(String(sg.control_.dropFirst("http://".count)))!)
        let other = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: other) }
        try SGTest.openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "k.pem"], in: other)
        let forger = try await GrantSigner.load(pem: try String(contentsOfFile: other + "/k.pem", encoding: .utf8))
        // Bursts of 24 at once until one was batched (the first two of a burst go alone; the rest wait for them).
        var burst = 0
        while client.batchFigures.batches == 0 && burst < 5 {
            burst += 1
            var tokens: [(String, Bool)] = []
            for i in 0..<24 {
                let grant = sg.grant(sni: "cm-\(burst)-\(i).test", session: "cm-\(burst)-\(i)")
                tokens.append(i % 5 == 4 ? (try await forger.sign(grant), false) : (try await sg.signer.sign(grant), true))
            }
            let outcomes = await withTaskGroup(of: (Int, String?).self) { group in
                for (i, token) in tokens.enumerated() { group.addTask { (i, await client.prepare(address, token: token.0)) } }
                var outcomes: [Int: String?] = [:]
                for await (i, outcome) in group { outcomes[i] = outcome }
                return outcomes
            }
            for (i, token) in tokens.enumerated() {
                if token.1 {
                    #expect(outcomes[i]! == nil, "grant \(i): \(String(describing: outcomes[i]))")
                } else {
                    #expect(outcomes[i]??.contains("HTTP 401") == true, "grant \(i): \(String(describing: outcomes[i]))")
                }
            }
        }
        #expect(client.batchFigures.batches > 0, "no batch in \(burst) bursts of 24")
        #expect(sg.status().preparedGrants == 20 * burst, "four of each 24 were forged")
        await client.shutdown()
        await sg.stop()
    }

    @Test("a batch of prepares: each grant answered as alone (prepared, already, forged, expired, replayed), the prepared ones admit their clients and survive a restart; a bad batch is refused whole")
    func preparedInABatch() async throws {
        let sg = try await GatewayFixture.start()
        let base = sg.control_
        let other = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: other) }
        try SGTest.openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "k.pem"], in: other)
        let forger = try await GrantSigner.load(pem: try String(contentsOfFile: other + "/k.pem", encoding: .utf8))
        let held = sg.grant(sni: "held.test", session: "held")
        #expect(try await sg.prepare(held) == 201)
        let tokens = [
            try await sg.signer.sign(sg.grant(sni: "one.test", session: "b-1")),
            try await sg.signer.sign(held),
            try await forger.sign(sg.grant(sni: "forged.test", session: "b-forged")),
            try await sg.signer.sign(sg.grant(sni: "old.test", session: "b-old", from: -1000, life: 300)),
            try await sg.signer.sign(sg.grant(sni: "two.test", session: "b-2")),
            "not.a.jwt",
        ]
        let body = "{\"grants\":[" + tokens.map { "\"\($0)\"" }.joined(separator: ",") + "]}"
        let (status, text) = try SGTest.curl("POST", base + "/v1/sessions", json: body)
        #expect(status == 200, "\(text)")
        let results = (try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])?["results"] as? [[String: Any]] ?? []
        #expect(results.map { $0["status"] as? Int } == [201, 200, 401, 401, 201, 400], "\(text)")
        #expect(results[0]["session_id"] as? String == "b-1" && results[4]["server_name"] as? String == "two.test")
        #expect((results[2]["error"] as? String)?.contains("signature") == true && (results[3]["error"] as? String)?.contains("expired") == true)
        #expect(!tokens.contains { text.contains($0) }, "no answer repeats a token")
        #expect(sg.status().preparedGrants == 3)
        for name in ["one.test", "two.test"] {
            let client = try TLSClient(port: sg.sgPort, arguments: ["-servername", name])
            #expect(await eventuallyAsync { client.text.contains("CONNECTION ESTABLISHED") }, "\(name): \(client.text)")
            client.close()
        }
        // Written before the answer: the journal holds both tokens.
        let journal = String(decoding: try StateFile.read(sg.dir + "/grants.json", limit: 1 << 24) ?? [], as: UTF8.self)
        #expect(journal.contains(tokens[0]) && journal.contains(tokens[4]))

        // Refused whole, nothing prepared: not a list, empty, both forms, too many, an empty token.
        let before = sg.status().preparedGrants
        let fresh = try await sg.signer.sign(sg.grant(sni: "fresh.test", session: "b-fresh"))
        let many = Array(repeating: "\"\(fresh)\"", count: SecurityGatewayControl.maxGrants + 1).joined(separator: ",")
        for bad in [#"{"grants":"x"}"#, #"{"grants":[]}"#, "{\"grants\":[\"\(fresh)\"],\"grant\":\"\(fresh)\"}", "{\"grants\":[\(many)]}",
                    "{\"grants\":[\"\(fresh)\",\"\"]}", "{\"grants\":[\"\(fresh)\"],\"x\":1}"] {
            let (code, answer) = try SGTest.curl("POST", base + "/v1/sessions", json: bad)
            #expect(code == 400, "\(bad.prefix(80)): \(answer)")
            #expect(answer.contains("grants") || answer.contains("unknown field"), "\(answer)")
        }
        #expect(sg.status().preparedGrants == before)
        await sg.stop()
    }

    @Test("collaboration: a second client to the same agent gets the next source port; without it, it is refused")
    func collaboration() async throws {
        let grants = PreparedGrants(path: nil)
        let on = SessionTracker(agentSourcePort: 55000, collaborationPorts: 55001...55002, listen: SocketAddress("0.0.0.0:4172")!)
        let agent = SocketAddress("10.0.0.5:4172")!
        let a = try on.start(client: .v4(1), agent: agent, sessionID: "a").get()
        let b = try on.start(client: .v4(2), agent: agent, sessionID: "b").get()
        let a2 = try on.start(client: .v4(1), agent: agent, sessionID: "a").get()
        #expect(on.bindings.map(\.sourcePort) == [55000, 55001] && on.active == 3)
        // Each client address's new flow is routed to its path, from its port.
        #expect(on.route(client: SocketAddress(ip: .v4(1), port: 7000), rule: "r") == DatagramRoute(target: agent, sourcePort: 55000))
        #expect(on.route(client: SocketAddress(ip: .v4(2), port: 7000), rule: "r") == DatagramRoute(target: agent, sourcePort: 55001))
        _ = try on.start(client: .v4(3), agent: agent, sessionID: "c").get()
        #expect(refusal(on.start(client: .v4(4), agent: agent, sessionID: "d")) == .agentBusy)
        on.end(a)
        #expect(on.bindings.count == 3, "client 1 still has a session")
        on.end(a2)
        on.end(b)
        #expect(on.bindings.map(\.sourcePort) == [55002])
        #expect(on.route(client: SocketAddress(ip: .v4(1), port: 7001), rule: "r") == nil, "no session left: no route")
        // A second agent from an address that already has a path (one NAT
        // address, two users): a path of its own.
        let other = try on.start(client: .v4(3), agent: SocketAddress("10.0.0.6:4172")!, sessionID: "e").get()
        #expect(on.bindings.count == 2 && on.bindings.map(\.sourcePort).sorted() == [55000, 55002])
        on.end(other)
        #expect(on.bindings.count == 1)
        let off = SessionTracker(agentSourcePort: 55000, collaborationPorts: nil)
        _ = try off.start(client: .v4(1), agent: agent, sessionID: "a").get()
        #expect(refusal(off.start(client: .v4(2), agent: agent, sessionID: "b")) == .agentBusy)
        _ = grants
    }

    @Test("routing UDP among the paths of one address: each new flow takes the newest path without a flow; a path's end closes only its flows; the one UDP rule admits anyone and is routed")
    func routingAmongPaths() throws {
        let ended = Mutex<[String]>([])
        let tracker = SessionTracker(agentSourcePort: 55000, collaborationPorts: nil,
                                     onPathEnded: { client, agent in ended.withLock { $0.append("\(client) \(agent)") } })
        let nat = IPAddress("198.51.100.7")!
        let agent1 = SocketAddress("10.0.0.1:4172")!, agent2 = SocketAddress("10.0.0.2:4172")!
        #expect(tracker.route(client: SocketAddress(ip: nat, port: 5000), rule: "r") == nil, "no session: no route")
        let first = try tracker.start(client: nat, agent: agent1, sessionID: "user-1").get()
        let second = try tracker.start(client: nat, agent: agent2, sessionID: "user-2").get()
        let rule = tracker.udpRule(id: "sg-udp")
        #expect(rule.router?.name == "sg-sessions" && rule.allow.isEmpty && rule.transport == .udp && rule.listen == tracker.listen)
        // The second user's client sends first: the newest path without a flow is theirs.
        let flowB = SocketAddress(ip: nat, port: 40002), flowA = SocketAddress(ip: nat, port: 40001)
        #expect(tracker.route(client: flowB, rule: "r") == DatagramRoute(target: agent2, sourcePort: 55000))
        #expect(tracker.route(client: flowA, rule: "r") == DatagramRoute(target: agent1, sourcePort: 55000))
        // Every path has a flow: a further flow (a NAT rebinding) goes to the newest.
        #expect(tracker.route(client: SocketAddress(ip: nat, port: 40003), rule: "r")?.target == agent2)
        // A flow that ends frees its path for the next new flow.
        tracker.flowEnded(client: flowA, route: DatagramRoute(target: agent1, sourcePort: 55000))
        #expect(tracker.route(client: SocketAddress(ip: nat, port: 40004), rule: "r")?.target == agent1)
        // The second user leaves: their path ends (its flows are to be closed).
        tracker.end(second)
        #expect(ended.withLock { $0 } == ["198.51.100.7 10.0.0.2:4172"])
        #expect(tracker.bindings.map(\.agent) == [agent1])
        #expect(tracker.route(client: SocketAddress(ip: nat, port: 40005), rule: "r")?.target == agent1)
        tracker.end(first)
        #expect(tracker.bindings.isEmpty)
        #expect(ended.withLock { $0 } == ["198.51.100.7 10.0.0.2:4172", "198.51.100.7 10.0.0.1:4172"], "the last path's flows are closed too")
        #expect(tracker.route(client: SocketAddress(ip: nat, port: 40006), rule: "r") == nil, "no session left: no route")
    }

    @Test("the inspection decides from bytes alone: garbage, no SNI, bad SNI, no grant, a grant, byte by byte, end of stream, timeout")
    func inspectionDecisions() async throws {
        let grants = PreparedGrants(path: nil)
        let sessions = SessionTracker(agentSourcePort: 55000, collaborationPorts: nil)
        let now = Date()
        let grant = SessionGrant(sessionID: "s", agent: "10.1.2.3:4172", serverName: "desk.test", audience: "g",
                                 issuedAt: now.addingTimeInterval(-5), expires: now.addingTimeInterval(300))
        #expect(grants.prepare(grant, token: "t") == .added)
        func run(_ bytes: [UInt8], client: String = "192.0.2.1:5000") -> InspectionDecision {
            SNIInspection(client: SocketAddress(client)!, maxBytes: 16384, grants: grants, sessions: sessions).feed(bytes)
        }
        #expect(run(Array("SSH-2.0-x\r\n".utf8)) == .refuse("not_tls"))
        #expect(run(clientHello(sni: nil)) == .refuse("no_sni"))
        #expect(run(clientHello(sni: String(repeating: "x", count: 300))) == .refuse("bad_sni"))
        #expect(run(clientHello(sni: "other.test")) == .refuse("no_grant"))
        let inspection = SNIInspection(client: SocketAddress("192.0.2.1:5000")!, maxBytes: 16384, grants: grants, sessions: sessions)
        let hello = clientHello(sni: "desk.test")
        var decision = InspectionDecision.needMore
        for i in 1...hello.count {
            decision = inspection.feed(Array(hello.prefix(i)))
            if i < hello.count { #expect(decision == .needMore) }
        }
        #expect(decision == .connect(SocketAddress("10.1.2.3:4172")!))
        #expect(sessions.active == 1 && sessions.bindings.first?.sourcePort == 55000)
        #expect(inspection.sessionID == "s", "revoking session s finds this connection")
        // Decided once: more bytes (its reader's buffer is gone) give the same
        // decision and start no second session.
        #expect(inspection.feed(hello + [0x17, 0x03, 0x03]) == decision)
        #expect(sessions.active == 1)
        inspection.sessionEnded()
        #expect(sessions.active == 0 && sessions.bindings.isEmpty && inspection.sessionID == nil)
        let idle = SNIInspection(client: SocketAddress("192.0.2.1:5000")!, maxBytes: 16384, grants: grants, sessions: sessions)
        #expect(idle.endOfStream() == .refuse("truncated") && idle.timedOut() == .refuse("timeout"))
        #expect(run([UInt8](hello.prefix(10))) == .needMore)
    }
}

func refusal(_ result: Result<SessionTracker.Ticket, SessionRefusal>) -> SessionRefusal? {
    if case .failure(let why) = result { return why }
    return nil
}

/// HMAC-SHA-256 by the `openssl` command (the attacker's tool).
func hmac(key: [UInt8], message: [UInt8], dir: String) throws -> [UInt8] {
    _ = FileManager.default.createFile(atPath: dir + "/m", contents: Data(message))
    let hexKey = key.map { String(format: "%02x", $0) }.joined()
    try SGTest.openssl(["dgst", "-sha256", "-mac", "HMAC", "-macopt", "hexkey:\(hexKey)", "-binary", "-out", dir + "/mac", dir + "/m"], in: dir)
    return [UInt8](FileManager.default.contents(atPath: dir + "/mac")!)
}
