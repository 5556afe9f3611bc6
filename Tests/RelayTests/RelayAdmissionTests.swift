import Testing
@testable import Relay
import SystemLayer
import TestSupport

@Suite("Admission and rules", .serialized, .offPool)
struct RelayAdmissionTests {
    @Test("the listener limit refuses the next client at once and leaves the others working")
    func listenerLimit() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "limited", listen: listen, target: target.address, maxConnections: 5)])
        var sessions: [(TestClient, TestClient)] = []
        for _ in 0..<5 {
            let client = try TestClient.connect(listen)
            sessions.append((client, try #require(target.accept())))
        }
        #expect(eventually { engine.stats().active == 5 })
        let extra = try TestClient.connect(listen)
        #expect(extra.read() == .reset)
        extra.close()
        // The refused client never reached the target.
        #expect(target.accept(milliseconds: 200) == nil)
        #expect(engine.stats().refused[.listenerLimit] == 1)
        for (client, upstream) in sessions {
            try client.send([9])
            #expect(upstream.readExactly(1) == [9])
        }
        // Freeing one slot admits a new client.
        sessions[0].0.close()
        sessions[0].1.close()
        #expect(eventually { engine.stats().active == 4 })
        let next = try TestClient.connect(listen)
        #expect(target.accept() != nil)
        next.close()
        for (client, upstream) in sessions.dropFirst() { client.close(); upstream.close() }
    }

    @Test("the global limit applies across listeners")
    func globalLimit() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine { $0.maxConnections = 3 }
        defer { engine.shutdown() }
        let a = TestPorts.freeAddress(), b = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "a", listen: a, target: target.address),
                          RelayRule(id: "b", listen: b, target: target.address)])
        var open: [TestClient] = []
        for address in [a, b, a] {
            open.append(try TestClient.connect(address))
            open.append(try #require(target.accept()))
        }
        #expect(eventually { engine.stats().active == 3 })
        let refused = try TestClient.connect(b)
        #expect(refused.read() == .reset)
        refused.close()
        #expect(engine.stats().refused[.globalLimit] == 1)
        open.forEach { $0.close() }
    }

    @Test("a client outside the allow-list is refused; a more specific rule wins")
    func allowLists() throws {
        let wide = try TestListener(), narrow = try TestListener()
        defer { wide.close(); narrow.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([
            RelayRule(id: "wide", listen: listen, allow: [CIDR("127.0.0.0/8")!], target: wide.address),
            RelayRule(id: "narrow", listen: listen, allow: [CIDR("127.0.0.1/32")!], target: narrow.address),
        ])
        let client = try TestClient.connect(listen)
        #expect(narrow.accept() != nil)
        client.close()
        try engine.apply([RelayRule(id: "other", listen: listen, allow: [CIDR("10.0.0.0/8")!], target: wide.address)])
        let outsider = try TestClient.connect(listen)
        #expect(outsider.read() == .reset)
        outsider.close()
        #expect(engine.stats().refused[.notAllowed] == 1)
    }

    @Test("a rule change under load drops no session; removing a rule stops only new connections")
    func ruleChangeUnderLoad() throws {
        let server = try PayloadServer()
        defer { server.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let first = TestPorts.freeAddress(), second = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "first", listen: first, target: server.address)])
        let plans = (0..<200).map { _ in
            ClientPlan(upLength: UInt64.random(in: 100_000...400_000), downLength: UInt64.random(in: 100_000...400_000),
                       seed: UInt64.random(in: 1...UInt64.max))
        }
        var changed = false
        let outcomes = try ClientDriver.run(plans, to: first, timeoutSeconds: 120) {
            guard engine.stats().active == 200 else { return false }
            // All 200 sessions are open: swap the rule set underneath them.
            try! engine.apply([RelayRule(id: "second", listen: second, target: server.address)])
            changed = true
            return true
        }
        #expect(changed)
        #expect(eventually { server.resultCount == plans.count })
        for (i, outcome) in outcomes.enumerated() {
            #expect(outcome.finished && outcome.intact && outcome.error == nil, "session \(i) was disturbed: \(outcome)")
            #expect(server.result(UInt64(i))?.intact == true)
        }
        // The removed rule's port is closed; the new one works.
        #expect(throws: Errno.self) { try TestClient.connect(first) }
        let more = try ClientDriver.run([ClientPlan(upLength: 1000, downLength: 1000, seed: 5)], to: second)
        #expect(more[0].finished && more[0].intact)
    }

    @Test("revoking a rule closes its established connections and only those")
    func revoke() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let a = TestPorts.freeAddress(), b = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "a", listen: a, target: target.address),
                          RelayRule(id: "b", listen: b, target: target.address)])
        let clientA = try TestClient.connect(a)
        let upstreamA = try #require(target.accept())
        let clientB = try TestClient.connect(b)
        let upstreamB = try #require(target.accept())
        defer { [clientA, upstreamA, clientB, upstreamB].forEach { $0.close() } }
        #expect(eventually { engine.stats().established == 2 })
        #expect(engine.revoke(ruleID: "a") == 1)
        #expect(engine.revoke(ruleID: "missing") == nil)
        #expect(clientA.read() == .reset)
        try clientB.send([1])
        #expect(upstreamB.readExactly(1) == [1])
        #expect(engine.rules.map(\.id) == ["b"])
    }

    @Test("per-connection accounting reports client, target and bytes each way")
    func accounting() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "acct", listen: listen, target: target.address)])
        let client = try TestClient.connect(listen)
        let upstream = try #require(target.accept())
        defer { client.close(); upstream.close() }
        try client.send(randomBytes(1234))
        _ = upstream.readExactly(1234)
        try upstream.send(randomBytes(99))
        _ = client.readExactly(99)
        let info = try #require(engine.connections().first)
        #expect(info.rule == "acct")
        #expect(info.target == target.address)
        #expect(info.client.ip == IPAddress("127.0.0.1"))
        #expect(info.bytesClientToTarget == 1234 && info.bytesTargetToClient == 99)
        #expect(info.established)
    }

    @Test("liveness: keepalive and TCP_USER_TIMEOUT are set on relayed sockets")
    func livenessOptions() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine { $0.liveness = Liveness(keepaliveIdle: 77, keepaliveInterval: 5, keepaliveCount: 3, userTimeoutMilliseconds: 45_000) }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "live", listen: listen, target: target.address)])
        let client = try TestClient.connect(listen)
        let upstream = try #require(target.accept())
        defer { client.close(); upstream.close() }
        // The relay's upstream socket is the peer of `upstream`: find it by
        // its port among this process's descriptors.
        #expect(eventually { engine.stats().established == 1 })
        // Both of the relay's sockets: the accepted one (local port = the
        // listen port; it inherits from the listener) and the upstream one.
        var accepted = false, outgoing = false
        // The upstream socket gets its settings livenessDelay (1 s) after establishment.
        #expect(eventually { scanLiveSockets(listen: listen).outgoing })
        for raw in Int32(3)..<Int32(4096) {
            let fd = FileDescriptor(rawValue: raw)
            guard let local = Socket.localAddress(fd), local.ip == IPAddress("127.0.0.1"),
                  Socket.intOption(fd, level: Socket.levelTCP, name: Socket.optionKeepIdle) == 77,
                  Socket.intOption(fd, level: Socket.levelSocket, name: Socket.optionAcceptConn) == 0 else { continue }
            #expect(Socket.intOption(fd, level: Socket.levelSocket, name: Socket.optionKeepAlive) == 1)
            #expect(Socket.intOption(fd, level: Socket.levelTCP, name: Socket.optionUserTimeout) == 45_000)
            #expect(Socket.intOption(fd, level: Socket.levelTCP, name: Socket.optionNoDelay) == 1)
            if local.port == listen.port { accepted = true } else { outgoing = true }
        }
        #expect(accepted && outgoing)
    }

    @Test("an idle timeout, when a rule sets one, closes a quiet session; none by default")
    func idleTimeout() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let quick = TestPorts.freeAddress(), forever = TestPorts.freeAddress()
        try engine.apply([
            RelayRule(id: "quick", listen: quick, target: target.address, idleTimeoutNanoseconds: 200_000_000),
            RelayRule(id: "forever", listen: forever, target: target.address),
        ])
        let patient = try TestClient.connect(forever)
        let patientUp = try #require(target.accept())
        let client = try TestClient.connect(quick)
        let upstream = try #require(target.accept())
        defer { [patient, patientUp, client, upstream].forEach { $0.close() } }
        #expect(client.read() == .eof)
        #expect(engine.stats().idleClosed == 1)
        // The session without an idle timeout is still there.
        try patient.send([1])
        #expect(patientUp.readExactly(1) == [1])
    }
}

/// Which of this process's sockets carry the test's keepalive settings.
func scanLiveSockets(listen: SocketAddress) -> (accepted: Bool, outgoing: Bool) {
    var accepted = false, outgoing = false
    for raw in Int32(3)..<Int32(4096) {
        let fd = FileDescriptor(rawValue: raw)
        guard let local = Socket.localAddress(fd), local.ip == IPAddress("127.0.0.1"),
              Socket.intOption(fd, level: Socket.levelTCP, name: Socket.optionKeepIdle) == 77,
              Socket.intOption(fd, level: Socket.levelSocket, name: Socket.optionAcceptConn) == 0 else { continue }
        if local.port == listen.port { accepted = true } else { outgoing = true }
    }
    return (accepted, outgoing)
}
