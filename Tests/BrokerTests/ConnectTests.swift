@testable import BrokerAPI
import BrokerCore
import CertificateFiles
import ControlProtocol
import Foundation
import Synchronization
import Testing
import TestSupport

/// A broker with fake gateways registered at it, for connect tests.
struct ConnectSetup {
    let broker: TestBroker
    let sid: String
    var gateways: [Int: (key: ControlKey, fake: FakeGateway)] = [:]

    /// Creates, enrolls and registers a gateway whose control endpoint is a new `FakeGateway`.
    mutating func addGateway(_ name: String, extra: [String: Any] = [:]) async throws -> Int {
        let (id, key) = try await enrolledGateway(broker, sid: sid, name: name, address: "\(name).example.com", extra: extra)
        let fake = try await FakeGateway(gatewayID: id, key: key)
        let registered = try await agentCall(broker, "/v1/gateway-agent/register", registerBody(id, controlURL: fake.controlURL),
                                             gatewayID: id, key: key)
        #expect(registered.reply.status == 200, "\(registered.reply)")
        gateways[id] = (key, fake)
        return id
    }

    func desktop(_ name: String, gatewayID: Int? = nil, clusterID: Int? = nil) async throws -> Int {
        var body: [String: Any] = ["name": name, "address": "10.1.2.3",
                                   "protocols": [["name": "rdp", "port": 3389], ["name": "nx", "port": 4000, "transport": "both"]]]
        if let gatewayID { body["gateway_id"] = gatewayID }
        if let clusterID { body["load_balancer_id"] = clusterID }
        let reply = try await broker.client.json("POST", "/v1/desktops", body, token: sid)
        return try #require(reply.storedData["id"] as? Int, "\(reply)")
    }

    func cluster(_ name: String, via: String, useSourceIP: Int = 0, address: String? = nil) async throws -> Int {
        var body: [String: Any] = ["name": name, "load_balance_via": via, "use_src_ip": useSourceIP]
        if let address { body["address"] = address }
        let reply = try await broker.client.json("POST", "/v1/gateway-clusters", body, token: sid)
        return try #require(reply.storedData["id"] as? Int, "\(reply)")
    }

    func stop() async {
        for (_, entry) in gateways { await entry.fake.stop() }
    }

    /// Every push the fakes received had a signature that verified.
    func allSignaturesVerified() -> Bool {
        gateways.values.allSatisfy { entry in entry.fake.calls.allSatisfy { $0.authError == nil } }
    }
}

func withConnectSetup(_ body: (inout ConnectSetup) async throws -> Void) async throws {
    try await TestBroker.with { broker in
        var setup = ConnectSetup(broker: broker, sid: try await broker.login())
        do {
            try await body(&setup)
        } catch {
            await setup.stop()
            throw error
        }
        await setup.stop()
    }
}

@Suite("Connect and disconnect: gateway choice, rule push, 502/503", .offPool)
struct ConnectTests {
    @Test("an https control endpoint: the push goes over TLS to the certificate the gateway registered; another certificate is refused and nothing is stored")
    func pinnedControlCertificate() async throws {
        let pairA = try CertificateFiles.makeSelfSigned(commonName: "gw-a control", subjectAltNames: ["127.0.0.1"], bits: 2048, ownTrustAnchor: true)
        let pairB = try CertificateFiles.makeSelfSigned(commonName: "gw-b control", subjectAltNames: ["127.0.0.1"], bits: 2048, ownTrustAnchor: true)
        try await withConnectSetup { setup in
            let broker = setup.broker
            let (id, key) = try await enrolledGateway(broker, sid: setup.sid, name: "gw-tls", address: "gw-tls.example.com")
            let fake = try await FakeGateway(gatewayID: id, key: key, tls: pairA)
            setup.gateways[id] = (key, fake)
            #expect(fake.controlURL.hasPrefix("https://"))

            // An https control_url needs its certificate, and a weak one is refused, naming the field.
            let bare = try await agentCall(broker, "/v1/gateway-agent/register", registerBody(id, controlURL: fake.controlURL), gatewayID: id, key: key)
            #expect(bare.reply.status == 400 && bare.reply.text.contains("control_certificate"), "\(bare.reply)")
            let weak = try CertificateFiles.makeSelfSigned(commonName: "weak", subjectAltNames: [], bits: 1024, ownTrustAnchor: true)
            let refused = try await agentCall(broker, "/v1/gateway-agent/register",
                                              registerBody(id, controlURL: fake.controlURL, certificate: weak.certificate), gatewayID: id, key: key)
            #expect(refused.reply.status == 400 && refused.reply.text.contains("at least 2048"), "\(refused.reply)")

            let registered = try await agentCall(broker, "/v1/gateway-agent/register",
                                                 registerBody(id, controlURL: fake.controlURL, certificate: pairA.certificate), gatewayID: id, key: key)
            #expect(registered.reply.status == 200, "\(registered.reply)")
            let desktopID = try await setup.desktop("desk-tls", gatewayID: id)
            let reply = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid)
            #expect(reply.status == 200, "\(reply)")
            let ruleID = try #require(reply.object["rule_id"] as? String)
            #expect(fake.rules[ruleID] != nil, "the push did not reach the TLS endpoint")
            #expect(setup.allSignaturesVerified())

            // The same gateway registers a certificate its endpoint does not present: pushes are refused.
            let swapped = try await agentCall(broker, "/v1/gateway-agent/register",
                                              registerBody(id, controlURL: fake.controlURL, rules: [reportedRule(ruleID)],
                                                           certificate: pairB.certificate), gatewayID: id, key: key)
            #expect(swapped.reply.status == 200, "\(swapped.reply)")
            let before = fake.calls.count
            let denied = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid)
            #expect(denied.status == 502, "\(denied)")
            #expect(denied.text.contains("cannot be reached"), "\(denied)")
            #expect(fake.calls.count == before, "a request reached the endpoint whose certificate is not the registered one")
            #expect(try await broker.store.rules(gatewayID: Int64(id)).map(\.id) == [ruleID], "the refused connect stored a rule")
        }
    }

    @Test("a desktop's own gateway: the three routing methods, pushed signed, answered with address and port")
    func pinnedGatewayMethods() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let gatewayID = try await setup.addGateway("gw-a")
            let fake = try #require(setup.gateways[gatewayID]?.fake)
            let desktopID = try await setup.desktop("desk-1", gatewayID: gatewayID)

            // use_src_ip 0: a random port, open to anyone.
            let reply = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid)
            #expect(reply.status == 200, "\(reply)")
            let ruleID = try #require(reply.object["rule_id"] as? String)
            #expect(reply.object["address"] as? String == "gw-a.example.com")
            #expect(reply.object["port"] as? Int == 20001)
            #expect(reply.object["protocol"] as? String == "rdp")
            #expect((reply.object["gateway"] as? [String: Any])?["id"] as? Int == gatewayID)
            #expect((reply.object["gateway"] as? [String: Any])?["name"] as? String == "gw-a")
            let push = try #require(fake.rules[ruleID])
            #expect(push == RulePush(protocol: .tcp, method: .randomPort, target: "10.1.2.3:3389", unusedExpirySeconds: 300))
            #expect(try await broker.store.rule(id: ruleID).port == 20001)

            // use_src_ip 1: the protocol's own port, only the client's address (the HTTP peer by default).
            _ = try await broker.client.json("PUT", "/v1/gateways/\(gatewayID)", ["use_src_ip": 1], token: setup.sid)
            let own = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid)
            #expect(own.status == 200 && own.object["port"] as? Int == 3389, "\(own)")
            let ownPush = try #require(fake.rules[own.object["rule_id"] as? String ?? ""])
            #expect(ownPush.method == .protocolPortClientOnly && ownPush.port == 3389 && ownPush.clientIP == "127.0.0.1")

            // use_src_ip 2 with an explicit client_ip, on a tcp+udp protocol.
            _ = try await broker.client.json("PUT", "/v1/gateways/\(gatewayID)", ["use_src_ip": 2], token: setup.sid)
            let random = try await broker.client.json("POST", "/v1/connect",
                                                      ["desktop_id": desktopID, "protocol": "nx", "client_ip": "198.51.100.7"], token: setup.sid)
            #expect(random.status == 200, "\(random)")
            let randomPush = try #require(fake.rules[random.object["rule_id"] as? String ?? ""])
            #expect(randomPush == RulePush(protocol: .both, method: .randomPortClientOnly, target: "10.1.2.3:4000",
                                           clientIP: "198.51.100.7", unusedExpirySeconds: 300))
            #expect(setup.allSignaturesVerified())
            #expect(try await broker.store.rules(gatewayID: Int64(gatewayID)).count == 3)

            // Registration reconciles: the broker keeps what it has, drops the rest.
            let key = try #require(setup.gateways[gatewayID]?.key)
            let lost = try #require(own.object["rule_id"] as? String)
            let lostRandom = try #require(random.object["rule_id"] as? String)
            #expect(fake.calls.filter { $0.method == "PUT" && $0.ruleID == lost }.count == 1)
            let again = try await agentCall(broker, "/v1/gateway-agent/register",
                                            registerBody(gatewayID, controlURL: fake.controlURL,
                                                         rules: [reportedRule(ruleID), reportedRule("0123456789abcdef")]),
                                            gatewayID: gatewayID, key: key)
            #expect(again.reply.object["keep"] as? [String] == [ruleID], "\(again.reply)")
            // Rules the gateway did not list (it lost them) are pushed again,
            // asking for the port the client was given (method 2 names it now).
            let repushed = await eventuallyAsync {
                fake.calls.filter { $0.method == "PUT" && ($0.ruleID == lost || $0.ruleID == lostRandom) }.count == 4
            }
            #expect(repushed, "the broker did not push the rules the gateway lacked")
            #expect(fake.rules[lostRandom]?.port == random.object["port"] as? Int)
            #expect(setup.allSignaturesVerified())
        }
    }

    @Test("a gateway's forwarding_path goes into every rule pushed to it; a bad one is refused naming the field")
    func forwardingPath() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let gatewayID = try await setup.addGateway("gw-a")
            let fake = try #require(setup.gateways[gatewayID]?.fake)
            let desktopID = try await setup.desktop("desk-1", gatewayID: gatewayID)
            let shown = try await broker.client.json("GET", "/v1/gateways/\(gatewayID)", token: setup.sid)
            #expect((shown.object["stored_data"] as? [String: Any] ?? shown.object)["forwarding_path"] as? String == "")

            let plain = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid)
            #expect(fake.rules[plain.object["rule_id"] as? String ?? ""]?.forwardingPath == nil, "the gateway's own default")

            let set = try await broker.client.json("PUT", "/v1/gateways/\(gatewayID)", ["forwarding_path": "kernel"], token: setup.sid)
            #expect(set.status == 200, "\(set)")
            let kernel = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid)
            #expect(kernel.status == 200, "\(kernel)")
            let ruleID = try #require(kernel.object["rule_id"] as? String)
            #expect(fake.rules[ruleID]?.forwardingPath == .kernel)
            #expect(try await broker.store.rule(id: ruleID).push.forwardingPath == .kernel, "stored as pushed (re-pushes keep it)")

            let bad = try await broker.client.json("PUT", "/v1/gateways/\(gatewayID)", ["forwarding_path": "warp"], token: setup.sid)
            #expect(bad.status == 400 && "\(bad)".contains("forwarding_path"), "\(bad)")
            #expect(try await broker.store.gateway(id: Int64(gatewayID)).forwardingPath == .kernel, "a refused change changes nothing")
            #expect(setup.allSignaturesVerified())
        }
    }

    @Test("bad connect input: 400/404 naming the field, nothing pushed or stored")
    func badInput() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let gatewayID = try await setup.addGateway("gw-a")
            let desktopID = try await setup.desktop("desk-1", gatewayID: gatewayID)
            for (body, status, mentions) in [
                (["desktop_id": desktopID, "protocol": "rdp", "colour": 1], 400, "colour: unknown field"),
                (["protocol": "rdp"], 400, "desktop_id: is required"),
                (["desktop_id": "one", "protocol": "rdp"], 400, "desktop_id: must be an integer"),
                (["desktop_id": desktopID], 400, "protocol: is required"),
                (["desktop_id": desktopID, "protocol": "vnc"], 400, "protocol: desktop"),
                (["desktop_id": desktopID, "protocol": "rdp", "client_ip": "not-an-ip"], 400, "client_ip"),
                (["desktop_id": 999, "protocol": "rdp"], 404, "desktop_id: no desktop with id 999"),
            ] as [([String: Any], Int, String)] {
                try await expectRejected(broker, "POST", "/v1/connect", body, token: setup.sid, status: status, mentions: mentions)
            }
            #expect(setup.gateways[gatewayID]?.fake.calls.isEmpty == true)
            #expect(try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"]).status == 401)
            let nowhere = try await setup.desktop("desk-nowhere")
            try await expectRejected(broker, "POST", "/v1/connect", ["desktop_id": nowhere, "protocol": "rdp"], token: setup.sid,
                                     status: 409, mentions: "names neither a gateway")
        }
    }

    @Test("clusters: L takes the gateway with the fewest rules, E every online one, P falls back to L; offline gateways are skipped")
    func clusterChoice() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let least = try await setup.cluster("cl-least", via: "L")
            let b = try await setup.addGateway("gw-b", extra: ["load_balancer_id": least])
            let c = try await setup.addGateway("gw-c", extra: ["load_balancer_id": least])
            let desktopL = try await setup.desktop("desk-l", clusterID: least)
            func connect(_ desktop: Int) async throws -> HTTPReply {
                try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktop, "protocol": "rdp"], token: setup.sid)
            }
            func gatewayOf(_ reply: HTTPReply) -> Int? { (reply.object["gateway"] as? [String: Any])?["id"] as? Int }

            #expect(gatewayOf(try await connect(desktopL)) == b, "tie: lowest id")
            #expect(gatewayOf(try await connect(desktopL)) == c, "c has fewer rules now")
            #expect(gatewayOf(try await connect(desktopL)) == b)

            // Connects that arrive together: one still being pushed counts, so the next goes elsewhere.
            let fakeB = try #require(setup.gateways[b]?.fake), fakeC = try #require(setup.gateways[c]?.fake)
            fakeB.holdAnswers(true)
            fakeC.holdAnswers(true)
            let held = fakeC.rules.count
            let sid = setup.sid
            let pushing = Task { try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopL, "protocol": "rdp"], token: sid) }
            try await waitUntilAsync("the push reaching gw-c (the fewest: 1 against 2)") { fakeC.rules.count == held + 1 }
            let next = Task { try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopL, "protocol": "rdp"], token: sid) }
            try await waitUntilAsync("the next push reaching a gateway") { fakeB.rules.count + fakeC.rules.count == 4 + 1 }
            fakeB.holdAnswers(false)
            fakeC.holdAnswers(false)
            #expect(gatewayOf(try await pushing.value) == c)
            #expect(gatewayOf(try await next.value) == b, "gw-c's rule being pushed counted: 2 against 2, lowest id")

            let every = try await setup.cluster("cl-every", via: "E", useSourceIP: 2)
            let d = try await setup.addGateway("gw-d", extra: ["load_balancer_id": every])
            let e = try await setup.addGateway("gw-e", extra: ["load_balancer_id": every])
            let desktopE = try await setup.desktop("desk-e", clusterID: every)
            let first = try await connect(desktopE)
            let second = try await connect(desktopE)
            #expect(gatewayOf(first) == d && gatewayOf(second) == d, "E: the lowest id chooses the port")
            #expect(setup.gateways[e]?.fake.rules.count == 2, "E: every online gateway has the rules")
            // The cluster's use_src_ip applies (2), not the gateway's (0).
            #expect(setup.gateways[d]?.fake.rules[first.object["rule_id"] as? String ?? ""]?.method == .randomPortClientOnly)

            // d goes offline: e alone carries the next connection.
            try await broker.store.recordGatewayState(id: Int64(d), online: false, version: nil, heartbeat: nil)
            let third = try await connect(desktopE)
            #expect(gatewayOf(third) == e && third.object["gateways"] == nil, "\(third)")
            #expect(setup.gateways[d]?.fake.rules.count == 2)

            let login = try await setup.cluster("cl-login", via: "P")
            let f = try await setup.addGateway("gw-f", extra: ["load_balancer_id": login])
            let desktopP = try await setup.desktop("desk-p", clusterID: login)
            #expect(gatewayOf(try await connect(desktopP)) == f, "no login gateway known: fewest rules")

            // Every gateway of a cluster offline: 503, nothing stored.
            try await broker.store.recordGatewayState(id: Int64(e), online: false, version: nil, heartbeat: nil)
            try await expectRejected(broker, "POST", "/v1/connect", ["desktop_id": desktopE, "protocol": "rdp"], token: setup.sid,
                                     status: 503, mentions: "no gateway of cluster")
            // A pinned gateway that is offline: 503 naming it.
            let pinned = try await setup.desktop("desk-pinned", gatewayID: d)
            try await expectRejected(broker, "POST", "/v1/connect", ["desktop_id": pinned, "protocol": "rdp"], token: setup.sid,
                                     status: 503, mentions: "gateway \(d) ('gw-d')")
            #expect(setup.allSignaturesVerified())
        }
    }

    @Test("E: the rule goes to every online gateway with the port the first chose, at the cluster's address; a port taken on one gateway is tried again elsewhere; any other refusal takes every push back; disconnect removes them all")
    func everyGateway() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let every = try await setup.cluster("cl-every", via: "E", address: "lb.example.com")
            var ids: [Int] = []
            for name in ["gw-1", "gw-2", "gw-3"] { ids.append(try await setup.addGateway(name, extra: ["load_balancer_id": every])) }
            let fakes = try ids.map { try #require(setup.gateways[$0]?.fake) }
            let desktop = try await setup.desktop("desk-e", clusterID: every)
            func connect() async throws -> HTTPReply {
                try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktop, "protocol": "rdp"], token: setup.sid)
            }

            let first = try await connect()
            #expect(first.status == 200, "\(first)")
            let port = try #require(first.object["port"] as? Int)
            let ruleID = try #require(first.object["rule_id"] as? String)
            #expect(first.object["address"] as? String == "lb.example.com", "the cluster's load balancer")
            #expect((first.object["gateways"] as? [[String: Any]])?.compactMap { $0["id"] as? Int } == ids)
            #expect(fakes[0].rules[ruleID]?.port == nil, "the first gateway chooses the port")
            for fake in fakes.dropFirst() {
                #expect(fake.rules.count == 1 && fake.rules.values.first?.port == port, "the others are asked for that port")
            }
            #expect(try await broker.store.rules(connectionID: ruleID).map(\.gatewayID) == ids.map(Int64.init))

            // The first gateway's next port is held on gw-3: every push is taken back and the broker tries again.
            fakes[2].take([port + 1])
            let second = try await connect()
            #expect(second.status == 200, "\(second)")
            let secondPort = try #require(second.object["port"] as? Int)
            #expect(secondPort != port + 1)
            for fake in fakes {
                #expect(fake.rules.count == 2, "one rule per connection on each gateway, none left from the abandoned attempt")
                #expect(fake.rules.values.contains { $0.port == secondPort } || fake === fakes[0])
            }
            #expect(fakes[0].calls.filter { $0.method == "DELETE" }.count == 1, "the abandoned push was taken back")

            // Any other refusal: 502 naming the gateway, every push taken back, nothing stored.
            fakes[2].take([])
            fakes[1].refuse(500, "disk full")
            let stored = try await broker.store.rules(gatewayID: nil).count
            try await expectRejected(broker, "POST", "/v1/connect", ["desktop_id": desktop, "protocol": "rdp"], token: setup.sid,
                                     status: 502, mentions: "gateway \(ids[1]) ('gw-2') refused the rule: 500 disk full")
            #expect(fakes[0].rules.count == 2 && fakes[2].rules.count == 2)
            #expect(try await broker.store.rules(gatewayID: nil).count == stored)
            fakes[1].accept()

            // Disconnect removes the connection on every gateway.
            let deleted = try await broker.client.json("DELETE", "/v1/connect/\(ruleID)", token: setup.sid)
            #expect(deleted.status == 204, "\(deleted)")
            for fake in fakes { #expect(fake.rules.count == 1) }
            #expect(try await broker.store.rules(connectionID: ruleID).isEmpty)
            try await expectRejected(broker, "DELETE", "/v1/connect/\(ruleID)", nil, token: setup.sid, status: 404, mentions: "no connection rule")
            #expect(setup.allSignaturesVerified())
        }
    }

    @Test("E: a gateway that registers after a connect (it was offline) joins the connection on its port; disconnect reaches it too")
    func everyGatewayJoinsLater() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let every = try await setup.cluster("cl-every", via: "E")
            let g1 = try await setup.addGateway("gw-1", extra: ["load_balancer_id": every])
            let g2 = try await setup.addGateway("gw-2", extra: ["load_balancer_id": every])
            let fake2 = try #require(setup.gateways[g2]?.fake)
            let desktop = try await setup.desktop("desk-e", clusterID: every)
            try await broker.store.recordGatewayState(id: Int64(g2), online: false, version: nil, heartbeat: nil)
            let reply = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktop, "protocol": "rdp"], token: setup.sid)
            #expect(reply.status == 200 && reply.object["gateways"] == nil, "\(reply)")
            let ruleID = try #require(reply.object["rule_id"] as? String)
            let port = try #require(reply.object["port"] as? Int)
            #expect(fake2.rules.isEmpty, "gw-2 was offline")

            let key2 = try #require(setup.gateways[g2]?.key)
            let again = try await agentCall(broker, "/v1/gateway-agent/register", registerBody(g2, controlURL: fake2.controlURL),
                                            gatewayID: g2, key: key2)
            #expect(again.reply.status == 200)
            let joined = await eventuallyAsync { fake2.rules.values.contains { $0.port == port } }
            #expect(joined, "gw-2 did not get the connection it lacked on port \(port)")
            #expect(try await eventuallyAsync { try await broker.store.rules(connectionID: ruleID).map(\.gatewayID) == [Int64(g1), Int64(g2)] })

            let deleted = try await broker.client.json("DELETE", "/v1/connect/\(ruleID)", token: setup.sid)
            #expect(deleted.status == 204, "\(deleted)")
            #expect(fake2.rules.isEmpty && setup.gateways[g1]?.fake.rules.isEmpty == true)
            #expect(setup.allSignaturesVerified())
        }
    }

    @Test("a gateway that registers while a push to it is unanswered keeps that rule (single gateway and E); a push taken back is not kept")
    func registrationDuringPush() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker, sid = setup.sid
            let gatewayID = try await setup.addGateway("gw-a")
            let (key, fake) = try #require(setup.gateways[gatewayID])
            let desktopID = try await setup.desktop("desk-1", gatewayID: gatewayID)
            func register(_ id: Int, _ fake: FakeGateway, key: ControlKey, _ rules: [String]) async throws -> [String] {
                let reply = try await agentCall(broker, "/v1/gateway-agent/register",
                                                registerBody(id, controlURL: fake.controlURL, rules: rules.map(reportedRule)),
                                                gatewayID: id, key: key).reply
                #expect(reply.status == 200, "\(reply)")
                return try #require(reply.object["keep"] as? [String], "\(reply)")
            }

            // The gateway holds the rule; the broker has not had its answer, so has not stored it.
            fake.holdAnswers(true)
            let connect = Task { try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: sid) }
            try await waitUntilAsync("the push reaching the gateway") { !fake.rules.isEmpty }
            let held = try #require(fake.rules.keys.first)
            #expect(try await broker.store.rules(gatewayID: nil).isEmpty, "not stored before the gateway answers")
            let gone = GatewayRule.newID()
            #expect(try await register(gatewayID, fake, key: key, [gone, held]) == [held],
                    "a registration in the push's window keeps the rule the connect will answer with, and drops one the broker never made")
            fake.holdAnswers(false)
            let reply = try await connect.value
            #expect(reply.status == 200 && reply.object["rule_id"] as? String == held, "\(reply)")
            #expect(try await register(gatewayID, fake, key: key, [held]) == [held], "stored now")

            // E: the second gateway refuses, after a while; meanwhile the first holds its rule and registers.
            let every = try await setup.cluster("cl-every", via: "E")
            let g1 = try await setup.addGateway("gw-1", extra: ["load_balancer_id": every])
            let g2 = try await setup.addGateway("gw-2", extra: ["load_balancer_id": every])
            let (key1, fake1) = try #require(setup.gateways[g1])
            let pooled = try await setup.desktop("desk-e", clusterID: every)
            let fake2 = try #require(setup.gateways[g2]?.fake)
            fake2.refuse(500, "disk full")
            fake2.holdAnswers(true)
            let refused = Task { try await broker.client.json("POST", "/v1/connect", ["desktop_id": pooled, "protocol": "rdp"], token: sid) }
            try await waitUntilAsync("the pushes reaching both gateways") { !fake1.rules.isEmpty && fake2.calls.contains { $0.method == "PUT" } }
            let first = try #require(fake1.rules.keys.first)
            #expect(try await register(g1, fake1, key: key1, [first]) == [first], "kept while the connect is undecided")
            fake2.holdAnswers(false)
            #expect(try await refused.value.status == 502)
            #expect(fake1.rules.isEmpty, "taken back")
            #expect(try await register(g1, fake1, key: key1, [first]) == [], "a push taken back is not kept: its reservation ended")
            fake2.accept()
            #expect(setup.allSignaturesVerified())
        }
    }

    @Test("a gateway that refuses or cannot be reached: 502 naming it and its error, nothing stored")
    func gatewayFailures() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let gatewayID = try await setup.addGateway("gw-a")
            let fake = try #require(setup.gateways[gatewayID]?.fake)
            let desktopID = try await setup.desktop("desk-1", gatewayID: gatewayID)
            fake.refuse(409, "port range 20001-22000 is exhausted")
            try await expectRejected(broker, "POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid,
                                     status: 502, mentions: "gateway \(gatewayID) ('gw-a') refused the rule: 409 port range 20001-22000 is exhausted")
            // A key the gateway does not know (re-enrolled on the broker only): the gateway's 401 comes back as 502.
            fake.accept()
            let newKey = try await broker.client.json("POST", "/v1/gateways/\(gatewayID)/enrollment", token: setup.sid)
            #expect(newKey.status == 201)
            try await expectRejected(broker, "POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid,
                                     status: 502, mentions: "signature does not verify")
            #expect(fake.rules.isEmpty)
            await fake.stop()
            try await expectRejected(broker, "POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: setup.sid,
                                     status: 502, mentions: "cannot be reached")
        }
    }

    @Test("disconnect: deletes the rule on the gateway and in the table; owner or admin only; 404 after")
    func disconnect() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let gatewayID = try await setup.addGateway("gw-a")
            let fake = try #require(setup.gateways[gatewayID]?.fake)
            let desktopID = try await setup.desktop("desk-1", gatewayID: gatewayID)
            _ = try await broker.client.json("POST", "/v1/users", ["login": "alice", "password": "alice-pass"], token: setup.sid)
            _ = try await broker.client.json("POST", "/v1/users", ["login": "bob", "password": "bob-pass"], token: setup.sid)
            let alice = try await broker.login("alice", "alice-pass")
            let bob = try await broker.login("bob", "bob-pass")
            let reply = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: alice)
            let ruleID = try #require(reply.object["rule_id"] as? String, "\(reply)")
            #expect(fake.rules[ruleID] != nil)

            try await expectRejected(broker, "DELETE", "/v1/connect/\(ruleID)", nil, token: bob, status: 403, mentions: "another user")
            try await expectRejected(broker, "DELETE", "/v1/connect/NOT-HEX", nil, token: alice, status: 400, mentions: "rule_id")
            fake.refuse(500, "disk full")
            try await expectRejected(broker, "DELETE", "/v1/connect/\(ruleID)", nil, token: alice, status: 502, mentions: "disk full")
            #expect(fake.rules[ruleID] != nil)
            fake.accept()

            let deleted = try await broker.client.json("DELETE", "/v1/connect/\(ruleID)", token: alice)
            #expect(deleted.status == 204, "\(deleted)")
            #expect(fake.rules[ruleID] == nil)
            #expect(try await broker.store.rules(gatewayID: nil).isEmpty)
            try await expectRejected(broker, "DELETE", "/v1/connect/\(ruleID)", nil, token: alice, status: 404, mentions: "no connection rule")
            #expect(fake.calls.filter { $0.method == "DELETE" }.count == 2)
            #expect(setup.allSignaturesVerified())

            // A gateway that carries rules cannot be deleted; nor a desktop that rules lead to.
            let other = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: alice)
            #expect(other.status == 200)
            try await expectRejected(broker, "DELETE", "/v1/desktops/\(desktopID)", nil, token: setup.sid, status: 409, mentions: "connection rule")
        }
    }

    /// Starts `count` connects at once while the fake holds its answers, and
    /// waits until every one is at the gateway (held) or in the broker's
    /// queue for it; `whenQueued` runs then, before the answers are released.
    private static func heldBurst(_ setup: ConnectSetup, gatewayID: Int, desktopID: Int, count: Int,
                                  whenQueued: () -> Void = {}) async throws -> [HTTPReply] {
        let fake = try #require(setup.gateways[gatewayID]?.fake)
        let broker = setup.broker, sid = setup.sid
        fake.holdAnswers(true)
        let burst = Task {
            try await withThrowingTaskGroup(of: HTTPReply.self) { group in
                for _ in 0..<count {
                    group.addTask { try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktopID, "protocol": "rdp"], token: sid) }
                }
                var replies: [HTTPReply] = []
                for try await reply in group { replies.append(reply) }
                return replies
            }
        }
        do {
            try await waitUntilAsync("all \(count) pushes in the broker's queue for the gateway or at it") {
                broker.api.gatewayClient.queue.pendingCalls(gatewayID: Int64(gatewayID)) == count
            }
        } catch {
            fake.holdAnswers(false)
            throw error
        }
        whenQueued()
        fake.holdAnswers(false)
        return try await burst.value
    }

    @Test("a burst of connects to one gateway: four pushes go at once, the rest in batches, each connect with its own port; an item refused in a batch fails only its connect; disconnects too")
    func burstIsBatched() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let gatewayID = try await setup.addGateway("gw-a")
            let fake = try #require(setup.gateways[gatewayID]?.fake)
            let desktopID = try await setup.desktop("desk-1", gatewayID: gatewayID)

            let replies = try await Self.heldBurst(setup, gatewayID: gatewayID, desktopID: desktopID, count: 12)
            #expect(replies.allSatisfy { $0.status == 200 }, "\(replies.filter { $0.status != 200 })")
            // At most four requests were under way while all twelve waited: at least eight went in batches.
            #expect(fake.batchSizes.reduce(0, +) >= 8, "\(fake.batchSizes)")
            #expect(fake.calls.filter { $0.method == "PUT" }.count == 12, "each push once")
            let ports = replies.compactMap { $0.object["port"] as? Int }
            #expect(Set(ports).count == 12, "each connect has its own port: \(ports)")
            let ruleIDs = replies.compactMap { $0.object["rule_id"] as? String }
            #expect(Set(fake.rules.keys) == Set(ruleIDs))
            #expect(Set(try await broker.store.rules(gatewayID: nil).map(\.id)) == Set(ruleIDs))
            for reply in replies {
                let id = try #require(reply.object["rule_id"] as? String)
                #expect(try await broker.store.rule(id: id).port == reply.object["port"] as? Int, "the port stored is the one answered")
            }
            #expect(setup.allSignaturesVerified())

            // The gateway refuses every item of the next batch: only those connects fail, naming it.
            let batchesBefore = fake.batchSizes.count, callsBefore = fake.calls.count
            let answered = Mutex(0)
            let mixed = try await Self.heldBurst(setup, gatewayID: gatewayID, desktopID: desktopID, count: 8) {
                // What reached the gateway so far is answered; everything after is refused.
                answered.withLock { $0 = fake.calls.count - callsBefore }
                fake.refuse(500, "disk full")
            }
            let before = answered.withLock { $0 }
            #expect(mixed.filter { $0.status == 200 }.count == before, "\(mixed)")
            #expect(mixed.filter { $0.status == 502 && $0.text.contains("disk full") }.count == 8 - before, "\(mixed)")
            // The calls after the refusal went together (two or more wait: one batch).
            if before <= 6 { #expect(fake.batchSizes.count > batchesBefore, "\(fake.batchSizes)") }
            fake.accept()
            let kept = mixed.compactMap { $0.object["rule_id"] as? String }
            #expect(Set(try await broker.store.rules(gatewayID: nil).map(\.id)) == Set(ruleIDs + kept), "nothing stored for a refused item")

            // Every disconnect at once: each 204, every rule gone on the gateway and in the store.
            let all = ruleIDs + kept
            let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
                let sid = setup.sid
                for id in all { group.addTask { try await broker.client.json("DELETE", "/v1/connect/\(id)", token: sid).status } }
                var statuses: [Int] = []
                for try await status in group { statuses.append(status) }
                return statuses
            }
            #expect(statuses.allSatisfy { $0 == 204 }, "\(statuses)")
            #expect(fake.rules.isEmpty)
            #expect(try await broker.store.rules(gatewayID: nil).isEmpty)
            #expect(broker.api.gatewayClient.queue.pendingCalls(gatewayID: Int64(gatewayID)) == 0)
        }
    }

    @Test("a gateway older than batches (405): the waiting pushes go one at a time, and every connect succeeds")
    func gatewayWithoutBatches() async throws {
        try await withConnectSetup { setup in
            let gatewayID = try await setup.addGateway("gw-old")
            let fake = try #require(setup.gateways[gatewayID]?.fake)
            fake.takeBatches(false)
            let desktopID = try await setup.desktop("desk-1", gatewayID: gatewayID)
            let replies = try await Self.heldBurst(setup, gatewayID: gatewayID, desktopID: desktopID, count: 8)
            #expect(replies.allSatisfy { $0.status == 200 }, "\(replies.filter { $0.status != 200 })")
            #expect(fake.batchSizes.isEmpty)
            #expect(fake.calls.filter { $0.method == "PUT" }.count == 8, "each push once, alone")
            #expect(Set(replies.compactMap { $0.object["port"] as? Int }).count == 8)
            #expect(fake.rules.count == 8)
        }
    }
}
