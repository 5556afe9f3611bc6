import BrokerCore
import Foundation
import Testing
import TestSupport

/// Sends a call that must be refused, and checks the status, that the error
/// names `mentions`, and that the database did not change.
func expectRejected(_ broker: TestBroker, _ method: String, _ path: String, _ body: Any?, token: String,
                    status: Int, mentions: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let before = try broker.snapshot()
    let reply = try await broker.client.json(method, path, body, token: token)
    #expect(reply.status == status, "\(method) \(path) \(String(describing: body)): \(reply)", sourceLocation: sourceLocation)
    #expect(reply.error.contains(mentions), "error \(reply.error.debugDescription) should mention \(mentions)", sourceLocation: sourceLocation)
    #expect(reply.headers["content-type"]?.hasPrefix("application/json") == true, sourceLocation: sourceLocation)
    #expect(try broker.snapshot() == before, "a rejected call changed the database", sourceLocation: sourceLocation)
}

@Suite("REST API: gateways (Leostream-compatible)", .offPool)
struct GatewayAPITests {
    @Test("create, list, get, update, delete, with every status code", arguments: ["/v1", "/rest/v1"])
    func crud(prefix: String) async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let client = broker.client
            #expect(try await client.json("GET", "\(prefix)/gateways", token: sid).array.isEmpty)

            let created = try await client.json("POST", "\(prefix)/gateways", [
                "name": "gw-east-1", "address": "gw1.example.com", "address_private": "10.0.0.1",
                "use_src_ip": 1, "forward_to": "broker.example.com", "signature": "sig-1", "notes": "rack 4",
            ], token: sid)
            #expect(created.status == 201, "\(created)")
            #expect(created.object["warnings"] == nil && created.object["extra_fields"] == nil)
            let stored = created.storedData
            let id = try #require(stored["id"] as? Int)
            #expect(stored["name"] as? String == "gw-east-1")
            #expect(stored["address"] as? String == "gw1.example.com")
            #expect(stored["address_private"] as? String == "10.0.0.1")
            #expect(stored["use_src_ip"] as? Int == 1)
            #expect(stored["forward_to"] as? String == "broker.example.com")
            #expect(stored["signature"] as? String == "sig-1")
            #expect(stored["notes"] as? String == "rack 4")
            #expect(stored["online"] as? Bool == false)
            #expect(stored["version"] as? String == "")
            #expect(stored["load_balancer_id"] is NSNull)
            #expect((stored["created"] as? String)?.hasSuffix("Z") == true)
            #expect(stored["updated"] as? String == stored["created"] as? String)

            let minimal = try await client.json("POST", "\(prefix)/gateways", ["name": "gw-2", "address": "198.51.100.7"], token: sid)
            #expect(minimal.status == 201)
            #expect(minimal.storedData["use_src_ip"] as? Int == 0, "use_src_ip defaults to 0")

            let list = try await client.json("GET", "\(prefix)/gateways", token: sid)
            #expect(list.status == 200)
            #expect(list.array.map { $0["name"] as? String } == ["gw-east-1", "gw-2"])
            #expect(list.array.allSatisfy { Set($0.keys) == ["id", "name"] })

            let one = try await client.json("GET", "\(prefix)/gateways/\(id)", token: sid)
            #expect(one.status == 200)
            #expect(one.object["signature"] as? String == "sig-1")

            broker.clock.advance(5)
            let updated = try await client.json("PUT", "\(prefix)/gateways/\(id)", ["notes": "moved", "use_src_ip": 2], token: sid)
            #expect(updated.status == 200, "\(updated)")
            #expect(updated.storedData["notes"] as? String == "moved")
            #expect(updated.storedData["use_src_ip"] as? Int == 2)
            #expect(updated.storedData["name"] as? String == "gw-east-1", "fields not sent stay")
            #expect(updated.storedData["updated"] as? String != updated.storedData["created"] as? String)
            let cleared = try await client.json("PUT", "\(prefix)/gateways/\(id)", ["address_private": NSNull()], token: sid)
            #expect(cleared.storedData["address_private"] as? String == "")

            #expect(try await client.json("GET", "\(prefix)/gateways/999", token: sid).status == 404)
            try await expectRejected(broker, "PUT", "\(prefix)/gateways/999", ["notes": "x"], token: sid, status: 404, mentions: "no gateway with id 999")
            try await expectRejected(broker, "DELETE", "\(prefix)/gateways/999", nil, token: sid, status: 404, mentions: "no gateway with id 999")
            try await expectRejected(broker, "GET", "\(prefix)/gateways/abc", nil, token: sid, status: 400, mentions: "id: must be a positive integer")
            try await expectRejected(broker, "DELETE", "\(prefix)/gateways/0", nil, token: sid, status: 400, mentions: "id")

            let deleted = try await client.json("DELETE", "\(prefix)/gateways/\(id)", token: sid)
            #expect(deleted.status == 204)
            #expect(deleted.body.isEmpty)
            #expect(try await client.json("GET", "\(prefix)/gateways/\(id)", token: sid).status == 404)
            #expect(try await client.json("DELETE", "\(prefix)/gateways/\(id)", token: sid).status == 404)
            #expect(try await client.json("GET", "\(prefix)/gateways", token: sid).array.count == 1)
        }
    }

    @Test("unknown fields are ignored and listed in extra_fields; read-only ones in warnings; nothing else changes")
    func extraFieldsAndWarnings() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let created = try await broker.client.json("POST", "/v1/gateways", [
                "name": "gw", "address": "gw.example.com",
                "online": true, "version": "9.9", "id": 77, "created": "2001-01-01T00:00:00Z",
                "colour": "blue", "x_custom": [1, 2],
            ], token: sid)
            #expect(created.status == 201, "\(created)")
            #expect(created.object["extra_fields"] as? [String] == ["colour", "x_custom"])
            let warnings = created.object["warnings"] as? [String] ?? []
            #expect(warnings.count == 4)
            for field in ["online", "version", "id", "created"] {
                #expect(warnings.contains { $0.hasPrefix("\(field) is read-only") }, "warnings: \(warnings)")
            }
            let stored = created.storedData
            #expect(stored["online"] as? Bool == false)
            #expect(stored["version"] as? String == "")
            #expect(stored["id"] as? Int != 77)
            #expect(stored["colour"] == nil)
            let id = try #require(stored["id"] as? Int)

            // A PUT of only unknown and read-only fields changes nothing at all.
            broker.clock.advance(5)
            let before = try broker.snapshot()
            let put = try await broker.client.json("PUT", "/v1/gateways/\(id)", ["online": true, "colour": "red"], token: sid)
            #expect(put.status == 200, "\(put)")
            #expect(put.object["extra_fields"] as? [String] == ["colour"])
            #expect((put.object["warnings"] as? [String])?.first?.hasPrefix("online is read-only") == true)
            #expect(try broker.snapshot() == before)
        }
    }

    @Test("bad gateway input: 400 naming the field, database unchanged")
    func badInput() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let cluster = try await broker.client.json("POST", "/v1/gateway-clusters", ["name": "c", "load_balance_via": "E"], token: sid)
            let clusterID = try #require(cluster.storedData["id"] as? Int)
            let base: [String: Any] = ["name": "gw", "address": "gw.example.com"]
            func with(_ key: String, _ value: Any) -> [String: Any] {
                var body = base
                body[key] = value
                return body
            }
            let cases: [(Any, String)] = [
                ("{\"name\": \"gw\", \"address\": ", "malformed JSON"),
                ("\"just a string\"", "must be a JSON object"),
                ([["name": "gw"]], "must be a JSON object"),
                (["address": "gw.example.com"], "name: is required"),
                (["name": "gw"], "address: is required"),
                (with("name", ""), "name: is required"),
                (with("name", String(repeating: "n", count: 101)), "name: must be 1 to 100 characters, got 101"),
                (with("name", "tab\there"), "name: must not contain control character"),
                (with("name", 5), "name: must be a string, got a number"),
                (with("name", NSNull()), "name: must be a string, got null"),
                (with("address", String(repeating: "a", count: 256)), "address: must be at most 255 characters, got 256"),
                (with("address", "not a host!"), "address: must be an IP address or a DNS name"),
                (with("address_private", "bad host"), "address_private: must be an IP address or a DNS name"),
                (with("use_src_ip", 3), "use_src_ip: must be 0"),
                (with("use_src_ip", -1), "use_src_ip: must be 0"),
                (with("use_src_ip", "1"), "use_src_ip: must be an integer, got a string"),
                (with("use_src_ip", 1.5), "use_src_ip: must be an integer, got a number"),
                (with("use_src_ip", true), "use_src_ip: must be an integer, got true or false"),
                (with("load_balancer_id", "1"), "load_balancer_id: must be an integer id or null, got a string"),
                (with("load_balancer_id", clusterID + 100), "load_balancer_id: no gateway cluster with id \(clusterID + 100)"),
                (with("load_balancer_id", -4), "load_balancer_id: must be a positive id"),
                (with("signature", String(repeating: "s", count: 101)), "signature: must be at most 100 characters, got 101"),
                (with("forward_to", "two words"), "forward_to: must not contain blanks"),
                (with("notes", String(repeating: "x", count: 4096)), "notes: must be at most 4095 characters, got 4096"),
                (with("notes", ["a"]), "notes: must be a string, got an array"),
            ]
            for (body, mentions) in cases {
                try await expectRejected(broker, "POST", "/v1/gateways", body, token: sid, status: 400, mentions: mentions)
            }

            // The same checks on update.
            let created = try await broker.client.json("POST", "/v1/gateways", base, token: sid)
            let id = try #require(created.storedData["id"] as? Int)
            try await expectRejected(broker, "PUT", "/v1/gateways/\(id)", ["use_src_ip": 7], token: sid, status: 400, mentions: "use_src_ip")
            try await expectRejected(broker, "PUT", "/v1/gateways/\(id)", ["name": ""], token: sid, status: 400, mentions: "name: is required")
            try await expectRejected(broker, "PUT", "/v1/gateways/\(id)", ["name": "ok", "use_src_ip": 9], token: sid,
                                     status: 400, mentions: "use_src_ip")
            try await expectRejected(broker, "PUT", "/v1/gateways/\(id)", "{bad json", token: sid, status: 400, mentions: "malformed JSON")
        }
    }

    @Test("duplicate name or address: 409 (names compare without case); database unchanged")
    func conflicts() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let first = try await broker.client.json("POST", "/v1/gateways", ["name": "gw-a", "address": "a.example.com"], token: sid)
            #expect(first.status == 201)
            let second = try await broker.client.json("POST", "/v1/gateways", ["name": "gw-b", "address": "b.example.com"], token: sid)
            let secondID = try #require(second.storedData["id"] as? Int)
            try await expectRejected(broker, "POST", "/v1/gateways", ["name": "GW-A", "address": "c.example.com"], token: sid,
                                     status: 409, mentions: "name: a gateway named 'GW-A' already exists")
            try await expectRejected(broker, "POST", "/v1/gateways", ["name": "gw-c", "address": "A.example.com"], token: sid,
                                     status: 409, mentions: "address: a gateway with address")
            try await expectRejected(broker, "PUT", "/v1/gateways/\(secondID)", ["name": "gw-a"], token: sid,
                                     status: 409, mentions: "name:")
        }
    }

    @Test("deleting a gateway that a desktop uses: 409, nothing deleted")
    func deleteInUse() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let gateway = try await broker.client.json("POST", "/v1/gateways", ["name": "gw", "address": "gw.example.com"], token: sid)
            let id = try #require(gateway.storedData["id"] as? Int)
            let desktop = try await broker.client.json("POST", "/v1/desktops", [
                "name": "pc-1", "address": "10.1.0.5", "protocols": [["name": "rdp", "port": 3389]], "gateway_id": id,
            ], token: sid)
            #expect(desktop.status == 201, "\(desktop)")
            try await expectRejected(broker, "DELETE", "/v1/gateways/\(id)", nil, token: sid, status: 409, mentions: "in use")
        }
    }

    @Test("online and version come from the control plane and show through the API")
    func controlPlaneState() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let created = try await broker.client.json("POST", "/v1/gateways", ["name": "gw", "address": "gw.example.com"], token: sid)
            let id = try #require(created.storedData["id"] as? Int)
            try await broker.store.recordGatewayState(id: Int64(id), online: true, version: "2.0.1", heartbeat: Date())
            let one = try await broker.client.json("GET", "/v1/gateways/\(id)", token: sid)
            #expect(one.object["online"] as? Bool == true)
            #expect(one.object["version"] as? String == "2.0.1")
            let health = try await broker.client.json("GET", "/v1/system/health", token: sid)
            let gateways = health.object["gateways"] as? [String: Any] ?? [:]
            #expect(gateways["online"] as? Int == 1 && gateways["registered"] as? Int == 1)
        }
    }
}

@Suite("REST API: gateway clusters (Leostream-compatible)", .offPool)
struct GatewayClusterAPITests {
    @Test("create, list, get, update, delete", arguments: ["/v1", "/rest/v1"])
    func crud(prefix: String) async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let client = broker.client
            let created = try await client.json("POST", "\(prefix)/gateway-clusters", [
                "name": "East", "address": "east.example.com", "load_balance_via": "P", "use_src_ip": 2, "notes": "n",
            ], token: sid)
            #expect(created.status == 201, "\(created)")
            let stored = created.storedData
            let id = try #require(stored["id"] as? Int)
            #expect(stored["load_balance_via"] as? String == "P")
            #expect(stored["use_src_ip"] as? Int == 2)
            #expect(stored["address"] as? String == "east.example.com")
            #expect(Set(stored.keys) == ["id", "name", "address", "load_balance_via", "use_src_ip", "notes", "created", "updated"])

            let list = try await client.json("GET", "\(prefix)/gateway-clusters", token: sid)
            #expect(list.array.count == 1 && list.array[0]["name"] as? String == "East")
            #expect(try await client.json("GET", "\(prefix)/gateway-clusters/\(id)", token: sid).object["name"] as? String == "East")

            let updated = try await client.json("PUT", "\(prefix)/gateway-clusters/\(id)", ["load_balance_via": "L"], token: sid)
            #expect(updated.status == 200)
            #expect(updated.storedData["load_balance_via"] as? String == "L")

            // In use by a gateway: 409; free again once the gateway leaves the cluster.
            let gateway = try await client.json("POST", "\(prefix)/gateways", ["name": "gw", "address": "gw.example.com", "load_balancer_id": id], token: sid)
            #expect(gateway.status == 201)
            #expect(gateway.storedData["load_balancer_id"] as? Int == id)
            let gatewayID = try #require(gateway.storedData["id"] as? Int)
            try await expectRejected(broker, "DELETE", "\(prefix)/gateway-clusters/\(id)", nil, token: sid, status: 409, mentions: "in use")
            let left = try await client.json("PUT", "\(prefix)/gateways/\(gatewayID)", ["load_balancer_id": 0], token: sid)
            #expect(left.storedData["load_balancer_id"] is NSNull)

            #expect(try await client.json("DELETE", "\(prefix)/gateway-clusters/\(id)", token: sid).status == 204)
            #expect(try await client.json("GET", "\(prefix)/gateway-clusters/\(id)", token: sid).status == 404)
            #expect(try await client.json("DELETE", "\(prefix)/gateway-clusters/\(id)", token: sid).status == 404)
            try await expectRejected(broker, "PUT", "\(prefix)/gateway-clusters/\(id)", ["name": "x"], token: sid,
                                     status: 404, mentions: "no gateway cluster with id \(id)")
        }
    }

    @Test("bad cluster input: 400 naming the field; duplicates 409; unknown fields listed")
    func badInput() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let cases: [(Any, String)] = [
                (["name": "c"], "load_balance_via: is required"),
                (["load_balance_via": "E"], "name: is required"),
                (["name": "c", "load_balance_via": "X"], "load_balance_via: must be E (all gateways), P (the login gateway) or L (fewest connections), got 'X'"),
                (["name": "c", "load_balance_via": "e"], "load_balance_via: must be E"),
                (["name": "c", "load_balance_via": 1], "load_balance_via: must be a string, got a number"),
                (["name": "c", "load_balance_via": "E", "use_src_ip": 5], "use_src_ip: must be 0"),
                (["name": "c", "load_balance_via": "E", "use_src_ip": "0"], "use_src_ip: must be an integer"),
                (["name": String(repeating: "c", count: 101), "load_balance_via": "E"], "name: must be 1 to 100 characters"),
                (["name": "c", "load_balance_via": "E", "address": "bad address"], "address: must be an IP address or a DNS name"),
                ("{\"name\": ", "malformed JSON"),
            ]
            for (body, mentions) in cases {
                try await expectRejected(broker, "POST", "/v1/gateway-clusters", body, token: sid, status: 400, mentions: mentions)
            }
            let created = try await broker.client.json("POST", "/v1/gateway-clusters",
                                                       ["name": "West", "load_balance_via": "E", "shard": 3, "updated": "now"], token: sid)
            #expect(created.status == 201)
            #expect(created.object["extra_fields"] as? [String] == ["shard"])
            #expect((created.object["warnings"] as? [String])?.count == 1)
            try await expectRejected(broker, "POST", "/v1/gateway-clusters", ["name": "west", "load_balance_via": "L"], token: sid,
                                     status: 409, mentions: "name: a gateway cluster named 'west' already exists")
        }
    }
}
