import Foundation
import Testing
import SystemLayer
import TestSupport

/// These tests start the built `leostream-gateway` binary and talk to it over
/// real loopback sockets.
@Suite("leostream-gateway binary", .serialized, .offPool)
struct GatewayBinaryTests {
    func config(forwards: [(String, UInt16, SocketAddress)], extra: String = "") -> String {
        var text = "loops = 2\nlog_level = info\n\(extra)\n"
        for (name, port, target) in forwards {
            text += "[forward \(name)]\nlisten = 127.0.0.1:\(port)\ntarget = \(target)\n"
        }
        return text
    }

    @Test("--help documents serve, --check and --config")
    func help() throws {
        let result = try GatewayProcess.run(["--help"])
        #expect(result.status == 0)
        for word in ["serve", "--check", "--config", "SIGTERM", "SIGHUP"] {
            #expect(result.stdout.contains(word), "--help lacks \(word)")
        }
        let serve = try GatewayProcess.run(["serve", "--help"])
        #expect(serve.status == 0 && serve.stdout.contains("--config"))
    }

    @Test("--check accepts the shipped example config")
    func checkExample() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let example = root.appendingPathComponent("Config/gateway.example.conf").path
        let result = try GatewayProcess.run(["--check", "--config", example])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("OK: 1 forward(s)"))
    }

    @Test("--check names the file, line and reason of a malformed config and exits 2",
          arguments: [
            ("max_connections = lots\n", 1, "max_connections"),
            ("[forward a]\nlisten = 127.0.0.1:7000\n", 1, "needs `target"),
            ("[forward a]\nlisten = nowhere\ntarget = 127.0.0.1:1\n", 2, "listen"),
            ("[forward a]\nlisten = 127.0.0.1:7000\ntarget = 127.0.0.1:1\ncolour = blue\n", 4, "unknown setting \"colour\""),
            ("[forward a]\nlisten = 127.0.0.1:7000\ntarget = 127.0.0.1:1\nallow = 10.0.0.0/33\n", 4, "allow"),
            ("[forward a]\nlisten = 127.0.0.1:7000\ntarget = 127.0.0.1:1\n[forward a]\n", 4, "already defined"),
            ("[listener x]\n", 1, "unknown section"),
          ])
    func checkMalformed(text: String, line: Int, reason: String) throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let file = dir.write("bad.conf", text)
        let result = try GatewayProcess.run(["--check", "--config", file])
        #expect(result.status == 2)
        #expect(result.stderr.contains("\(file):\(line):"), "stderr: \(result.stderr)")
        #expect(result.stderr.contains(reason), "stderr: \(result.stderr)")
    }

    @Test("serve with a malformed config starts nothing and exits 2")
    func serveMalformed() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let port = TestPorts.free()
        let file = dir.write("bad.conf", "[forward ok]\nlisten = 127.0.0.1:\(port)\ntarget = 127.0.0.1:9\n[forward broken]\nlisten = 127.0.0.1:1\n")
        let result = try GatewayProcess.run(["serve", "--config", file])
        #expect(result.status == 2)
        #expect(result.stderr.contains("\(file):4:"))
        #expect(throws: Errno.self) { try EchoClient.connect(SocketAddress(ip: .v4(0x7f00_0001), port: port)) }
    }

    @Test("serve on a port already in use fails with a clear error")
    func portInUse() throws {
        let holder = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        defer { holder.close() }
        let taken = Socket.localAddress(holder)!
        let dir = TempDir()
        defer { dir.cleanup() }
        let file = dir.write("gw.conf", config(forwards: [("taken", taken.port, SocketAddress("127.0.0.1:9")!)]))
        let result = try GatewayProcess.run(["serve", "--config", file])
        #expect(result.status == 1)
        #expect(result.stderr.contains("127.0.0.1:\(taken.port)") && result.stderr.contains("already in use"), "stderr: \(result.stderr)")
    }

    @Test("a tcp+udp forward relays TCP and UDP on one port number, before and after SIGHUP")
    func tcpAndUDP() throws {
        var target: (EchoServer, UDPEchoServer)?
        for _ in 0..<20 where target == nil {
            let tcp = try EchoServer()
            if let udp = try? UDPEchoServer(port: tcp.address.port) { target = (tcp, udp) } else { tcp.stop() }
        }
        let (echo, udpEcho) = try #require(target)
        defer { echo.stop() }
        defer { udpEcho.stop() }
        let dir = TempDir()
        defer { dir.cleanup() }
        let port = TestPorts.free()
        let text = config(forwards: [("both", port, echo.address)]) + "protocol = tcp+udp\nudp_idle_timeout = 30s\n"
        let file = dir.write("gw.conf", text)
        let check = try GatewayProcess.run(["--check", "--config", file])
        #expect(check.status == 0, "\(check.stderr)")
        let gateway = try GatewayProcess.start(["serve", "--config", file])
        defer { gateway.stop() }
        #expect(gateway.waitForLog("ready"))
        let relay = SocketAddress(ip: .v4(0x7f00_0001), port: port)
        let session = try EchoClient.connect(relay)
        defer { session.close() }
        #expect(session.roundTrip("over tcp") == "over tcp")
        #expect(try udpRoundTrip("over udp", via: relay) == "over udp")
        gateway.signal(SIGHUP)
        #expect(gateway.waitForLog("config reloaded"))
        #expect(try udpRoundTrip("udp after reload", via: relay) == "udp after reload")
        #expect(session.roundTrip("tcp after reload") == "tcp after reload")
    }

    @Test("SIGHUP reloads forwards without dropping a session; a bad reload changes nothing")
    func reload() throws {
        let echo = try EchoServer()
        defer { echo.stop() }
        let dir = TempDir()
        defer { dir.cleanup() }
        let a = TestPorts.free(), b = TestPorts.free()
        let file = dir.write("gw.conf", config(forwards: [("a", a, echo.address)]))
        let gateway = try GatewayProcess.start(["serve", "--config", file])
        defer { gateway.stop() }
        #expect(gateway.waitForLog("ready"))
        let session = try EchoClient.connect(SocketAddress(ip: .v4(0x7f00_0001), port: a))
        defer { session.close() }
        #expect(session.roundTrip("before") == "before")

        // Replace forward a by forward b.
        _ = dir.write("gw.conf", config(forwards: [("b", b, echo.address)]))
        gateway.signal(SIGHUP)
        #expect(gateway.waitForLog("config reloaded"))
        #expect(session.roundTrip("after reload") == "after reload", "the live session was dropped")
        let viaB = try EchoClient.connect(SocketAddress(ip: .v4(0x7f00_0001), port: b))
        #expect(viaB.roundTrip("new forward") == "new forward")
        viaB.close()
        #expect(throws: Errno.self) { try EchoClient.connect(SocketAddress(ip: .v4(0x7f00_0001), port: a)) }

        // A broken config: reported, nothing changes.
        _ = dir.write("gw.conf", "[forward b]\nlisten = 127.0.0.1:\(b)\n")
        gateway.signal(SIGHUP)
        #expect(gateway.waitForLog("config not reloaded"))
        #expect(gateway.log.contains("gw.conf:1:"))
        #expect(session.roundTrip("still here") == "still here")
        let again = try EchoClient.connect(SocketAddress(ip: .v4(0x7f00_0001), port: b))
        #expect(again.roundTrip("b still works") == "b still works")
        again.close()
    }

    @Test("SIGTERM stops accepting at once, lets live sessions finish, then exits 0")
    func drain() throws {
        let echo = try EchoServer()
        defer { echo.stop() }
        let dir = TempDir()
        defer { dir.cleanup() }
        let port = TestPorts.free()
        let file = dir.write("gw.conf", config(forwards: [("d", port, echo.address)], extra: "drain_timeout = 60s"))
        let gateway = try GatewayProcess.start(["serve", "--config", file])
        defer { gateway.stop() }
        #expect(gateway.waitForLog("ready"))
        let address = SocketAddress(ip: .v4(0x7f00_0001), port: port)
        let session = try EchoClient.connect(address)
        #expect(session.roundTrip("hello") == "hello")
        gateway.signal(SIGTERM)
        #expect(gateway.waitForLog("draining 1 session"))
        #expect(throws: Errno.self) { try EchoClient.connect(address) }
        #expect(session.roundTrip("during drain") == "during drain")
        #expect(gateway.process.isRunning)
        session.close()
        // The last session closed: the gateway exits well before drain_timeout.
        #expect(gateway.waitForExit() == 0)
        #expect(gateway.log.contains("0 session(s) closed at the deadline"))
    }

    @Test("SIGTERM drain resets sessions still open at drain_timeout")
    func drainDeadline() throws {
        let echo = try EchoServer()
        defer { echo.stop() }
        let dir = TempDir()
        defer { dir.cleanup() }
        let port = TestPorts.free()
        let file = dir.write("gw.conf", config(forwards: [("d", port, echo.address)], extra: "drain_timeout = 500ms"))
        let gateway = try GatewayProcess.start(["serve", "--config", file])
        defer { gateway.stop() }
        #expect(gateway.waitForLog("ready"))
        let session = try EchoClient.connect(SocketAddress(ip: .v4(0x7f00_0001), port: port))
        defer { session.close() }
        #expect(session.roundTrip("x") == "x")
        gateway.signal(SIGTERM)
        #expect(gateway.waitForExit() == 0)
        #expect(gateway.log.contains("1 session(s) closed at the deadline"))
        #expect(session.isClosed())
    }

    @Test("out of file descriptors: new clients are refused without a busy loop, and service recovers")
    func descriptorExhaustion() throws {
        let echo = try EchoServer()
        defer { echo.stop() }
        let dir = TempDir()
        defer { dir.cleanup() }
        let port = TestPorts.free()
        let file = dir.write("gw.conf", config(forwards: [("fd", port, echo.address)], extra: "max_pipes = 4"))
        // 64 descriptors: the runtime, epoll, eventfds and listeners take some;
        // each relayed session takes two.
        let gateway = try GatewayProcess.start(["serve", "--config", file], prefix: ["/usr/bin/prlimit", "--nofile=64:64", "--"])
        defer { gateway.stop() }
        #expect(gateway.waitForLog("ready"))
        let address = SocketAddress(ip: .v4(0x7f00_0001), port: port)
        var sessions: [EchoClient] = []
        var refused = 0
        for i in 0..<40 {
            let client = try EchoClient.connect(address)
            if client.roundTrip("s\(i)") == "s\(i)" { sessions.append(client) } else { refused += 1; client.close() }
        }
        #expect(sessions.count >= 10, "only \(sessions.count) sessions fit")
        #expect(refused > 0, "the descriptor limit was never reached")
        #expect(gateway.waitForLog("out of file descriptors"))

        // At the limit, with clients still knocking, the gateway must not spin.
        // (A busy loop would burn about one CPU-second per second.)
        let before = gateway.cpuTicks
        for _ in 0..<5 {
            if let knock = try? EchoClient.connect(address) {
                #expect(knock.roundTrip("x", milliseconds: 200) == nil)
                knock.close()
            }
        }
        usleep(1_000_000)
        let used = gateway.cpuTicks - before
        let ticksPerSecond = Int(sysconf(Int32(_SC_CLK_TCK)))
        #expect(used < ticksPerSecond / 2, "the gateway used \(used) ticks in about 1 s at the descriptor limit")

        // Established sessions keep working.
        for (i, session) in sessions.enumerated() { #expect(session.roundTrip("again\(i)") == "again\(i)") }
        // Freeing descriptors brings service back.
        sessions.forEach { $0.close() }
        #expect(eventually {
            guard let client = try? EchoClient.connect(address) else { return false }
            defer { client.close() }
            return client.roundTrip("back") == "back"
        })
    }
}
