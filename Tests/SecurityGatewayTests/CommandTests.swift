import Foundation
import GatewayControl
import Glibc
import SecurityGateway
import Synchronization
import SessionGrants
import Testing
import TestSupport

/// The `pcoip-security-gateway` binary, run as a user would.
@Suite("pcoip-security-gateway command", .offPool)
struct SecurityGatewayCommandTests {
    /// The binary next to the test bundle (SwiftPM builds products and tests into one folder).
    static var binary: String { ChildProcess.builtBinary("pcoip-security-gateway", override: "SECURITY_GATEWAY_BINARY") }

    func run(_ arguments: [String]) throws -> (Int32, String, String) {
        let done = try ChildProcess.run(Self.binary, arguments)
        return (done.status, done.stdout, done.stderr)
    }

    @Test("--help names serve, --check, the endpoints and the keys")
    func help() throws {
        let (status, out, _) = try run(["--help"])
        #expect(status == 0)
        for fragment in ["serve", "--check", "--config", "POST /v1/sessions", "GET /health", "AgentSourcePort", "ClientHelloTimeout"] {
            #expect(out.contains(fragment), "--help lacks \(fragment)")
        }
        let (serveStatus, serveHelp, _) = try run(["serve", "--help"])
        #expect(serveStatus == 0 && serveHelp.contains("--data-dir") && serveHelp.contains("--config"))
    }

    @Test("--check: a valid file passes; a bad one fails naming file, line and key; a missing certificate is named")
    func check() throws {
        let dir = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try SGTest.makeSigningPair(in: dir)
        let good = dir + "/good.conf"
        try "GatewayGroup = g\nJwtVerifyingCert = c.pem\nListenAddress = 127.0.0.1:4172\n".write(toFile: good, atomically: true, encoding: .utf8)
        let (status, out, _) = try run(["--check", "--config", good])
        #expect(status == 0 && out.contains("valid") && out.contains("ES256"), "\(out)")
        #expect(!out.contains("PRIVATE") && !out.contains("BEGIN"))
        let bad = dir + "/bad.conf"
        try "GatewayGroup = g\nJwtVerifyingCert = c.pem\nMaxConnections = lots\n".write(toFile: bad, atomically: true, encoding: .utf8)
        let (badStatus, _, badErr) = try run(["--check", "--config", bad])
        #expect(badStatus != 0 && badErr.contains("bad.conf:3") && badErr.contains("MaxConnections"), "\(badErr)")
        let noCert = dir + "/nocert.conf"
        try "GatewayGroup = g\nJwtVerifyingCert = missing.pem\n".write(toFile: noCert, atomically: true, encoding: .utf8)
        let (noCertStatus, _, noCertErr) = try run(["--check", "--config", noCert])
        #expect(noCertStatus != 0 && noCertErr.contains("JwtVerifyingCert") && noCertErr.contains("missing.pem"), "\(noCertErr)")
        let (noConfig, _, noConfigErr) = try run(["--check"])
        #expect(noConfig != 0 && noConfigErr.contains("--config"), "\(noConfigErr)")
    }

    @Test("serve restores prepared grants from --data-dir, answers /health over TLS (its own certificate, made in --data-dir), and stops on SIGTERM")
    func serve() async throws {
        let dir = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try SGTest.makeSigningPair(in: dir)
        let signer = try await GrantSigner.load(pem: try String(contentsOfFile: dir + "/k.pem", encoding: .utf8))
        try FileManager.default.createDirectory(atPath: dir + "/data", withIntermediateDirectories: true)
        let earlier = PreparedGrants(path: dir + "/data/prepared-grants.json")
        let now = Date()
        let grant = SessionGrant(sessionID: "kept", agent: "127.0.0.1:9", serverName: "a.test", audience: "g",
                                 issuedAt: now.addingTimeInterval(-5), expires: now.addingTimeInterval(600))
        #expect(earlier.prepare(grant, token: try await signer.sign(grant)) == .added)
        let (sg, control) = (TestPorts.free(), TestPorts.free())
        try "GatewayGroup = g\nJwtVerifyingCert = c.pem\nListenAddress = 127.0.0.1:\(sg)\nControlListen = 127.0.0.1:\(control)\n"
            .write(toFile: dir + "/sg.conf", atomically: true, encoding: .utf8)
        let process = try ChildProcess(Self.binary, ["serve", "--config", dir + "/sg.conf", "--data-dir", dir + "/data"])
        defer { process.stop() }
        var status = (0, "")
        let ca = dir + "/data/control-tls.crt"
        let up = await eventuallyAsync {
            status = (try? SGTest.curl("GET", "https://127.0.0.1:\(control)/v1/status", ca: ca)) ?? (0, "")
            return status.0 == 200
        }
        #expect(up, "serve did not answer on its control endpoint")
        let object = try JSONSerialization.jsonObject(with: Data(status.1.utf8)) as? [String: Any]
        #expect(object?["prepared_grants"] as? Int == 1, "\(status.1)")
        let (health, body) = try SGTest.curl("GET", "https://127.0.0.1:\(control)/health", ca: ca)
        #expect(health == 200 && body == #"{"code":200,"status":"success"}"#)
        // TLS only: plain HTTP gets no answer, and a client trusting the system's CAs refuses the certificate.
        #expect((try? SGTest.curl("GET", "http://127.0.0.1:\(control)/health"))?.0 != 200)
        #expect((try? SGTest.curl("GET", "https://127.0.0.1:\(control)/health"))?.0 != 200)
        process.signal(SIGTERM)
        #expect(process.waitForExit() == 0, "\(process.output)")
        let output = process.output
        #expect(output.contains("1 kept") && !output.contains("eyJ"), "no token in the log: \(output)")
    }

    @Test("--log-level reaches the gateway's own messages: at warning a prepare logs nothing, at the default (info) it logs the session")
    func logLevel() async throws {
        let dir = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try SGTest.makeSigningPair(in: dir)
        let signer = try await GrantSigner.load(pem: try String(contentsOfFile: dir + "/k.pem", encoding: .utf8))
        for level in ["warning", nil] {
            let (sg, control) = (TestPorts.free(), TestPorts.free())
            try "GatewayGroup = g\nJwtVerifyingCert = c.pem\nListenAddress = 127.0.0.1:\(sg)\nControlListen = 127.0.0.1:\(control)\nControlPlainHTTP = true\n"
                .write(toFile: dir + "/sg.conf", atomically: true, encoding: .utf8)
            let process = try ChildProcess(Self.binary, ["serve", "--config", dir + "/sg.conf", "--data-dir", dir + "/data-\(level ?? "info")"]
                                           + (level.map { ["--log-level", $0] } ?? []))
            defer { process.stop() }
            #expect(await eventuallyAsync { (try? SGTest.curl("GET", "http://127.0.0.1:\(control)/health"))?.0 == 200 }, "\(process.output)")
            let now = Date()
            let session = "log-\(level ?? "info")"
            let grant = SessionGrant(sessionID: session, agent: "127.0.0.1:9", serverName: "\(session).test", audience: "g",
                                     issuedAt: now.addingTimeInterval(-5), expires: now.addingTimeInterval(600))
            let body = #"{"grant":"\#(try await signer.sign(grant))"}"#
            #expect(try SGTest.curl("POST", "http://127.0.0.1:\(control)/v1/sessions", json: body).0 == 201)
            process.signal(SIGTERM)
            #expect(process.waitForExit() == 0, "\(process.output)")
            let output = process.output
            if level == nil {
                #expect(output.contains("session \(session) prepared"), "\(output)")
            } else {
                #expect(!output.contains(" info ") && !output.contains("prepared for"), "\(output)")
            }
        }
    }

    @Test("serve checks ControlTLSCert/ControlTLSKey in a child process: a key of another certificate, or an RSA key under 2,048 bits, stops it naming the key and the file, as --check does; a bad request to the check is answered, not crashed on")
    func controlTLSCheckedByChild() throws {
        let dir = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try SGTest.makeSigningPair(in: dir)
        for name in ["tls", "other"] {
            try SGTest.openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "\(name).key"], in: dir)
        }
        try SGTest.openssl(["req", "-x509", "-new", "-key", "tls.key", "-days", "2", "-subj", "/CN=sg", "-out", "tls.crt"], in: dir)
        try SGTest.openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", "weak.key"], in: dir)
        try SGTest.openssl(["req", "-x509", "-new", "-key", "weak.key", "-days", "2", "-subj", "/CN=sg", "-out", "weak.crt"], in: dir)
        func configure(certificate: String, key: String) throws {
            let (sg, control) = (TestPorts.free(), TestPorts.free())
            try """
                GatewayGroup = g
                JwtVerifyingCert = c.pem
                ListenAddress = 127.0.0.1:\(sg)
                ControlListen = 127.0.0.1:\(control)
                ControlTLSCert = \(dir)/\(certificate)
                ControlTLSKey = \(dir)/\(key)

                """.write(toFile: dir + "/sg.conf", atomically: true, encoding: .utf8)
        }
        func serve(certificate: String, key: String) throws -> (Int32, String) {
            try configure(certificate: certificate, key: key)
            let (status, _, err) = try run(["serve", "--config", dir + "/sg.conf", "--data-dir", dir + "/data"])
            return (status, err)
        }
        let (mismatched, mismatchedErr) = try serve(certificate: "tls.crt", key: "other.key")
        #expect(mismatched != 0 && mismatchedErr.contains("ControlTLSKey") && mismatchedErr.contains("other.key")
                && mismatchedErr.contains("does not belong"), "\(mismatchedErr)")
        let (weak, weakErr) = try serve(certificate: "weak.crt", key: "weak.key")
        #expect(weak != 0 && weakErr.contains("ControlTLSCert") && weakErr.contains("1024"), "\(weakErr)")
        // --check finds the same before serve would.
        let (checkBad, _, checkBadErr) = try run(["--check", "--config", dir + "/sg.conf"])
        #expect(checkBad != 0 && checkBadErr.contains("ControlTLSCert") && checkBadErr.contains("1024"), "\(checkBadErr)")
        try configure(certificate: "tls.crt", key: "other.key")
        let (checkOther, _, checkOtherErr) = try run(["--check", "--config", dir + "/sg.conf"])
        #expect(checkOther != 0 && checkOtherErr.contains("ControlTLSKey") && checkOtherErr.contains("does not belong"), "\(checkOtherErr)")
        try configure(certificate: "tls.crt", key: "tls.key")
        let (checkGood, checkGoodOut, checkGoodErr) = try run(["--check", "--config", dir + "/sg.conf"])
        #expect(checkGood == 0 && checkGoodOut.contains("tls.crt (SHA256:"), "\(checkGoodOut) \(checkGoodErr)")
        #expect(!mismatchedErr.contains("PRIVATE") && !weakErr.contains("PRIVATE"), "no key material in errors")
        let (status, out, _) = try run(["check-control-tls", "{not json"])
        #expect(status == 0 && out.contains(#""field":"request""#), "\(out)")
        let (helpStatus, help, _) = try run(["--help"])
        #expect(helpStatus == 0 && !help.contains("check-control-tls"), "not an operator's command")
    }

    @Test("a crash in the middle of a burst of prepares loses no acknowledged grant, while the journal is rewritten in the background (issue 15)")
    func crashMidBurstKeepsAcknowledgedGrants() async throws {
        let dir = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try SGTest.makeSigningPair(in: dir)
        let (status, out, err) = try run(["grant", "--jwt-signing-key", dir + "/k.pem", "--audience", "g", "--agent", "127.0.0.1:9",
                                          "--sni", "d{n}.example", "--session-id", "s{n}", "--lifetime", "600", "--count", "2500"])
        #expect(status == 0, "\(err)")
        let tokens = out.split(separator: "\n").map(String.init)
        #expect(tokens.count == 2500)
        let (sg, control) = (TestPorts.free(), TestPorts.free())
        try "GatewayGroup = g\nJwtVerifyingCert = c.pem\nListenAddress = 127.0.0.1:\(sg)\nControlListen = 127.0.0.1:\(control)\nControlPlainHTTP = true\n"
            .write(toFile: dir + "/sg.conf", atomically: true, encoding: .utf8)
        let arguments = ["serve", "--config", dir + "/sg.conf", "--data-dir", dir + "/data"]
        let post: @Sendable (String) -> Int? = { token in
            let body = Array(#"{"grant":"\#(token)"}"#.utf8)
            return try? BlockingHTTP.request(method: "POST", host: "127.0.0.1", port: UInt16(control), path: "/v1/sessions",
                                             headers: [("Content-Type", "application/json")], body: body,
                                             timeoutMilliseconds: 5000).status
        }
        let up: @Sendable () -> Bool = {
            (try? BlockingHTTP.request(method: "GET", host: "127.0.0.1", port: UInt16(control), path: "/health"))?.status == 200
        }
        let first = try ChildProcess(Self.binary, arguments)
        defer { first.stop() }
        #expect(eventually { up() }, "serve did not answer: \(first.output)")
        // Two pushers prepare every grant and revoke two in three at once, so
        // the journal outgrows 4 x the live grants and is rewritten in the
        // background (more than once) while they go on.
        let revoke: @Sendable (Int) -> Int? = { index in
            try? BlockingHTTP.request(method: "DELETE", host: "127.0.0.1", port: UInt16(control), path: "/v1/sessions/s\(index)",
                                      timeoutMilliseconds: 5000).status
        }
        let kept = Mutex<[Int]>([]), revoked = Mutex<[Int]>([]), records = Atomic<Int>(0)
        let pushers = (0..<2).map { part in
            Thread {
                for index in stride(from: part, to: tokens.count, by: 2) {
                    guard let answer = post(tokens[index]), answer == 201 else { return }
                    records.add(1, ordering: .relaxed)
                    if index % 3 == 0 { kept.withLock { $0.append(index) }; continue }
                    guard revoke(index) == 200 else { return }
                    records.add(1, ordering: .relaxed)
                    revoked.withLock { $0.append(index) }
                }
            }
        }
        pushers.forEach { $0.start() }
        #expect(eventually { records.load(ordering: .relaxed) >= 2000 }, "the burst did not get going: \(first.output)")
        first.signal(SIGKILL)
        #expect(first.waitForExit() != nil)
        #expect(eventually { pushers.allSatisfy(\.isFinished) }, "the pushers did not stop after the kill")
        let (keptAcked, revokedAcked) = (kept.withLock { $0 }, revoked.withLock { $0 })

        let second = try ChildProcess(Self.binary, arguments)
        defer { second.stop() }
        #expect(eventually { up() }, "the restarted gateway did not answer: \(second.output)")
        let answer = try BlockingHTTP.request(method: "GET", host: "127.0.0.1", port: UInt16(control), path: "/v1/status")
        let object = try JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: Any]
        let held = object?["prepared_grants"] as? Int ?? -1
        // In flight at the kill, per pusher: one prepare not yet answered, or one prepared grant whose revoke was not.
        #expect(held >= keptAcked.count && held <= keptAcked.count + 2, "held \(held), kept and acknowledged \(keptAcked.count)")
        // Each acknowledged grant is there (preparing it again is 200, already prepared), each acknowledged revoke too (201: prepared anew).
        let lost = keptAcked.filter { post(tokens[$0]) != 200 }
        #expect(lost.isEmpty, "\(lost.count) acknowledged grant(s) lost in the crash, e.g. \(lost.prefix(3))")
        let back = revokedAcked.filter { post(tokens[$0]) != 201 }
        #expect(back.isEmpty, "\(back.count) acknowledged revoke(s) lost in the crash, e.g. \(back.prefix(3))")
        #expect(!((try? FileManager.default.contentsOfDirectory(atPath: dir + "/data")) ?? []).contains { $0.contains(".bad-") })
    }

    @Test("grant: signs grants the gateway verifies; --count with {n} and --sequential-agents; one JWT per line")
    func grant() async throws {
        let dir = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try SGTest.makeSigningPair(in: dir)
        let certificate = try String(contentsOfFile: dir + "/c.pem", encoding: .utf8)
        let verifier = try await GrantVerifier.load(certificatePEM: certificate, audience: "sg-east")
        let (status, out, err) = try run(["grant", "--jwt-signing-key", dir + "/k.pem", "--audience", "sg-east",
                                          "--agent", "10.0.0.254:4172", "--sni", "Desk-{n}.example", "--session-id", "s-{n}",
                                          "--lifetime", "120", "--count", "4", "--sequential-agents", "--client", "198.51.100.7"])
        #expect(status == 0, "\(err)")
        let tokens = out.split(separator: "\n").map(String.init)
        #expect(tokens.count == 4 && !err.contains("eyJ"))
        var ids = Set<String>()
        for (n, token) in tokens.enumerated() {
            let grant = try await verifier.verify(token, recordUse: false)
            #expect(grant.sessionID == "s-\(n)" && grant.serverName == "desk-\(n).example" && grant.client == "198.51.100.7")
            #expect(grant.agent == ["10.0.0.254:4172", "10.0.0.255:4172", "10.0.1.0:4172", "10.0.1.1:4172"][n])
            #expect(grant.audience == "sg-east" && !grant.singleUse)
            #expect(abs(grant.expires.timeIntervalSince(grant.issuedAt) - 120) < 1.5)
            ids.insert(grant.id)
        }
        #expect(ids.count == 4, "each grant has its own jti")
        // Another group's gateway refuses them; --single-use is carried.
        let elsewhere = try await GrantVerifier.load(certificatePEM: certificate, audience: "sg-west")
        await #expect(throws: GrantError.wrongAudience("sg-east")) { try await elsewhere.verify(tokens[0], recordUse: false) }
        let (_, once, _) = try run(["grant", "--jwt-signing-key", dir + "/k.pem", "--audience", "sg-east",
                                    "--agent", "[2001:db8::5]:4172", "--sni", "v6.example", "--single-use"])
        let single = try await verifier.verify(once.trimmingCharacters(in: .whitespacesAndNewlines), recordUse: false)
        #expect(single.singleUse && single.agent == "[2001:db8::5]:4172" && !single.sessionID.isEmpty)
    }

    @Test("grant: bad input fails naming the flag, and prints no grant", arguments: [
        (["--agent", "desk.example:4172"], "--agent"),
        (["--agent", "10.0.0.1:0"], "--agent"),
        (["--sni", "-bad"], "--sni"),
        (["--sni", "has space"], "--sni"),
        (["--audience", "two words"], "--audience"),
        (["--lifetime", "0"], "--lifetime"),
        (["--count", "0"], "--count"),
        (["--client", "somebody"], "--client"),
        (["--agent", "[2001:db8::1]:4172", "--sequential-agents", "--count", "2"], "--sequential-agents"),
        (["--agent", "255.255.255.255:4172", "--sequential-agents", "--count", "2"], "--sequential-agents"),
        (["--jwt-signing-key", "/nonexistent/key.pem"], "--jwt-signing-key"),
        (["--jwt-signing-key", "RSA1024"], "--jwt-signing-key"),
        (["--jwt-signing-key", "CERT"], "--jwt-signing-key"),
    ])
    func grantErrors(overrides: [String], flag: String) throws {
        let dir = try SGTest.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try SGTest.openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "k.pem"], in: dir)
        try SGTest.openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", "small.pem"], in: dir)
        try SGTest.openssl(["req", "-x509", "-new", "-key", "k.pem", "-days", "2", "-subj", "/CN=cm", "-out", "c.pem"], in: dir)
        var options = ["--jwt-signing-key": dir + "/k.pem", "--audience": "g", "--agent": "10.0.0.1:4172", "--sni": "a.example"]
        var flags: [String] = []
        var i = 0
        while i < overrides.count {
            let name = overrides[i]
            if name.hasPrefix("--"), i + 1 < overrides.count, !overrides[i + 1].hasPrefix("--") {
                var value = overrides[i + 1]
                if value == "RSA1024" { value = dir + "/small.pem" }
                if value == "CERT" { value = dir + "/c.pem" }
                options[name] = value
                i += 2
            } else {
                flags.append(name)
                i += 1
            }
        }
        let arguments = ["grant"] + options.sorted { $0.key < $1.key }.flatMap { [$0.key, $0.value] } + flags
        let (status, out, err) = try run(arguments)
        #expect(status != 0, "\(arguments) must fail")
        #expect(err.contains(flag), "the error names \(flag): \(err)")
        #expect(out.isEmpty, "no grant printed: \(out)")
    }
}
