import BrokerCore
import Foundation
import GRDB
import Glibc
import Testing
import TestSupport

@Suite("REST API: desktops and users (the product's own calls)", .offPool)
struct ProductAPITests {
    @Test("desktops: create, list, get, update (protocols replaced), delete", arguments: ["/v1", "/rest/v1"])
    func desktopCRUD(prefix: String) async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let client = broker.client
            let cluster = try await client.json("POST", "\(prefix)/gateway-clusters", ["name": "c", "load_balance_via": "L"], token: sid)
            let clusterID = try #require(cluster.storedData["id"] as? Int)
            let created = try await client.json("POST", "\(prefix)/desktops", [
                "name": "design-01", "address": "10.20.0.11",
                "protocols": [["name": "rdp", "port": 3389], ["name": "nomachine", "port": 4000, "transport": "both"]],
                "load_balancer_id": clusterID, "notes": "GPU",
            ], token: sid)
            #expect(created.status == 201, "\(created)")
            let stored = created.storedData
            let id = try #require(stored["id"] as? Int)
            let protocols = stored["protocols"] as? [[String: Any]] ?? []
            #expect(protocols.count == 2)
            #expect(protocols.first?["transport"] as? String == "tcp", "transport defaults to tcp")
            #expect(protocols.last?["transport"] as? String == "both")
            #expect(stored["load_balancer_id"] as? Int == clusterID)
            #expect(stored["gateway_id"] is NSNull)

            let list = try await client.json("GET", "\(prefix)/desktops", token: sid)
            #expect(list.array.map { $0["name"] as? String } == ["design-01"])
            #expect(try await client.json("GET", "\(prefix)/desktops/\(id)", token: sid).object["address"] as? String == "10.20.0.11")

            let updated = try await client.json("PUT", "\(prefix)/desktops/\(id)", ["protocols": [["name": "ssh", "port": 22]]], token: sid)
            #expect(updated.status == 200, "\(updated)")
            #expect((updated.storedData["protocols"] as? [[String: Any]])?.map { $0["name"] as? String } == ["ssh"])
            #expect(updated.storedData["notes"] as? String == "GPU")

            #expect(try await client.json("DELETE", "\(prefix)/desktops/\(id)", token: sid).status == 204)
            #expect(try await client.json("GET", "\(prefix)/desktops/\(id)", token: sid).status == 404)
            #expect(try await client.json("DELETE", "\(prefix)/desktops/\(id)", token: sid).status == 404)
        }
    }

    @Test("desktops: unknown and read-only fields are a 400; bad values name the field; nothing changes")
    func desktopBadInput() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let good: [String: Any] = ["name": "pc", "address": "10.0.0.9", "protocols": [["name": "rdp", "port": 3389]]]
            func with(_ key: String, _ value: Any) -> [String: Any] {
                var body = good
                body[key] = value
                return body
            }
            let cases: [(Any, String)] = [
                (with("colour", "blue"), "colour: unknown field"),
                (with("id", 5), "id: is read-only"),
                (with("protocols", [["name": "rdp", "port": 3389, "weight": 1]]), "protocols[0].weight: unknown field"),
                (with("protocols", [["name": "rdp", "port": 0]]), "protocols[0].port: must be 1 to 65535, got 0"),
                (with("protocols", [["name": "rdp", "port": 70000]]), "protocols[0].port: must be 1 to 65535, got 70000"),
                (with("protocols", [["name": "rdp", "port": "3389"]]), "protocols[0].port: must be an integer, got a string"),
                (with("protocols", [["port": 3389]]), "protocols[0].name: is required"),
                (with("protocols", [["name": "RDP!", "port": 3389]]), "protocols[0].name: must use only"),
                (with("protocols", [["name": "rdp", "port": 3389, "transport": "sctp"]]), "protocols[0].transport: must be tcp, udp or both"),
                (with("protocols", [["name": "rdp", "port": 3389], ["name": "rdp", "port": 3390]]), "protocols[1].name: 'rdp' appears twice"),
                (with("protocols", []), "protocols: is required"),
                (with("protocols", "rdp"), "protocols: must be an array, got a string"),
                (with("protocols", ["rdp"]), "protocols[0] must be a JSON object"),
                (with("gateway_id", 12345), "gateway_id: no gateway with id 12345"),
                (with("load_balancer_id", 12345), "load_balancer_id: no gateway cluster with id 12345"),
                (with("address", "bad host"), "address: must be an IP address or a DNS name"),
                (with("name", String(repeating: "d", count: 101)), "name: must be 1 to 100 characters"),
                (["name": "pc", "address": "10.0.0.9"], "protocols: is required"),
                ("{\"name\": \"pc\"", "malformed JSON"),
            ]
            for (body, mentions) in cases {
                try await expectRejected(broker, "POST", "/v1/desktops", body, token: sid, status: 400, mentions: mentions)
            }
            let created = try await broker.client.json("POST", "/v1/desktops", good, token: sid)
            #expect(created.status == 201, "\(created)")
            let id = try #require(created.storedData["id"] as? Int)
            try await expectRejected(broker, "PUT", "/v1/desktops/\(id)", ["extra": 1], token: sid, status: 400, mentions: "extra: unknown field")
            try await expectRejected(broker, "POST", "/v1/desktops", with("name", "PC"), token: sid, status: 409, mentions: "name: a desktop named 'PC' already exists")
        }
    }

    @Test("users: create, list, get, update, delete; the password never comes back; a new password ends sessions")
    func userCRUD() async throws {
        try await TestBroker.with { broker in
            let admin = try await broker.login()
            let client = broker.client
            let created = try await client.json("POST", "/v1/users", ["login": "erin", "password": "erin-pass-1", "display_name": "Erin"], token: admin)
            #expect(created.status == 201, "\(created)")
            let stored = created.storedData
            let id = try #require(stored["id"] as? Int)
            #expect(Set(stored.keys) == ["id", "login", "display_name", "role", "enabled", "created", "updated"])
            #expect(stored["role"] as? String == "user" && stored["enabled"] as? Bool == true)
            #expect(!created.text.contains("erin-pass-1"))
            #expect(!(try broker.snapshot()).contains("erin-pass-1"))

            let list = try await client.json("GET", "/v1/users", token: admin)
            #expect(list.array.map { $0["login"] as? String } == ["admin", "erin"])
            #expect(!list.text.contains("password"))
            #expect(try await client.json("GET", "/rest/v1/users/\(id)", token: admin).object["display_name"] as? String == "Erin")

            let erin = try await broker.login("erin", "erin-pass-1")
            let changed = try await client.json("PUT", "/v1/users/\(id)", ["password": "erin-pass-2", "role": "admin"], token: admin)
            #expect(changed.status == 200, "\(changed)")
            #expect(changed.storedData["role"] as? String == "admin")
            #expect(try await client.json("GET", "/v1/system/health", token: erin).status == 401, "a new password ends old sessions")
            #expect(try await client.json("POST", "/v1/session/login", ["user_login": "erin", "password": "erin-pass-1"]).status == 401)
            _ = try await broker.login("ERIN", "erin-pass-2")

            #expect(try await client.json("DELETE", "/v1/users/\(id)", token: admin).status == 204)
            #expect(try await client.json("GET", "/v1/users/\(id)", token: admin).status == 404)
            #expect(try await client.json("POST", "/v1/session/login", ["user_login": "erin", "password": "erin-pass-2"]).status == 401)
        }
    }

    @Test("users: bad input 400, duplicate login 409, the last admin stays (409)")
    func userBadInput() async throws {
        try await TestBroker.with { broker in
            let admin = try await broker.login()
            let cases: [(Any, String)] = [
                (["login": "frank"], "password: is required"),
                (["password": "frank-pass"], "login: is required"),
                (["login": "frank", "password": "fr"], "password: must be 3 to 100 characters, got 2"),
                (["login": "frank", "password": String(repeating: "p", count: 101)], "password: must be 3 to 100 characters, got 101"),
                (["login": String(repeating: "f", count: 65), "password": "frank-pass"], "login: must be 1 to 64 characters, got 65"),
                (["login": "frank", "password": "frank-pass", "role": "root"], "role: must be admin or user, got 'root'"),
                (["login": "frank", "password": "frank-pass", "enabled": "yes"], "enabled: must be true or false, got a string"),
                (["login": "frank", "password": "frank-pass", "shell": "/bin/sh"], "shell: unknown field"),
                (["login": "frank", "password": "frank-pass", "created": "x"], "created: is read-only"),
                (["login": " frank", "password": "frank-pass"], "login: must not begin or end with a blank"),
            ]
            for (body, mentions) in cases {
                try await expectRejected(broker, "POST", "/v1/users", body, token: admin, status: 400, mentions: mentions)
            }
            try await expectRejected(broker, "POST", "/v1/users", ["login": "ADMIN", "password": "another"], token: admin,
                                     status: 409, mentions: "login: a user with login 'ADMIN' already exists")
            try await expectRejected(broker, "DELETE", "/v1/users/1", nil, token: admin, status: 409, mentions: "last enabled admin")
            try await expectRejected(broker, "PUT", "/v1/users/1", ["role": "user"], token: admin, status: 409, mentions: "last enabled admin")
            try await expectRejected(broker, "PUT", "/v1/users/1", ["enabled": false], token: admin, status: 409, mentions: "last enabled admin")
        }
    }
}

@Suite("REST API: limits and health", .offPool)
struct LimitsAndHealthTests {
    @Test("an oversized body gets 413, declared or streamed, and changes nothing")
    func oversizedBody() async throws {
        try await TestBroker.with(maxBodyBytes: 4096) { broker in
            let sid = try await broker.login()
            let before = try broker.snapshot()
            let big = "{\"name\": \"gw\", \"address\": \"gw.example.com\", \"notes\": \"" + String(repeating: "x", count: 8000) + "\"}"
            let declared = try await broker.client.send("POST", "/v1/gateways", body: Data(big.utf8),
                                                        headers: ["Authorization": "Bearer \(sid)", "Content-Type": "application/json"])
            #expect(declared.status == 413, "\(declared)")
            #expect(declared.error.contains("limit of 4096 bytes"))

            // Chunked: no Content-Length to judge by, so the limit applies while reading.
            var chunked = Data()
            for piece in stride(from: 0, to: big.utf8.count, by: 1000) {
                let slice = Array(big.utf8)[piece..<min(piece + 1000, big.utf8.count)]
                chunked.append(Data(String(slice.count, radix: 16).utf8) + Data("\r\n".utf8) + Data(slice) + Data("\r\n".utf8))
            }
            chunked.append(Data("0\r\n\r\n".utf8))
            let streamed = try await broker.client.send("POST", "/v1/gateways", body: chunked,
                                                        headers: ["Authorization": "Bearer \(sid)", "Transfer-Encoding": "chunked"])
            #expect(streamed.status == 413, "\(streamed)")
            #expect(!streamed.error.isEmpty)

            let login = try await broker.client.send("POST", "/v1/session/login", body: Data(big.utf8), headers: ["Content-Type": "application/json"])
            #expect(login.status == 413)
            #expect(try broker.snapshot() == before)

            // Just under the limit is fine.
            let fits = try await broker.client.json("POST", "/v1/gateways", ["name": "gw", "address": "gw.example.com", "notes": String(repeating: "x", count: 3000)], token: sid)
            #expect(fits.status == 201, "\(fits)")
        }
    }

    @Test("health: 200 with the database, listener, gateways and load")
    func healthy() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let reply = try await broker.client.json("GET", "/v1/system/health", token: sid)
            #expect(reply.status == 200, "\(reply)")
            let body = reply.object
            #expect(body["status"] as? String == "ok" || body["status"] as? String == "degraded")
            let database = body["database"] as? [String: Any] ?? [:]
            #expect(database["status"] as? String == "ok")
            #expect(database["schema_version"] as? String == "0007-pending-rules")
            let listeners = body["listeners"] as? [[String: Any]] ?? []
            #expect(listeners.first?["address"] as? String == "127.0.0.1:\(broker.client.port)")
            #expect((body["gateways"] as? [String: Any])?["registered"] as? Int == 0)
            #expect(((body["load"] as? [String: Any])?["cpus"] as? Int ?? 0) >= 1)
            #expect(((body["disk"] as? [String: Any])?["free_bytes"] as? Int ?? 0) > 0)
            #expect(try await broker.client.json("GET", "/v1/system/health").status == 401)
        }
    }

    @Test("health: 503 naming the problem when the database file is removed")
    func databaseRemoved() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            try FileManager.default.removeItem(atPath: broker.databasePath)
            let reply = try await broker.client.json("GET", "/rest/v1/system/health", token: sid)
            #expect(reply.status == 503, "\(reply)")
            #expect(reply.error.contains("missing"))
            #expect(reply.error.contains(broker.databasePath))
            #expect((reply.object["database"] as? [String: Any])?["status"] as? String == "unavailable")
        }
    }

    @Test("health: 503 when the database file is replaced by one that is not a database")
    func databaseCorrupted() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let garbage = broker.folder.path("garbage")
            try Data(repeating: 0x5A, count: 16384).write(to: URL(fileURLWithPath: garbage))
            #expect(rename(garbage, broker.databasePath) == 0)
            let reply = try await broker.client.json("GET", "/v1/system/health", token: sid)
            #expect(reply.status == 503, "\(reply)")
            #expect(reply.error.contains(broker.databasePath))
        }
    }

    @Test("health: 503 when the database file is overwritten in place with garbage")
    func databaseOverwritten() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            // Move every page out of the WAL first, or SQLite would read page 1 from there.
            let queue = try DatabaseQueue(path: broker.databasePath)
            _ = try await queue.writeWithoutTransaction { db in try db.checkpoint(.truncate) }
            try queue.close()
            let handle = try #require(FileHandle(forWritingAtPath: broker.databasePath))
            try handle.write(contentsOf: Data(repeating: 0x5A, count: 4096))
            try handle.close()
            let reply = try await broker.client.json("GET", "/v1/system/health", token: sid)
            // The session lookup or the health check itself finds the file unreadable.
            #expect(reply.status == 503, "\(reply)")
            #expect(reply.error.contains(broker.databasePath))
            #expect(reply.error.contains("not a database"))
        }
    }

    @Test("health: 503 when the database file is made unreadable",
          .enabled(if: getuid() != 0, "skipped as root: root reads a file whatever its mode (the removed and corrupted cases cover 503)"))
    func databaseUnreadable() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            #expect(chmod(broker.databasePath, 0) == 0)
            defer { _ = chmod(broker.databasePath, 0o600) }
            let reply = try await broker.client.json("GET", "/v1/system/health", token: sid)
            #expect(reply.status == 503, "\(reply)")
        }
    }
}

