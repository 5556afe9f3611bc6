import ControlProtocol
import Foundation
import GatewayControl
import Glibc
import Synchronization
import SystemLayer
import Testing
import TestSupport

/// The built `leostream-gateway` (next to the test bundle, or $GATEWAY_BINARY).
enum GatewayBinary {
    static var path: String { ChildProcess.builtBinary("leostream-gateway", override: "GATEWAY_BINARY") }

    /// Runs the binary to completion.
    static func run(_ arguments: [String]) throws -> ChildProcess.Finished {
        try ChildProcess.run(path, arguments)
    }
}

/// A tiny HTTP listener standing in for the broker: it verifies every
/// request's signature (gateway-to-broker) with the key it was given and
/// records what arrived.
final class FakeBroker: @unchecked Sendable {
    struct Received: Sendable {
        let method: String
        let path: String
        let body: [UInt8]
        let verified: String?   // nil when the signature verified, else the reason
    }

    let port: UInt16
    private let listener: FileDescriptor
    private let signer: ControlSigner
    private let replay = ReplayGuard()
    private let stopped = Atomic<Bool>(false)
    let received = Mutex<[Received]>([])
    let keep: [String]

    init(signer: ControlSigner, keep: [String] = []) throws {
        self.signer = signer
        self.keep = keep
        listener = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        port = Socket.localAddress(listener)!.port
        Thread { [self] in
            while !stopped.load(ordering: .relaxed) {
                guard BlockingWait.readable(listener, timeoutMilliseconds: 100) else { continue }
                guard case .done(let conn)? = try? Socket.accept(listener) else { continue }
                serve(conn.fd)
            }
            listener.close()
        }.start()
    }

    func stop() { stopped.store(true, ordering: .relaxed) }

    var registrations: [Received] { received.withLock { $0.filter { $0.path == "/v1/gateway-agent/register" } } }

    private func serve(_ fd: FileDescriptor) {
        defer { fd.close() }
        var data: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        var head: String?
        var bodyStart = 0
        var length = 0
        while true {
            guard BlockingWait.readable(fd, timeoutMilliseconds: TestDeadline.milliseconds) else { return }
            let result = buffer.withUnsafeMutableBytes { try? fd.read(into: $0) }
            guard case .done(let n)? = result else { if case .wouldBlock? = result { continue }; return }
            if n == 0 { return }
            data.append(contentsOf: buffer[0..<n])
            if head == nil, let range = String(decoding: data, as: UTF8.self).range(of: "\r\n\r\n") {
                let text = String(decoding: data, as: UTF8.self)
                head = String(text[..<range.lowerBound])
                bodyStart = text.utf8.distance(from: text.startIndex, to: range.upperBound)
                for line in head!.components(separatedBy: "\r\n") where line.lowercased().hasPrefix("content-length:") {
                    length = Int(line.dropFirst(15).trimmingCharacters(in: .whitespaces)) ?? 0
                }
            }
            if head != nil && data.count >= bodyStart + length { break }
        }
        let lines = head!.components(separatedBy: "\r\n")
        let requestLine = lines[0].split(separator: " ")
        let method = String(requestLine[0]), path = String(requestLine[1])
        let body = Array(data[bodyStart..<(bodyStart + length)])
        let authorization = lines.first { $0.lowercased().hasPrefix("authorization:") }.map { String($0.dropFirst(14)).trimmingCharacters(in: .whitespaces) }
        var reason: String? = nil
        do throws(ControlAuthError) {
            guard let authorization else { throw .missing }
            try signer.verify(try ControlAuthorization(header: authorization), direction: .gatewayToBroker, method: method,
                              path: path, body: body, replay: replay)
        } catch {
            reason = error.description
        }
        received.withLock { $0.append(Received(method: method, path: path, body: body, verified: reason)) }
        let answer: (Int, [UInt8])
        if reason != nil {
            answer = (401, Array("{\"error\":\"\(reason!)\"}".utf8))
        } else if path.hasSuffix("/register") {
            answer = (200, ControlJSON.encode(RegisterResponse(heartbeatIntervalSeconds: 1, offlineAfterSeconds: 3, keep: keep)))
        } else {
            answer = (204, [])
        }
        let reply = "HTTP/1.1 \(answer.0) X\r\nContent-Length: \(answer.1.count)\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        try? fd.writeAll(Array(reply.utf8) + answer.1)
    }
}

@Suite(.serialized, .offPool) struct GatewayBinaryControlTests {
    func writeKey(_ folder: TempFolder, _ key: ControlKey) throws -> String {
        let file = folder.file("enrollment.key")
        try (key.text + "\n").write(toFile: file, atomically: true, encoding: .utf8)
        return file
    }

    @Test func brokerSettingsAreStoredAndShownWithoutTheKey() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let key = ControlKey.generate()
        let keyFile = try writeKey(folder, key)
        let state = folder.file("state")
        let set = try GatewayBinary.run(["--state-dir", state, "--broker", "10.0.0.9:8080", "--gateway-id", "7",
                                         "--control-key-file", keyFile, "--port-range", "21000-21099"])
        #expect(set.status == 0, "\(set.stderr)")
        #expect(!set.stdout.contains(key.text) && !set.stderr.contains(key.text))
        #expect(StateFile.mode(state + "/control.key") == 0o600)

        let status = try GatewayBinary.run(["--state-dir", state, "--status"])
        #expect(status.status == 0, "\(status.stderr)")
        #expect(status.stdout.contains("broker:          http://10.0.0.9:8080"))
        #expect(status.stdout.contains("gateway id:      7"))
        #expect(status.stdout.contains("port range:      21000-21099"))
        #expect(status.stdout.contains("control key:     stored"))
        #expect(status.stdout.contains("daemon:          not running"))
        #expect(!status.stdout.contains(key.text) && !status.stderr.contains(key.text))
    }

    @Test(arguments: [
        (["--broker", "https://b:443", "--gateway-id", "7"], "--broker"),
        (["--broker", "b:notaport", "--gateway-id", "7"], "--broker"),
        (["--broker", "b:8080", "--gateway-id", "seven"], "--gateway-id"),
        (["--broker", "b:8080", "--gateway-id", "-1"], "--gateway-id"),
        (["--broker", "b:8080", "--gateway-id", "7"], "--control-key-file"),
        (["--port-range", "22000-20001"], "--port-range"),
        (["--port-range", "1-70000"], "--port-range"),
        (["--port-range", "abc"], "--port-range"),
    ])
    func badValuesExit2NamingTheFlag(arguments: [String], flag: String) throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let state = folder.file("state")
        let result = try GatewayBinary.run(["--state-dir", state] + arguments)
        #expect(result.status == 2, "\(arguments): \(result.stderr)")
        #expect(result.stderr.contains(flag), "\(arguments): \(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: state + "/gateway-state.json"), "a refused value was stored")
    }

    @Test func badKeyFileIsRefusedWithoutEchoingIt() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let file = folder.file("bad.key")
        try "SECRET-not-a-key-material".write(toFile: file, atomically: true, encoding: .utf8)
        let result = try GatewayBinary.run(["--state-dir", folder.file("state"), "--broker", "b:1", "--gateway-id", "3",
                                            "--control-key-file", file])
        #expect(result.status == 2)
        #expect(result.stderr.contains("--control-key-file"))
        #expect(!result.stderr.contains("SECRET"))
    }

    @Test func runningGatewayPicksUpANewBrokerAfterSIGHUP() async throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let key = ControlKey.generate()
        let signer = ControlSigner(gatewayID: 7, key: key)
        let first = try FakeBroker(signer: signer, keep: ["persisted"])
        let second = try FakeBroker(signer: signer, keep: [])
        defer { first.stop(); second.stop() }
        let keyFile = try writeKey(folder, key)
        let state = folder.file("state")
        let config = folder.file("gateway.conf")
        try """
        loops = 1
        public_address = 127.0.0.1
        desktop_networks = 127.0.0.0/8
        control_listen = 127.0.0.1:0
        drain_timeout = 1s
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let set = try GatewayBinary.run(["--state-dir", state, "--broker", "127.0.0.1:\(first.port)", "--gateway-id", "7",
                                         "--control-key-file", keyFile])
        #expect(set.status == 0, "\(set.stderr)")
        // A rule persisted by an earlier run: restored before registering.
        let echo = try TCPEcho()
        defer { echo.stop() }
        let restoredPort = try #require((20001...22000).shuffled().first { PortAllocator.bindProbe(on: IPAddress("127.0.0.1")!)($0, .tcp) })
        try RuleStore(directory: state).save([RuleState(id: "persisted", push: RulePush(protocol: .tcp, method: .randomPort,
                                                                                           target: "\(echo.address)", unusedExpirySeconds: 300),
                                                        port: restoredPort, created: ControlClock.unixSeconds())])

        let serve = try ChildProcess(GatewayBinary.path, ["serve", "--config", config, "--state-dir", state])
        defer { serve.stop() }

        try await offPool {
            #expect(eventually { !first.registrations.isEmpty }, "the gateway never registered with the first broker")
            let registration = try #require(first.registrations.first)
            #expect(registration.verified == nil, "\(registration.verified ?? "")")
            let request = try JSONDecoder().decode(RegisterRequest.self, from: Data(registration.body))
            #expect(request.gatewayID == 7)
            // TLS by default (issue 14): https, and the self-signed certificate made in the state directory.
            #expect(request.controlURL.hasPrefix("https://127.0.0.1:"))
            let made = try String(contentsOfFile: state + "/control-tls.crt", encoding: .utf8)
            #expect(request.controlCertificate == made)
            #expect(StateFile.mode(state + "/control-tls.key") == 0o600)
            #expect(request.portRange == PortRange(first: 20001, last: 22000))
            #expect(request.rules.map(\.id) == ["persisted"], "the persisted rule was not restored before registering")
            #expect(echoThrough(port: restoredPort) == "hello through the gateway")
            #expect(eventually { first.received.withLock { $0.contains { $0.path == "/v1/gateway-agent/heartbeat" && $0.verified == nil } } },
                    "no signed heartbeat reached the first broker")
            let status = try GatewayBinary.run(["--state-dir", state, "--status"])
            #expect(status.stdout.contains("daemon:          running"), "\(status.stdout)")
            #expect(eventually {
                (try? GatewayBinary.run(["--state-dir", state, "--status"]).stdout.contains("registration:    registered")) == true
            })

            // --broker with a running daemon: stored, then SIGHUP through the pid file.
            let change = try GatewayBinary.run(["--state-dir", state, "--broker", "127.0.0.1:\(second.port)", "--port-range", "21000-21999"])
            #expect(change.status == 0, "\(change.stderr)")
            #expect(change.stdout.contains("sent SIGHUP"), "\(change.stdout)")
            #expect(eventually { !second.registrations.isEmpty }, "the running gateway did not pick up the new broker")
            let moved = try #require(second.registrations.first)
            #expect(moved.verified == nil)
            let movedRequest = try JSONDecoder().decode(RegisterRequest.self, from: Data(moved.body))
            #expect(movedRequest.portRange == PortRange(first: 21000, last: 21999))
            #expect(movedRequest.rules.map(\.id) == ["persisted"])
            // The new broker does not keep it: reconciliation removes it.
            #expect(eventually { echoThrough(port: restoredPort) == nil })
            #expect(eventually {
                (try? GatewayBinary.run(["--state-dir", state, "--status"]).stdout.contains("broker:          http://127.0.0.1:\(second.port)")) == true
            })
            #expect(!serve.output.contains(key.text), "the key reached the log")
        }
        serve.signal(SIGTERM)
        #expect(serve.waitForExit() == 0, "\(serve.stderr)")
        #expect(!FileManager.default.fileExists(atPath: state + "/gateway.pid"))
    }

    @Test("a crash in the middle of a burst of pushes loses no acknowledged rule (the journal, issue 15)",
          arguments: ["each_change", "background"])
    func crashMidBurstKeepsAcknowledgedRules(rulesSync: String) throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let key = ControlKey.generate()
        let keyFile = try writeKey(folder, key)
        let state = folder.file("state")
        let port = TestPorts.free()
        let config = folder.file("gateway.conf")
        try """
        loops = 1
        public_address = 127.0.0.1
        desktop_networks = 127.0.0.0/8
        control_listen = 127.0.0.1:\(port)
        control_plain_http = yes
        drain_timeout = 1s
        rules_sync = \(rulesSync)
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let set = try GatewayBinary.run(["--state-dir", state, "--gateway-id", "7", "--control-key-file", keyFile])
        #expect(set.status == 0, "\(set.stderr)")
        let signer = ControlSigner(gatewayID: 7, key: key)
        let call: @Sendable (String, String, String) throws -> BlockingHTTP.Response = { method, path, body in
            let bytes = Array(body.utf8)
            return try BlockingHTTP.request(method: method, host: "127.0.0.1", port: port, path: path,
                                            headers: [("Authorization", signer.authorize(direction: .brokerToGateway, method: method, path: path, body: bytes)),
                                                      ("Content-Type", "application/json")],
                                            body: bytes, timeoutMilliseconds: 5000)
        }
        let first = try ChildProcess(GatewayBinary.path, ["serve", "--config", config, "--state-dir", state])
        defer { first.stop() }
        do {
            #expect(eventually { (try? call("GET", "/control/v1/rules", "").status) == 200 }, "the control endpoint never answered: \(first.output)")
            // Past the journal's compaction threshold (256 records), so a snapshot is written in the background meanwhile.
            let acknowledged = Mutex<[String]>([])
            let pusher = Thread {
                for index in 0..<2000 {
                    let id = String(format: "burst%04d", index)
                    guard let answer = try? call("PUT", "/control/v1/rules/\(id)", #"{"protocol":"tcp","method":0,"target":"127.0.0.1:9"}"#) else { return }
                    if answer.status == 200 || answer.status == 201 { acknowledged.withLock { $0.append(id) } }
                }
            }
            pusher.start()
            #expect(eventually { acknowledged.withLock { $0.count } >= 400 }, "the burst did not get going")
            first.signal(SIGKILL)
            #expect(first.waitForExit() != nil)
            #expect(eventually { pusher.isFinished }, "the pusher did not stop after the kill")
            let acked = acknowledged.withLock { $0 }

            let serve = try ChildProcess(GatewayBinary.path, ["serve", "--config", config, "--state-dir", state])
            defer { serve.stop() }
            var listed: [String] = []
            #expect(eventually {
                guard let answer = try? call("GET", "/control/v1/rules", ""), answer.status == 200,
                      let array = try? JSONSerialization.jsonObject(with: Data(answer.body)) as? [[String: Any]] else { return false }
                listed = array.compactMap { $0["id"] as? String }
                return true
            }, "the restarted gateway never answered: \(serve.output)")
            let missing = Set(acked).subtracting(listed)
            #expect(missing.isEmpty, "\(missing.count) acknowledged rule(s) lost in the crash, e.g. \(missing.sorted().prefix(3))")
            #expect(Set(listed).count == listed.count, "a rule is listed twice")
            #expect(listed.count <= acked.count + 1, "more rules than acknowledged (+1 in flight): \(listed.count) against \(acked.count)")
            let journals = (try FileManager.default.contentsOfDirectory(atPath: state)).filter { $0.hasPrefix("rules.journal.") }
            #expect(!journals.isEmpty)
        }
    }
}
