import BrokerCore
import Foundation
import PCoIPBrokerProtocol
import Testing
import TestSupport

/// A PCoIP client's conversation with the broker core over real HTTP.
struct PCoIPConversation {
    let broker: TestBroker
    var cookie: String?

    /// Posts `inner` under `pcoip-client` (or `raw` as the whole body); keeps the cookie the broker sets.
    mutating func send(_ inner: String? = nil, raw: String? = nil) async throws -> (reply: HTTPReply, answer: BrokerAnswerView) {
        let body = raw ?? "<?xml version=\"1.0\"?><pcoip-client version=\"2.1\">\(inner ?? "")</pcoip-client>"
        var headers = ["Content-Type": "application/xml"]
        if let cookie { headers["Cookie"] = "JSESSIONID=\(cookie)" }
        let reply = try await broker.client.send("POST", "/pcoip-broker/xml", body: Data(body.utf8), headers: headers)
        if let set = reply.headers["set-cookie"], set.hasPrefix("JSESSIONID=") {
            let value = String(set.dropFirst("JSESSIONID=".count).prefix { $0 != ";" })
            cookie = value.isEmpty ? nil : value
        }
        let root = try BrokerXML.parse(Array(reply.body))
        return (reply, try BrokerAnswerView(root))
    }

    mutating func login(_ user: String, _ password: String) async throws -> BrokerAnswerView {
        try await send("<authenticate method=\"password\"><username>\(user)</username><password>\(password)</password></authenticate>").answer
    }
}

@Suite("The broker core speaks the PCoIP broker protocol", .offPool)
struct PCoIPEndpointTests {
    /// alice is entitled to desk-pcoip; bob to nothing; desk-open names nobody (open to all); desk-rdp has no PCoIP agent.
    static func populate(_ broker: TestBroker) async throws -> (desk: Int, open: Int, alice: Int) {
        let sid = try await broker.login()
        let alice = try #require(try await broker.client.json("POST", "/v1/users", ["login": "alice", "password": "alice-pass"], token: sid)
                                    .storedData["id"] as? Int)
        _ = try await broker.client.json("POST", "/v1/users", ["login": "bob", "password": "bob-pass"], token: sid)
        let desk = try await broker.client.json("POST", "/v1/desktops", [
            "name": "desk-pcoip", "address": "10.1.2.3", "users": [alice],
            "protocols": [["name": "pcoip", "port": 4172, "transport": "both"]],
        ] as [String: Any], token: sid)
        #expect(desk.status == 201, "\(desk)")
        #expect((desk.storedData["users"] as? [Int]) == [alice])
        let open = try await broker.client.json("POST", "/v1/desktops", [
            "name": "desk-open", "address": "agent.example.com", "protocols": [["name": "pcoip", "port": 4172]],
        ] as [String: Any], token: sid)
        _ = try await broker.client.json("POST", "/v1/desktops", [
            "name": "desk-rdp", "address": "10.1.2.4", "protocols": [["name": "rdp", "port": 3389]],
        ] as [String: Any], token: sid)
        return (try #require(desk.storedData["id"] as? Int), try #require(open.storedData["id"] as? Int), alice)
    }

    @Test("hello, authenticate (JSESSIONID set with Set-Cookie), list by entitlement, allocate, bye; chunked answers")
    func conversation() async throws {
        try await TestBroker.with { broker in
            let (desk, open, _) = try await Self.populate(broker)
            var alice = PCoIPConversation(broker: broker)
            let (helloReply, hello) = try await alice.send("<hello><client-info><product-name>test</product-name></client-info></hello>")
            #expect(hello.message.name == "hello-resp" && helloReply.status == 200)
            #expect(helloReply.head.contains("Transfer-Encoding: chunked") || helloReply.head.contains("transfer-encoding: chunked"),
                    "\(helloReply.head)")
            #expect(helloReply.headers["content-type"]?.hasPrefix("application/xml") == true)
            #expect(hello.message.child("next-authentication")?.child("authentication-methods")?.childText("method") == "AUTHENTICATE_VIA_PASSWORD")

            let (authReply, auth) = try await alice.send("<authenticate method=\"password\"><username>alice</username><password>alice-pass</password><domain>CORP</domain></authenticate>")
            #expect(auth.resultID == "AUTH_SUCCESSFUL_AND_COMPLETE", "\(auth)")
            #expect(authReply.head.contains("\r\nSet-Cookie: JSESSIONID="), "the header must be spelled Set-Cookie: \(authReply.head)")
            #expect(alice.cookie != nil)

            let list = try await alice.send("<get-resource-list/>").answer
            #expect(list.resultID == "LIST_SUCCESSFUL")
            let names = list.message.children("resource").compactMap { $0.childText("resource-name") }
            #expect(Set(names) == ["desk-pcoip", "desk-open"], "an entitled desktop and an open one, never the RDP-only one")

            let allocated = try await alice.send("<allocate-resource><resource-id>\(desk)</resource-id></allocate-resource>").answer
            #expect(allocated.resultID == "ALLOC_SUCCESSFUL")
            let target = try allocated.target()
            #expect(target.ipAddress == "10.1.2.3" && target.port == 4172 && target.sni == "desktop-\(desk).pcoip")
            #expect(UInt64(target.sessionID) != nil && target.connectTag.count >= 64)
            let named = try await alice.send("<allocate-resource><resource-id>\(open)</resource-id></allocate-resource>").answer
            #expect(try named.target().sni == "agent.example.com", "a desktop with a DNS name uses it as the SNI")
            let again = try await alice.send("<allocate-resource><resource-id>\(desk)</resource-id></allocate-resource>").answer
            #expect(try again.target().sessionID != target.sessionID, "each allocation is its own session")

            let kept = alice.cookie
            let bye = try await alice.send("<bye/>")
            #expect(bye.answer.message.name == "bye-resp" && alice.cookie == nil, "bye clears the cookie")
            alice.cookie = kept
            let after = try await alice.send("<get-resource-list/>").answer
            #expect(after.resultID == "LIST_FAILED_NOT_AUTHENTICATED", "bye ends the broker session")
        }
    }

    @Test("failures are answers of the protocol: wrong password, unknown user, not entitled, no session, ended session, malformed")
    func failures() async throws {
        try await TestBroker.with { broker in
            let (desk, _, alice) = try await Self.populate(broker)
            var client = PCoIPConversation(broker: broker)
            #expect(try await client.login("alice", "wrong").resultID == "AUTH_FAILED_UNKNOWN_USERNAME_OR_PASSWORD")
            #expect(try await client.login("nobody", "whatever").resultID == "AUTH_FAILED_UNKNOWN_USERNAME_OR_PASSWORD")
            #expect(client.cookie == nil)
            #expect(try await client.send("<get-resource-list/>").answer.resultID == "LIST_FAILED_NOT_AUTHENTICATED")
            #expect(try await client.send("<allocate-resource><resource-id>\(desk)</resource-id></allocate-resource>").answer.resultID
                    == "ALLOC_FAILED_NOT_AUTHENTICATED")
            var bob = PCoIPConversation(broker: broker)
            #expect(try await bob.login("bob", "bob-pass").resultID == "AUTH_SUCCESSFUL_AND_COMPLETE")
            let refused = try await bob.send("<allocate-resource><resource-id>\(desk)</resource-id></allocate-resource>").answer
            #expect(refused.resultID == "ALLOC_FAILED_UNKNOWN_RESOURCE", "bob is not entitled to desk-pcoip")
            #expect(try await bob.send("<allocate-resource><resource-id>999999</resource-id></allocate-resource>").answer.resultID
                    == "ALLOC_FAILED_UNKNOWN_RESOURCE")
            #expect(try await bob.send("<allocate-resource><resource-id>x'; DROP</resource-id></allocate-resource>").answer.resultID
                    == "ALLOC_FAILED_UNKNOWN_RESOURCE")
            // A session that ends under the client: a new password ends the user's sessions.
            var alice1 = PCoIPConversation(broker: broker)
            #expect(try await alice1.login("alice", "alice-pass").resultID == "AUTH_SUCCESSFUL_AND_COMPLETE")
            let sid = try await broker.login()
            #expect(try await broker.client.json("PUT", "/v1/users/\(alice)", ["password": "new-pass"], token: sid).status == 200)
            let ended = try await alice1.send("<get-resource-list/>").answer
            #expect(ended.resultID == "LIST_FAILED_NOT_AUTHENTICATED" && ended.resultText?.contains("expired or ended") == true)
            // Session expiry by the clock.
            var alice2 = PCoIPConversation(broker: broker)
            #expect(try await alice2.login("alice", "new-pass").resultID == "AUTH_SUCCESSFUL_AND_COMPLETE")
            broker.clock.advance(TestBroker.sessionLifetime + 1)
            #expect(try await alice2.send("<get-resource-list/>").answer.resultID == "LIST_FAILED_NOT_AUTHENTICATED")
            // Malformed bodies.
            for raw in ["not xml", "<!DOCTYPE a><pcoip-client version=\"2.1\"><hello/></pcoip-client>",
                        "<pcoip-client version=\"2.1\"><nonsense/></pcoip-client>", String(repeating: "<a>", count: 30_000)] {
                let answer = try await client.send(raw: raw).answer
                #expect(answer.message.name == "error-resp" && answer.resultID == "ERROR_MALFORMED_REQUEST", "\(raw.prefix(40))")
            }
        }
    }

    @Test("entitlements: the REST connect call goes by them too; unknown users are refused naming the field")
    func entitlements() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let bad = try await broker.client.json("POST", "/v1/desktops", [
                "name": "d", "address": "10.0.0.1", "protocols": [["name": "rdp", "port": 3389]], "users": [424242],
            ] as [String: Any], token: sid)
            #expect(bad.status == 400 && bad.object["field"] as? String == "users", "\(bad)")
            let wrongType = try await broker.client.json("POST", "/v1/desktops", [
                "name": "d", "address": "10.0.0.1", "protocols": [["name": "rdp", "port": 3389]], "users": ["alice"],
            ] as [String: Any], token: sid)
            #expect(wrongType.status == 400 && (wrongType.object["field"] as? String)?.hasPrefix("users") == true, "\(wrongType)")
            let (desk, _, _) = try await Self.populate(broker)
            let bob = try await broker.login("bob", "bob-pass")
            let connect = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desk, "protocol": "pcoip"], token: bob)
            #expect(connect.status == 403 && connect.error.contains("not entitled"), "\(connect)")
        }
    }
}
