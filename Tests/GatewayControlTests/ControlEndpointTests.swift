import ControlProtocol
import Foundation
import GatewayControl
import Glibc
import Relay
import SystemLayer
import Testing
import TestSupport

/// The control endpoint over real HTTP with real signed requests, and real
/// connections through the ports it opens.
@Suite(.serialized, .offPool) struct ControlEndpointTests {
    @Test(arguments: [0, 1, 2])
    func tcpRuleCarriesConnections(method: Int) async throws {
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        let result: Void? = try await offPool {
            var body = "{\"protocol\":\"tcp\",\"method\":\(method),\"target\":\"\(echo.address)\""
            if method != 0 { body += ",\"client_ip\":\"127.0.0.1\"" }
            if method == 1 {
                // The "protocol's own port": one the test knows is free.
                body += ",\"port\":\(TestPorts.free())"
            }
            body += "}"
            let reply = try gateway.put("desk-\(method)", body)
            #expect(reply.status == 201, "\(reply.text)")
            let port = try #require(reply.object["port"] as? Int)
            #expect(reply.object["listen"] as? String == "127.0.0.1:\(port)")
            if method != 1 { #expect(gateway.control.settings.portRange.contains(port)) }

            #expect(echoThrough(port: port) == "hello through the gateway")
            if method == 0 {
                #expect(echoThrough(port: port, source: "127.0.0.2") == "hello through the gateway")
            } else {
                #expect(echoThrough(port: port, source: "127.0.0.2") == nil, "a client other than client_ip must be refused")
            }

            // The same push again is idempotent: 200 with the same port.
            let again = try gateway.put("desk-\(method)", body)
            #expect(again.status == 200)
            #expect(again.object["port"] as? Int == port)

            let list = try gateway.send("GET", "/control/v1/rules")
            #expect(list.status == 200)
            let rules = try JSONDecoder().decode([RuleState].self, from: Data(list.body))
            #expect(rules.map(\.id) == ["desk-\(method)"])
            #expect(rules.first?.port == port)

            let deleted = try gateway.send("DELETE", "/control/v1/rules/desk-\(method)")
            #expect(deleted.status == 204)
            #expect(echoThrough(port: port) == nil, "the port closes with its rule")
            #expect(try gateway.send("DELETE", "/control/v1/rules/desk-\(method)").status == 404)
            #expect(gateway.control.store.load().rules.isEmpty)
            return ()
        }
        #expect(result != nil)
        await gateway.stop()
    }

    @Test func udpRuleCarriesDatagrams() async throws {
        let gateway = try await TestGateway.start()
        let echo = try UDPEcho()
        defer { echo.stop() }
        try await offPool {
            let reply = try gateway.put("udp-1", "{\"protocol\":\"udp\",\"method\":2,\"client_ip\":\"127.0.0.1\",\"target\":\"\(echo.address)\"}")
            #expect(reply.status == 201, "\(reply.text)")
            let port = try #require(reply.object["port"] as? Int)
            #expect(udpEchoThrough(port: port) == "datagram through the gateway")
            #expect(gateway.engine.flows().contains { $0.rule == "broker:udp-1" })
        }
        await gateway.stop()
    }

    @Test func badSignaturesAreRefused() async throws {
        let gateway = try await TestGateway.start()
        try await offPool {
            let path = "/control/v1/rules/r1"
            let body = "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"127.0.0.1:9\"}"
            let bytes = Array(body.utf8)
            let forged = ControlAuthorization(gatewayID: TestGateway.gatewayID, timestamp: ControlClock.unixSeconds(),
                                              nonce: String(repeating: "ab", count: 16), signature: ControlCrypto.randomBytes(32)).headerValue
            let replayed = gateway.signer.authorize(direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/r0", body: bytes)
            // The first use of `replayed` is valid (and creates r0); its second use is a replay.
            #expect(try BlockingHTTP.request(method: "PUT", host: "127.0.0.1", port: gateway.port, path: "/control/v1/rules/r0",
                                             headers: [("Authorization", replayed)], body: bytes,
                                             timeoutMilliseconds: TestDeadline.milliseconds).status == 201)
            let before = gateway.snapshot()
            let cases: [(String, BlockingHTTP.Response, String)] = [
                ("forged", try gateway.send("PUT", path, body, authorization: forged), "signature does not verify"),
                ("expired", try gateway.send("PUT", path, body, timestamp: ControlClock.unixSeconds() - 300), "away from this host's clock"),
                ("wrong key", try gateway.send("PUT", path, body, signer: ControlSigner(gatewayID: TestGateway.gatewayID, key: .generate())),
                 "signature does not verify"),
                ("wrong direction", try gateway.send("PUT", path, body, direction: .gatewayToBroker), "signature does not verify"),
                ("other gateway", try gateway.send("PUT", path, body, signer: ControlSigner(gatewayID: 8, key: gateway.key)), "gateway 8 is not enrolled"),
                ("replayed", try BlockingHTTP.request(method: "PUT", host: "127.0.0.1", port: gateway.port, path: "/control/v1/rules/r0",
                                                      headers: [("Authorization", replayed)], body: bytes,
                                                      timeoutMilliseconds: TestDeadline.milliseconds), "replay"),
                ("missing", try BlockingHTTP.request(method: "PUT", host: "127.0.0.1", port: gateway.port, path: path, body: bytes, timeoutMilliseconds: TestDeadline.milliseconds),
                 "signed control request is required"),
                ("malformed", try gateway.send("PUT", path, body, authorization: "Bearer abc"), "scheme"),
                ("signed for another path", try BlockingHTTP.request(method: "PUT", host: "127.0.0.1", port: gateway.port, path: path,
                    headers: [("Authorization", gateway.signer.authorize(direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/zz", body: bytes))],
                    body: bytes, timeoutMilliseconds: TestDeadline.milliseconds), "signature does not verify"),
            ]
            for (name, reply, reason) in cases {
                #expect(reply.status == 401, "\(name): \(reply.status) \(reply.text)")
                #expect((reply.object["error"] as? String ?? "").contains(reason), "\(name): \(reply.text)")
                #expect(!reply.text.contains(gateway.key.text))
            }
            #expect(gateway.snapshot() == before, "a refused request changed something")
            #expect(gateway.control.pushedRules().map(\.id) == ["r0"])
        }
        await gateway.stop()
    }

    @Test func badInputIsRefusedAndChangesNothing() async throws {
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        try await offPool {
            let ok = try gateway.put("existing", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"\(echo.address)\"}")
            #expect(ok.status == 201)
            let held = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
            defer { held.close() }
            let heldPort = Socket.localAddress(held)!.port
            // Held with SO_REUSEPORT, as another process of the same user may: refused too, never shared.
            let shared = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: true)
            defer { shared.close() }
            let sharedPort = Socket.localAddress(shared)!.port
            let existingPort = ok.object["port"] as! Int
            let before = gateway.snapshot()
            let target = "\"target\":\"\(echo.address)\""
            let range = gateway.control.settings.portRange
            let cases: [(String, String, Int, String)] = [
                ("r1", "{\"protocol\":\"tcp\",", 400, "not valid JSON"),
                ("r1", "[1,2]", 400, "JSON object"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":0,\(target),\"colour\":\"red\"}", 400, "colour: unknown field"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":\"zero\",\(target)}", 400, "method"),
                ("r1", "{\"protocol\":\"sctp\",\"method\":0,\(target)}", 400, "protocol"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":7,\(target)}", 400, "method"),
                ("r1", "{\"method\":0,\(target)}", 400, "protocol: required"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":1,\(target),\"client_ip\":\"127.0.0.1\",\"port\":70000}", 400, "port: 70000 is outside 1-65535"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":1,\(target),\"client_ip\":\"127.0.0.1\",\"port\":0}", 400, "port: 0 is outside"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":1,\(target),\"port\":3389}", 400, "client_ip: required"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":0,\(target),\"port\":3389}", 400, "port: 3389 is outside this gateway's port range \(range.lowerBound)-\(range.upperBound)"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":2,\(target),\"client_ip\":\"127.0.0.1\",\"port\":70000}", 400, "port: 70000 is outside 1-65535"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":0,\(target),\"port\":\(existingPort)}", 409, "port: \(existingPort)/tcp is already taken"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":2,\(target),\"client_ip\":\"not-an-ip\"}", 400, "client_ip"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"desktop.example:3389\"}", 400, "target"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":0,\(target),\"unused_expiry_s\":0}", 400, "unused_expiry_s"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":1,\(target),\"client_ip\":\"127.0.0.1\",\"port\":\(heldPort)}", 409, "port: \(heldPort)/tcp is already in use"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":1,\(target),\"client_ip\":\"127.0.0.1\",\"port\":\(sharedPort)}", 409, "port: \(sharedPort)/tcp is already in use"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":1,\(target),\"client_ip\":\"127.0.0.1\",\"port\":\(existingPort)}", 409, "already taken"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"10.9.9.9:3389\"}", 403, "target: 10.9.9.9:3389 is outside the desktop networks"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"127.0.0.1:\(gateway.port)\"}", 403, "is the gateway itself"),
                ("r1", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"127.0.0.1:\(existingPort)\"}", 403, "is the gateway itself"),
                ("existing", "{\"protocol\":\"udp\",\"method\":0,\(target)}", 409, "id: rule existing already exists"),
                ("bad%20id", "{\"protocol\":\"tcp\",\"method\":0,\(target)}", 400, "id: must be"),
            ]
            for (id, body, status, message) in cases {
                let reply = try gateway.put(id, body)
                #expect(reply.status == status, "\(body): \(reply.status) \(reply.text)")
                #expect((reply.object["error"] as? String ?? "").contains(message), "\(body): \(reply.text)")
                #expect(gateway.snapshot() == before, "\(body) changed something")
            }
            // Oversized, declared and actually sent.
            let big = "{\"protocol\":\"tcp\",\"method\":0,\(target),\"x\":\"" + String(repeating: "a", count: 5000) + "\"}"
            let reply = try gateway.put("r1", big)
            #expect(reply.status == 413)
            #expect(reply.object["field"] as? String == "body")
            #expect(gateway.snapshot() == before)
            // Unknown path and method.
            #expect(try gateway.send("PATCH", "/control/v1/rules").status == 405)
            #expect(try gateway.send("GET", "/control/v2/other").status == 404)
            #expect(gateway.snapshot() == before)
        }
        await gateway.stop()
    }

    @Test func noDesktopNetworksMeansNoPushedRules() async throws {
        let gateway = try await TestGateway.start(settings: TestGateway.settings(networks: []))
        try await offPool {
            let reply = try gateway.put("r1", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"127.0.0.1:22\"}")
            #expect(reply.status == 403)
            #expect((reply.object["error"] as? String ?? "").contains("sets no desktop_networks"))
        }
        await gateway.stop()
    }

    @Test func loopbackNeedsAnExplicitNetwork() async throws {
        let gateway = try await TestGateway.start(settings: TestGateway.settings(networks: ["0.0.0.0/0"]))
        try await offPool {
            let reply = try gateway.put("r1", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"127.0.0.1:22\"}")
            #expect(reply.status == 403)
            #expect((reply.object["error"] as? String ?? "").contains("the gateway itself (loopback)"))
        }
        await gateway.stop()
    }

    @Test func ownAddressesAreRefusedOnAnyPort() async throws {
        var settings = TestGateway.settings(networks: ["10.0.0.0/8", "127.0.0.0/8"])
        settings.localAddresses = [IPAddress("10.0.0.2")!]
        settings.ownAddresses = [SocketAddress("10.0.0.3:19010")!]
        let gateway = try await TestGateway.start(settings: settings)
        try await offPool {
            for target in ["10.0.0.2:22", "10.0.0.3:3389", "10.0.0.2:20500"] {
                let reply = try gateway.put("r1", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"\(target)\"}")
                #expect(reply.status == 403, "\(target): \(reply.text)")
                #expect((reply.object["error"] as? String ?? "").contains("target: \(target) is the gateway itself"))
            }
            // A desktop beside the gateway is fine (the engine cannot reach it here, but the rule opens).
            let reply = try gateway.put("r2", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"10.0.0.4:3389\"}")
            #expect(reply.status == 201, "\(reply.text)")
            #expect(gateway.control.pushedRules().map(\.id) == ["r2"])
        }
        await gateway.stop()
    }

    @Test("ports in use: each port a rule listens on with its protocol, in port order; a deleted rule's goes")
    func portsInUse() async throws {
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        try await offPool {
            let control = gateway.control
            #expect(control.portsInUse().isEmpty)
            let (tcp, _) = try control.put(id: "t", push: RulePush(protocol: .tcp, method: .randomPort, target: "\(echo.address)"))
            let (udp, _) = try control.put(id: "u", push: RulePush(protocol: .udp, method: .randomPort, target: "\(echo.address)"))
            let (both, _) = try control.put(id: "b", push: RulePush(protocol: .both, method: .randomPort, target: "\(echo.address)"))
            let expected = [(tcp.port, "tcp"), (udp.port, "udp"), (both.port, "tcp"), (both.port, "udp")]
                .sorted { ($0.0, $0.1) < ($1.0, $1.1) }.map { "\($0.0)/\($0.1)" }
            #expect(control.portsInUse() == expected)
            try control.delete(id: "b")
            #expect(control.portsInUse() == expected.filter { !$0.hasPrefix("\(both.port)/") })
            #expect(control.rules().map(\.id) == ["t", "u"])
        }
        await gateway.stop()
    }

    @Test func unusedRuleExpiresAndALiveOneStays() async throws {
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        try await offPool {
            let control = gateway.control
            _ = try control.put(id: "idle", push: RulePush(protocol: .tcp, method: .randomPort, target: "\(echo.address)", unusedExpirySeconds: 5))
            let (busy, _) = try control.put(id: "busy", push: RulePush(protocol: .tcp, method: .randomPort, target: "\(echo.address)", unusedExpirySeconds: 5))
            let (brief, _) = try control.put(id: "brief", push: RulePush(protocol: .tcp, method: .randomPort, target: "\(echo.address)", unusedExpirySeconds: 5))
            // A session on "brief" that begins and ends before the next tick still counts as use.
            #expect(echoThrough(port: brief.port) == "hello through the gateway")
            #expect(eventually { control.sessionCounts()["broker:brief"] == nil })
            #expect(control.tick().isEmpty)
            // A live session on "busy".
            let session = try #require(OpenSession(port: busy.port))
            #expect(eventually { control.sessionCounts()["broker:busy"] == 1 })
            gateway.clock.advance(6)
            #expect(control.tick() == ["idle"])
            #expect(control.pushedRules().map(\.id) == ["busy", "brief"])
            #expect(control.store.load().rules.map(\.id) == ["busy", "brief"])
            gateway.clock.advance(600)
            #expect(control.tick().isEmpty, "a rule with a live session never expires")
            // The session ends; the rule was used, so it stays until the broker deletes it.
            session.close()
            #expect(eventually { control.sessionCounts()["broker:busy"] == nil })
            gateway.clock.advance(600)
            #expect(control.tick().isEmpty)
            #expect(control.store.load().rules.first?.lastUsed != nil)
        }
        await gateway.stop()
    }

    @Test func restartRestoresRules() async throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let key = ControlKey.generate()
        let echo = try TCPEcho()
        defer { echo.stop() }
        let first = try await TestGateway.start(folder: folder, key: key)
        let port: Int = try await offPool {
            let reply = try first.put("keep-me", "{\"protocol\":\"tcp\",\"method\":2,\"client_ip\":\"127.0.0.1\",\"target\":\"\(echo.address)\"}")
            #expect(reply.status == 201)
            return try #require(reply.object["port"] as? Int)
        }
        await first.stop(removeFolder: false)
        #expect(try await offPool { echoThrough(port: port) } == nil, "the first gateway is gone")

        let second = try await TestGateway.start(folder: folder, key: key)
        try await offPool {
            #expect(second.control.pushedRules().map(\.id) == ["keep-me"])
            #expect(second.control.pushedRules().first?.port == port)
            #expect(echoThrough(port: port) == "hello through the gateway")
            #expect(echoThrough(port: port, source: "127.0.0.2") == nil)
            let list = try second.send("GET", "/control/v1/rules")
            #expect(try JSONDecoder().decode([RuleState].self, from: Data(list.body)).map(\.id) == ["keep-me"])
        }
        await second.stop(removeFolder: false)
    }

    @Test func reconcileRemovesWhatTheBrokerDropped() async throws {
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        try await offPool {
            for id in ["a", "b", "c"] {
                _ = try gateway.control.put(id: id, push: RulePush(protocol: .tcp, method: .randomPort, target: "\(echo.address)"))
            }
            // "c" was pushed after the registration was sent: it stays.
            #expect(gateway.control.reconcile(sent: ["a", "b"], keep: ["a"]) == ["b"])
            #expect(gateway.control.pushedRules().map(\.id) == ["a", "c"])
            #expect(gateway.control.store.load().rules.map(\.id) == ["a", "c"])
        }
        await gateway.stop()
    }
}
