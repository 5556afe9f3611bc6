import BrokerCore
import ControlProtocol
import Foundation
import Testing
import TestSupport

/// Creates a gateway through the API and enrolls it; returns its id and key.
func enrolledGateway(_ broker: TestBroker, sid: String, name: String, address: String,
                     extra: [String: Any] = [:]) async throws -> (id: Int, key: ControlKey) {
    var body: [String: Any] = ["name": name, "address": address, "address_private": "10.0.0.9"]
    body.merge(extra) { _, new in new }
    let created = try await broker.client.json("POST", "/v1/gateways", body, token: sid)
    let id = try #require(created.storedData["id"] as? Int, "\(created)")
    let enrolled = try await broker.client.json("POST", "/v1/gateways/\(id)/enrollment", token: sid)
    #expect(enrolled.status == 201, "\(enrolled)")
    let key = try ControlKey(text: try #require(enrolled.object["control_key"] as? String))
    return (id, key)
}

func registerBody(_ id: Int, controlURL: String = "http://127.0.0.1:1", rules: [[String: Any]] = [],
                  certificate: String? = nil) -> [String: Any] {
    var body: [String: Any] = ["gateway_id": id, "version": "0.1.0", "control_url": controlURL,
                               "port_range": ["first": 20001, "last": 22000], "rules": rules]
    if let certificate { body["control_certificate"] = certificate }
    return body
}

/// A rule as a gateway reports it at registration.
func reportedRule(_ id: String) -> [String: Any] {
    ["id": id, "push": ["protocol": "tcp", "method": 0, "target": "10.1.2.3:3389"], "port": 20001,
     "created": 1_800_000_000, "sessions": 0]
}

@Suite("Control plane: enrollment, registration, heartbeats", .offPool)
struct EnrollmentAndRegistrationTests {
    @Test("enrollment: 201 with a key shown once, a new call replaces it, GET never shows it, admin only")
    func enrollment() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let (id, key) = try await enrolledGateway(broker, sid: sid, name: "gw-1", address: "gw1.example.com")
            #expect(key.text.count == 43)

            let shown = try await broker.client.json("GET", "/v1/gateways/\(id)", token: sid)
            #expect(shown.status == 200)
            #expect(!shown.text.contains(key.text), "GET must never show the control key")
            #expect(shown.object["control_key"] == nil)
            #expect(!(try broker.snapshot()).isEmpty)

            // Registering with the first key works.
            let first = try await agentCall(broker, "/v1/gateway-agent/register", registerBody(id), gatewayID: id, key: key)
            #expect(first.reply.status == 200, "\(first.reply)")

            // A second enrollment replaces the key: the old one stops working.
            let again = try await broker.client.json("POST", "/v1/gateways/\(id)/enrollment", token: sid)
            #expect(again.status == 201)
            let newKey = try ControlKey(text: try #require(again.object["control_key"] as? String))
            #expect(newKey != key)
            let old = try await agentCall(broker, "/v1/gateway-agent/heartbeat",
                                          ["gateway_id": id, "sessions": 0, "rules": 0, "load": 0.1], gatewayID: id, key: key)
            #expect(old.reply.status == 401)
            #expect(old.reply.error.contains("signature does not verify"), "\(old.reply)")
            let fresh = try await agentCall(broker, "/v1/gateway-agent/heartbeat",
                                            ["gateway_id": id, "sessions": 0, "rules": 0, "load": 0.1], gatewayID: id, key: newKey)
            #expect(fresh.reply.status == 204, "\(fresh.reply)")

            try await expectRejected(broker, "POST", "/v1/gateways/999/enrollment", nil, token: sid, status: 404, mentions: "no gateway with id 999")
            try await expectRejected(broker, "POST", "/v1/gateways/x/enrollment", nil, token: sid, status: 400, mentions: "id")
            _ = try await broker.client.json("POST", "/v1/users", ["login": "alice", "password": "alice-pass"], token: sid)
            let alice = try await broker.login("alice", "alice-pass")
            try await expectRejected(broker, "POST", "/v1/gateways/\(id)/enrollment", nil, token: alice, status: 403, mentions: "admin")
            #expect(try await broker.client.json("POST", "/v1/gateways/\(id)/enrollment").status == 401)
        }
    }

    @Test("register and heartbeat with a real signature: online, version, control URL, keep")
    func registerAndHeartbeat() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let (id, key) = try await enrolledGateway(broker, sid: sid, name: "gw-1", address: "gw1.example.com")
            #expect(try await broker.client.json("GET", "/v1/gateways/\(id)", token: sid).object["online"] as? Bool == false)

            let call = try await agentCall(broker, "/v1/gateway-agent/register",
                                           registerBody(id, controlURL: "http://10.0.0.9:19010", rules: [reportedRule("abc")]),
                                           gatewayID: id, key: key)
            #expect(call.reply.status == 200, "\(call.reply)")
            let answer = try ControlJSON.decodeStrict(RegisterResponse.self, from: Array(call.reply.body),
                                                      allowed: ["heartbeat_interval_s", "offline_after_s", "keep"])
            #expect(answer.heartbeatIntervalSeconds == 10 && answer.offlineAfterSeconds == 30)
            #expect(answer.keep.isEmpty, "the broker has no rule 'abc'")

            let gateway = try await broker.store.gateway(id: Int64(id))
            #expect(gateway.online && gateway.version == "0.1.0" && gateway.controlURL == "http://10.0.0.9:19010")
            #expect(gateway.portRange == PortRange(first: 20001, last: 22000))
            #expect(try await broker.client.json("GET", "/v1/gateways/\(id)", token: sid).object["version"] as? String == "0.1.0")

            // Also under /rest/v1 (signed for that path).
            let beat = try await agentCall(broker, "/rest/v1/gateway-agent/heartbeat",
                                           ["gateway_id": id, "sessions": 3, "rules": 1, "load": 0.25], gatewayID: id, key: key)
            #expect(beat.reply.status == 204, "\(beat.reply)")
            let after = try await broker.store.gateway(id: Int64(id))
            #expect(after.load == 0.25 && after.activeSessions == 3 && after.online)
        }
    }

    @Test("bad, forged, expired, replayed, reflected or unenrolled signatures: 401 with the reason, nothing changed")
    func rejectedSignatures() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let (id, key) = try await enrolledGateway(broker, sid: sid, name: "gw-1", address: "gw1.example.com")
            let created = try await broker.client.json("POST", "/v1/gateways", ["name": "gw-2", "address": "gw2.example.com"], token: sid)
            let unenrolledID = try #require(created.storedData["id"] as? Int)
            let path = "/v1/gateway-agent/register"
            let body = registerBody(id)
            let now = Int64(broker.clock.now.timeIntervalSince1970)

            func expect401(_ reply: HTTPReply, _ mentions: String, sourceLocation: SourceLocation = #_sourceLocation) {
                #expect(reply.status == 401, "\(reply)", sourceLocation: sourceLocation)
                #expect(reply.error.contains(mentions), "\(reply.error) should mention \(mentions)", sourceLocation: sourceLocation)
                #expect(!reply.text.contains(key.text), sourceLocation: sourceLocation)
            }

            let before = try broker.snapshot()
            let data = try JSONSerialization.data(withJSONObject: body)
            let missing = try await broker.client.send("POST", path, body: data, headers: ["Content-Type": "application/json"])
            expect401(missing, "signed control request is required")
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: key, header: "Bearer abc").reply, "LEO-HMAC-SHA256")
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: key,
                                          header: "LEO-HMAC-SHA256 gw=1, ts=1, nonce=zz, sig=x").reply, "nonce")
            expect401(try await agentCall(broker, path, registerBody(unenrolledID), gatewayID: unenrolledID, key: key).reply,
                      "gateway \(unenrolledID) is not enrolled")
            expect401(try await agentCall(broker, path, registerBody(999), gatewayID: 999, key: key).reply, "gateway 999 is not enrolled")
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: ControlKey.generate()).reply, "signature does not verify")
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: key, now: now - 600).reply, "timestamp")
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: key, now: now + 600).reply, "timestamp")
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: key, direction: .brokerToGateway).reply,
                      "signature does not verify")
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: key,
                                          signedPath: "/v1/gateway-agent/heartbeat").reply, "signature does not verify")
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: key,
                                          signedBody: Data("{}".utf8)).reply, "signature does not verify")
            #expect(try broker.snapshot() == before, "a refused control call changed the database")

            // Replay: the same signed request twice; the second is refused and changes nothing.
            let first = try await agentCall(broker, path, body, gatewayID: id, key: key)
            #expect(first.reply.status == 200, "\(first.reply)")
            let afterFirst = try broker.snapshot()
            expect401(try await agentCall(broker, path, body, gatewayID: id, key: key, header: first.header).reply, "replay")
            #expect(try broker.snapshot() == afterFirst)

            // Signed correctly but a bad body: 400 naming the field, nothing changed.
            for (bad, mentions) in [
                (registerBody(id).merging(["colour": "blue"]) { $1 }, "colour: unknown field"),
                (registerBody(id).merging(["version": 7]) { $1 }, "version"),
                (registerBody(id).merging(["control_url": "ftp://x"]) { $1 }, "control_url"),
                (registerBody(id).merging(["port_range": ["first": 30000, "last": 20000]]) { $1 }, "port_range"),
                (registerBody(unenrolledID), "gateway_id"),
                (registerBody(id).filter { $0.key != "rules" }, "rules: required"),
            ] as [([String: Any], String)] {
                let reply = try await agentCall(broker, path, bad, gatewayID: id, key: key).reply
                #expect(reply.status == 400, "\(bad): \(reply)")
                #expect(reply.error.contains(mentions), "\(reply.error) should mention \(mentions)")
            }
            let beat = try await agentCall(broker, "/v1/gateway-agent/heartbeat",
                                           ["gateway_id": id, "sessions": -1, "rules": 0, "load": 0.1], gatewayID: id, key: key).reply
            #expect(beat.status == 400 && beat.error.contains("sessions"), "\(beat)")
            #expect(try broker.snapshot() == afterFirst)
        }
    }

    @Test("a gateway without heartbeats goes offline, and comes back online at its next heartbeat")
    func offlineAndBack() async throws {
        try await TestBroker.with(offlineAfter: 1) { broker in
            let sid = try await broker.login()
            let (id, key) = try await enrolledGateway(broker, sid: sid, name: "gw-1", address: "gw1.example.com")
            let registered = try await agentCall(broker, "/v1/gateway-agent/register", registerBody(id), gatewayID: id, key: key)
            #expect(registered.reply.status == 200)
            #expect(registered.reply.object["offline_after_s"] as? Int == 1)
            let wentOffline = try await eventuallyAsync {
                try await broker.client.json("GET", "/v1/gateways/\(id)", token: sid).object["online"] as? Bool == false
            }
            #expect(wentOffline, "the broker never marked the silent gateway offline")
            let beat = try await agentCall(broker, "/v1/gateway-agent/heartbeat",
                                           ["gateway_id": id, "sessions": 0, "rules": 0, "load": 0], gatewayID: id, key: key)
            #expect(beat.reply.status == 204)
            // The heartbeat itself marks it online (before any sweep could undo it).
            #expect(try await broker.store.gateway(id: Int64(id)).online)
        }
    }
}
