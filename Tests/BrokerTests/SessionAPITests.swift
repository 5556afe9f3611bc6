import BrokerCore
import Foundation
import Testing
import TestSupport

@Suite("REST API: sessions and authorization", .offPool)
struct SessionAPITests {
    @Test("login with a JSON body gives a 256-bit sid that works as a bearer; only its hash is stored")
    func loginJSON() async throws {
        try await TestBroker.with { broker in
            let reply = try await broker.client.json("POST", "/v1/session/login", ["user_login": "admin", "password": TestBroker.adminPassword])
            #expect(reply.status == 200, "\(reply)")
            let sid = try #require(reply.object["sid"] as? String)
            #expect(Secrets.looksLikeToken(sid))
            #expect(reply.object.keys.sorted() == ["sid"])
            let list = try await broker.client.json("GET", "/v1/gateways", token: sid)
            #expect(list.status == 200)
            let snapshot = try broker.snapshot()
            #expect(!snapshot.contains(sid), "the token itself must never be stored")
            #expect(snapshot.contains(Secrets.sha256Hex(sid)))
            #expect(!snapshot.contains(TestBroker.adminPassword))
        }
    }

    @Test("login with a form body, under /rest/v1 too, with an optional domain")
    func loginFormAndRestPrefix() async throws {
        try await TestBroker.with { broker in
            let form = "user_login=admin&password=\(TestBroker.adminPassword)&domain=corp"
            let reply = try await broker.client.send("POST", "/rest/v1/session/login", body: Data(form.utf8),
                                                     headers: ["Content-Type": "application/x-www-form-urlencoded"])
            #expect(reply.status == 200, "\(reply)")
            let sid = try #require(reply.object["sid"] as? String)
            #expect(try await broker.client.json("GET", "/rest/v1/gateway-clusters", token: sid).status == 200)
            // A percent-escaped password.
            let escaped = try await broker.client.send("POST", "/v1/session/login",
                                                       body: Data("user_login=admin&password=admin%2Dsecret".utf8),
                                                       headers: ["Content-Type": "application/x-www-form-urlencoded"])
            #expect(escaped.status == 200, "\(escaped)")
        }
    }

    @Test("wrong credentials: 401 with the same answer for an unknown user; nothing stored")
    func wrongCredentials() async throws {
        try await TestBroker.with { broker in
            let before = try broker.snapshot()
            let wrong = try await broker.client.json("POST", "/v1/session/login", ["user_login": "admin", "password": "not-it"])
            #expect(wrong.status == 401)
            #expect(wrong.error == "wrong user_login or password")
            #expect(wrong.headers["www-authenticate"]?.hasPrefix("Bearer") == true)
            let unknown = try await broker.client.json("POST", "/v1/session/login", ["user_login": "nobody", "password": "whatever"])
            #expect(unknown.status == 401)
            #expect(unknown.error == wrong.error)
            #expect(try broker.snapshot() == before)
        }
    }

    @Test("bad login bodies: 400 naming the field, and no session made", arguments: [
        ("{\"user_login\": \"admin\", ", "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("{\"password\": \"admin-secret\"}", "user_login: is required"),
        ("{\"user_login\": \"admin\"}", "password: is required"),
        ("{\"user_login\": \"\(String(repeating: "u", count: 65))\", \"password\": \"admin-secret\"}", "user_login: must be 1 to 64 characters, got 65"),
        ("{\"user_login\": \"admin\", \"password\": \"ab\"}", "password: must be 3 to 100 characters, got 2"),
        ("{\"user_login\": \"admin\", \"password\": \"\(String(repeating: "p", count: 101))\"}", "password: must be 3 to 100 characters, got 101"),
        ("{\"user_login\": \"admin\", \"password\": 12345}", "password: must be a string, got a number"),
        ("{\"user_login\": [\"admin\"], \"password\": \"admin-secret\"}", "user_login: must be a string, got an array"),
        ("{\"user_login\": \"admin\", \"password\": \"admin-secret\", \"domain\": 7}", "domain: must be a string, got a number"),
    ])
    func badLoginBodies(body: String, expected: String) async throws {
        try await TestBroker.with { broker in
            let before = try broker.snapshot()
            let reply = try await broker.client.json("POST", "/v1/session/login", body)
            #expect(reply.status == 400, "\(reply)")
            #expect(reply.error.contains(expected), "\(reply.error)")
            #expect(try broker.snapshot() == before)
        }
    }

    @Test("a disabled user gets 403 at login")
    func disabledUser() async throws {
        try await TestBroker.with { broker in
            let admin = try await broker.login()
            let created = try await broker.client.json("POST", "/v1/users", ["login": "carol", "password": "carol-pass", "enabled": false], token: admin)
            #expect(created.status == 201, "\(created)")
            let reply = try await broker.client.json("POST", "/v1/session/login", ["user_login": "carol", "password": "carol-pass"])
            #expect(reply.status == 403, "\(reply)")
            #expect(reply.error.contains("disabled"))
        }
    }

    @Test("bearer checks: missing, malformed, forged, expired, logged out → 401")
    func bearerChecks() async throws {
        try await TestBroker.with { broker in
            let missing = try await broker.client.json("GET", "/v1/gateways")
            #expect(missing.status == 401)
            #expect(missing.error.contains("Authorization"))
            #expect(missing.headers["www-authenticate"] != nil)

            let basic = try await broker.client.json("GET", "/v1/gateways", headers: ["Authorization": "Basic YWRtaW46eA=="])
            #expect(basic.status == 401)
            let malformed = try await broker.client.json("GET", "/v1/gateways", token: "not a token")
            #expect(malformed.status == 401)
            let forged = try await broker.client.json("GET", "/v1/gateways", token: Secrets.token())
            #expect(forged.status == 401)
            #expect(forged.error.contains("unknown or has expired"))

            let sid = try await broker.login()
            #expect(try await broker.client.json("GET", "/v1/gateways", token: sid).status == 200)
            // A sid with one character changed is another (unknown) sid.
            let flipped = String(sid.dropLast()) + (sid.last == "A" ? "B" : "A")
            #expect(try await broker.client.json("GET", "/v1/gateways", token: flipped).status == 401)

            broker.clock.advance(TestBroker.sessionLifetime + 1)
            let expired = try await broker.client.json("GET", "/v1/gateways", token: sid)
            #expect(expired.status == 401, "\(expired)")

            let fresh = try await broker.login()
            let logout = try await broker.client.json("POST", "/v1/session/logout", token: fresh)
            #expect(logout.status == 200)
            #expect(try await broker.client.json("GET", "/v1/gateways", token: fresh).status == 401)
            #expect(try await broker.client.json("POST", "/v1/session/logout", token: fresh).status == 401)
        }
    }

    @Test("a user without the admin role: 403 on administration, 200 on health and logout")
    func nonAdminForbidden() async throws {
        try await TestBroker.with { broker in
            let admin = try await broker.login()
            #expect(try await broker.client.json("POST", "/v1/users", ["login": "dave", "password": "dave-pass"], token: admin).status == 201)
            let sid = try await broker.login("dave", "dave-pass")
            let before = try broker.snapshot()
            for (method, path) in [("GET", "/v1/gateways"), ("GET", "/v1/gateway-clusters"), ("GET", "/v1/desktops"),
                                   ("GET", "/v1/users"), ("GET", "/rest/v1/gateways/1"), ("DELETE", "/v1/users/1")] {
                let reply = try await broker.client.json(method, path, token: sid)
                #expect(reply.status == 403, "\(method) \(path): \(reply)")
                #expect(reply.error.contains("needs an admin"))
            }
            let create = try await broker.client.json("POST", "/v1/gateways", ["name": "gw", "address": "gw.example.com"], token: sid)
            #expect(create.status == 403)
            #expect(try broker.snapshot() == before)
            #expect(try await broker.client.json("GET", "/v1/system/health", token: sid).status == 200)
            #expect(try await broker.client.json("POST", "/v1/session/logout", token: sid).status == 200)
        }
    }

    @Test("unknown calls: 404 with a JSON error")
    func unknownCall() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let reply = try await broker.client.json("GET", "/v1/no-such-thing", token: sid)
            #expect(reply.status == 404)
            #expect(reply.error.contains("/v1/no-such-thing"))
            let outside = try await broker.client.json("GET", "/v2/gateways")
            #expect(outside.status == 404)
            #expect(!outside.error.isEmpty)
        }
    }
}
