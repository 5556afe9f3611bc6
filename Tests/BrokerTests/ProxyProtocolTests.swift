import BrokerCore
import ControlProtocol
import Foundation
import GRDB
import Glibc
import Testing
import TestSupport

/// A PROXY v2 header as a gateway's broker forwarding writes it.
func proxyHeader(gatewayID: Int, key: ControlKey, timestamp: Int64, client: (ip: String, port: Int) = ("198.51.100.20", 50123),
                 destination: (ip: String, port: Int) = ("203.0.113.1", 443)) -> [UInt8] {
    ProxyHeader(source: client, destination: destination, tlvs: [
        ProxyHeader.signatureTLV: Array("leo-gw-signature".utf8),
        ProxyHeader.authenticationTLV: ProxyAuthentication.tlv(gatewayID: Int64(gatewayID), key: key, timestamp: timestamp,
                                                               source: client, destination: destination),
    ]).encoded()
}

/// The sessions table: (client_address, login_gateway_id) per row.
func sessionRows(_ broker: TestBroker) throws -> [(String, Int64?)] {
    var configuration = Configuration()
    configuration.readonly = true
    let queue = try DatabaseQueue(path: broker.databasePath, configuration: configuration)
    defer { try? queue.close() }
    return try queue.read { db in
        try Row.fetchAll(db, sql: "SELECT client_address, login_gateway_id FROM user_session ORDER BY created").map {
            ($0["client_address"], $0["login_gateway_id"])
        }
    }
}

@Suite("Broker forwarding: PROXY protocol v2 on the broker's listener", .offPool)
struct ProxyProtocolTests {
    @Test("header parsing: round trip, prefixes, garbage")
    func parsing() {
        let header = ProxyHeader(source: ("2001:db8::7", 40000), destination: ("2001:db8::1", 443), tlvs: [0xE0: [1, 2, 3]])
        let bytes = header.encoded()
        #expect(ProxyHeader.parse(bytes + Array("GET /".utf8)) == .header(header, length: bytes.count))
        #expect(ProxyHeader.parse(Array(bytes.prefix(10))) == .needMore)
        #expect(ProxyHeader.parse(Array(bytes.prefix(bytes.count - 1))) == .needMore)
        #expect(ProxyHeader.parse(Array("POST /v1/session/login HTTP/1.1\r\n".utf8)) == .notProxy)
        var badVersion = bytes
        badVersion[12] = 0x11
        #expect(ProxyHeader.parse(badVersion) == .invalid("PROXY header version 1, expected 2"))
        var badTLV = ProxyHeader(source: ("192.0.2.1", 1), destination: ("192.0.2.2", 2)).encoded()
        badTLV[15] += 3
        badTLV += [0xE1, 0x00, 0x09]
        #expect(ProxyHeader.parse(badTLV) == .invalid("PROXY header TLV 0xe1 truncated"))
    }

    @Test("a verified header: the session records the client's address and the login gateway; cluster mode P uses it")
    func loginThroughGateway() async throws {
        try await withConnectSetup { setup in
            let broker = setup.broker
            let cluster = try await setup.cluster("cl-p", via: "P")
            let b = try await setup.addGateway("gw-b", extra: ["load_balancer_id": cluster])
            let c = try await setup.addGateway("gw-c", extra: ["load_balancer_id": cluster])
            let desktop = try await setup.desktop("desk-p", clusterID: cluster)
            let key = try #require(setup.gateways[c]?.key)
            let now = Int64(broker.clock.now.timeIntervalSince1970)

            let login = try await broker.client.send("POST", "/v1/session/login",
                                                     body: Data(#"{"user_login":"admin","password":"\#(TestBroker.adminPassword)"}"#.utf8),
                                                     headers: ["Content-Type": "application/json"],
                                                     prefix: proxyHeader(gatewayID: c, key: key, timestamp: now))
            #expect(login.status == 200, "\(login)")
            let sid = try #require(login.object["sid"] as? String)
            let rows = try sessionRows(broker)
            #expect(rows.last?.0 == "198.51.100.20" && rows.last?.1 == Int64(c), "\(rows)")

            // P: the login gateway c, although b has as few rules and a lower id.
            let reply = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktop, "protocol": "rdp"], token: sid)
            #expect((reply.object["gateway"] as? [String: Any])?["id"] as? Int == c, "\(reply)")
            // The client address defaults to the one the header carried.
            _ = try await broker.client.json("PUT", "/v1/gateway-clusters/\(cluster)", ["use_src_ip": 2], token: sid)
            let second = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktop, "protocol": "rdp"], token: sid)
            let push = setup.gateways[c]?.fake.rules[second.object["rule_id"] as? String ?? ""]
            #expect(push?.clientIP == "127.0.0.1", "a direct request (no header) uses the socket's peer")
            // A session without a login gateway (direct): P falls back to fewest rules, b.
            let direct = try await broker.client.json("POST", "/v1/connect", ["desktop_id": desktop, "protocol": "rdp"], token: setup.sid)
            #expect((direct.object["gateway"] as? [String: Any])?["id"] as? Int == b, "\(direct)")
        }
    }

    @Test("forged MAC, stale timestamp, unenrolled gateway, no authentication TLV, garbage: connection closed, nothing changed")
    func refusedHeaders() async throws {
        try await TestBroker.with { broker in
            let sid = try await broker.login()
            let (id, key) = try await enrolledGateway(broker, sid: sid, name: "gw-1", address: "gw1.example.com")
            let created = try await broker.client.json("POST", "/v1/gateways", ["name": "gw-2", "address": "gw2.example.com"], token: sid)
            let unenrolled = try #require(created.storedData["id"] as? Int)
            let now = Int64(broker.clock.now.timeIntervalSince1970)
            var garbage = proxyHeader(gatewayID: id, key: key, timestamp: now)
            garbage[13] = 0x31 // AF_UNIX
            let cases: [(String, [UInt8])] = [
                ("forged MAC", proxyHeader(gatewayID: id, key: ControlKey.generate(), timestamp: now)),
                ("stale timestamp", proxyHeader(gatewayID: id, key: key, timestamp: now - 600)),
                ("unenrolled gateway", proxyHeader(gatewayID: unenrolled, key: key, timestamp: now)),
                ("no authentication TLV", ProxyHeader(source: ("198.51.100.20", 1), destination: ("203.0.113.1", 443)).encoded()),
                ("garbage family", garbage),
                ("client address changed after signing", {
                    var bytes = proxyHeader(gatewayID: id, key: key, timestamp: now)
                    bytes[16 + 3] ^= 1 // the last byte of the source address
                    return bytes
                }()),
            ]
            let before = try broker.snapshot()
            for (name, prefix) in cases {
                let body = Data(#"{"user_login":"admin","password":"\#(TestBroker.adminPassword)"}"#.utf8)
                do {
                    let reply = try await broker.client.send("POST", "/v1/session/login", body: body,
                                                             headers: ["Content-Type": "application/json"], prefix: prefix)
                    Issue.record("\(name): the broker answered \(reply) instead of closing the connection")
                } catch {
                    // Closed without an answer.
                }
            }
            #expect(try broker.snapshot() == before, "a refused PROXY header changed the database")
            // The valid header still works, and a direct client too.
            let good = try await broker.client.send("POST", "/v1/session/login",
                                                    body: Data(#"{"user_login":"admin","password":"\#(TestBroker.adminPassword)"}"#.utf8),
                                                    headers: ["Content-Type": "application/json"],
                                                    prefix: proxyHeader(gatewayID: id, key: key, timestamp: now))
            #expect(good.status == 200, "\(good)")
            #expect(try await broker.client.json("GET", "/v1/system/health", token: sid).status == 200)
        }
    }

    @Test("a peer that stalls inside a PROXY header, or sends nothing, is closed after the header timeout")
    func stalledHeader() async throws {
        try await TestBroker.with(proxyHeaderTimeout: 0.3) { broker in
            let sid = try await broker.login()
            let (id, key) = try await enrolledGateway(broker, sid: sid, name: "gw-1", address: "gw1.example.com")
            let header = proxyHeader(gatewayID: id, key: key, timestamp: Int64(broker.clock.now.timeIntervalSince1970))
            for (name, sent) in [("half a PROXY header", Array(header.prefix(20))), ("nothing", [])] {
                // Without the header timer nothing would close it: "open" after the wait.
                let outcome = try rawConnectionOutcome(port: broker.client.port, send: sent, waitSeconds: 30)
                #expect(outcome == "closed", "\(name): \(outcome)")
            }
            // A direct client that sends its request at once is not affected.
            #expect(try await broker.client.json("GET", "/v1/system/health", token: sid).status == 200)
        }
    }
}

/// Connects to the broker, sends `send`, and waits up to `waitSeconds` for
/// the server to close: "closed", "data" (it answered something) or "open".
func rawConnectionOutcome(port: Int, send bytes: [UInt8], waitSeconds: Int) throws -> String {
    let fd = try connectLoopback(port: port, timeoutSeconds: waitSeconds)
    defer { close(fd) }
    if !bytes.isEmpty {
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
    }
    var buffer = [UInt8](repeating: 0, count: 512)
    let n = recv(fd, &buffer, buffer.count, 0)
    if n == 0 || (n < 0 && errno == ECONNRESET) { return "closed" }
    if n > 0 { return "data: \(String(decoding: buffer[0..<n], as: UTF8.self))" }
    return "open (errno \(errno))"
}
