import Testing
@testable import Relay
import SystemLayer
import TestSupport

/// The UDP relay with real sockets on loopback.
@Suite("UDP relay", .serialized, .offPool)
struct RelayDatagramTests {
    func udpRule(_ id: String, _ listen: SocketAddress, _ target: SocketAddress, transport: Transport = .udp,
                 idle: UInt64 = 120_000_000_000, maxFlows: Int? = nil, sourcePorts: ClosedRange<UInt16>? = nil,
                 allow: [CIDR] = []) -> RelayRule {
        RelayRule(id: id, listen: listen, allow: allow, target: target, transport: transport,
                  udpIdleTimeoutNanoseconds: idle, maxFlows: maxFlows, sourcePorts: sourcePorts)
    }

    @Test("datagrams are relayed both ways, replies come from the address the client sent to, counters add up")
    func basic() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([udpRule("u", listen, echo.address)])
        let client = try DatagramClient()
        defer { client.close() }
        for size in [1, 100, 1200, 9000] {
            #expect(try client.echo(randomBytes(size), via: listen))
        }
        let flows = engine.flows()
        #expect(flows.count == 1)
        #expect(flows.first?.client == client.address)
        #expect(flows.first?.datagramsToTarget == 4 && flows.first?.bytesToTarget == 10_301)
        #expect(flows.first?.datagramsToClient == 4 && flows.first?.bytesToClient == 10_301)
        let stats = try #require(engine.datagramStats()["u"])
        #expect(stats.flowsActive == 1 && stats.flowsCreated == 1)
        #expect(stats.datagramsToTarget == 4 && stats.datagramsToClient == 4 && stats.bytesToClient == 10_301)
        #expect(stats.totalDrops == 0)
    }

    @Test("a wildcard listener answers from the address the client sent to")
    func wildcardSource() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let port = TestPorts.freeAddress().port
        try engine.apply([udpRule("w", SocketAddress(ip: .v4(0), port: port), echo.address)])
        let client = try DatagramClient()
        defer { client.close() }
        // 127.0.0.2 is a loopback address too; the reply must come from it, not 127.0.0.1.
        let other = SocketAddress(ip: IPAddress("127.0.0.2")!, port: port)
        try client.send([1, 2, 3], to: other)
        let reply = try #require(client.receive())
        #expect(reply.peer == other)
        #expect(reply.bytes == [1, 2, 3])
    }

    @Test("zero-length and 65,507-byte datagrams are relayed intact")
    func extremeSizes() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([udpRule("sizes", listen, echo.address)])
        let client = try DatagramClient()
        defer { client.close() }
        #expect(try client.echo([], via: listen))
        #expect(try client.echo(randomBytes(DatagramBatch.maxPayload), via: listen))
        #expect(try client.echo([7], via: listen))
    }

    @Test("1,000 concurrent flows: every datagram arrives intact and in order per flow")
    func thousandFlows() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let engine = try makeEngine { $0.udpReceiveBuffer = 4 << 20; $0.udpSendBuffer = 4 << 20 }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([udpRule("many", listen, echo.address)])
        let clients = try (0..<1000).map { _ in try DatagramClient() }
        defer { clients.forEach { $0.close() } }
        var nextExpected = [Int](repeating: 0, count: clients.count)
        var outOfOrder = 0, corrupt = 0
        for round in 0..<10 {
            for (i, client) in clients.enumerated() {
                var payload = [UInt8(i & 0xff), UInt8(i >> 8), UInt8(round)]
                payload += [UInt8](repeating: UInt8(truncatingIfNeeded: i &+ round), count: 50 + (i % 200))
                try client.send(payload, to: listen)
            }
            let deadline = MonotonicClock.nowNanoseconds + 5_000_000_000
            for (i, client) in clients.enumerated() {
                guard let reply = client.receive(milliseconds: remainingMilliseconds(until: deadline)) else { continue }
                let bytes = reply.bytes
                guard bytes.count == 53 + (i % 200), Int(bytes[0]) | Int(bytes[1]) << 8 == i,
                      bytes[3...].allSatisfy({ $0 == UInt8(truncatingIfNeeded: i &+ Int(bytes[2])) }) else {
                    corrupt += 1
                    continue
                }
                if Int(bytes[2]) != nextExpected[i] { outOfOrder += 1 }
                nextExpected[i] = Int(bytes[2]) + 1
            }
            if round == 0 { #expect(engine.flows().count == 1000) }
        }
        #expect(corrupt == 0)
        #expect(outOfOrder == 0)
        #expect(nextExpected.allSatisfy { $0 == 10 }, "\(nextExpected.filter { $0 != 10 }.count) flows lost datagrams")
        #expect(echo.senders.count == 1000)
        let stats = try #require(engine.datagramStats()["many"])
        #expect(stats.flowsCreated == 1000 && stats.datagramsToTarget == 10_000 && stats.datagramsToClient == 10_000)
    }

    @Test("idle flows expire after their rule's timeout; active ones stay")
    func expiry() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let quick = TestPorts.freeAddress(), slow = TestPorts.freeAddress()
        try engine.apply([udpRule("quick", quick, echo.address, idle: 300_000_000),
                          udpRule("slow", slow, echo.address)])
        let a = try DatagramClient(), b = try DatagramClient()
        defer { a.close(); b.close() }
        #expect(try a.echo([1], via: quick))
        #expect(try b.echo([2], via: slow))
        #expect(engine.flows().count == 2)
        #expect(eventually { engine.datagramStats()["quick"]?.flowsExpired == 1 })
        #expect(engine.flows().map(\.rule) == ["slow"])
        // A new datagram from the expired client opens a new flow.
        #expect(try a.echo([3], via: quick))
        #expect(engine.datagramStats()["quick"]?.flowsCreated == 2)
    }

    @Test("MaxFlows: a flood of new senders is refused and counted; existing flows keep working")
    func flowLimits() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let engine = try makeEngine { $0.maxFlows = 60 }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress(), other = TestPorts.freeAddress()
        try engine.apply([udpRule("limited", listen, echo.address, maxFlows: 50),
                          udpRule("other", other, echo.address)])
        let veteran = try DatagramClient()
        defer { veteran.close() }
        #expect(try veteran.echo([0xAA], via: listen))
        // A flood of 200 new source addresses.
        let flood = try (0..<200).map { _ in try DatagramClient() }
        defer { flood.forEach { $0.close() } }
        for client in flood { try client.send([1, 2, 3], to: listen) }
        var answered = 0
        // Every admitted sender is answered well within a second; after the
        // deadline, each remaining client is only polled.
        let deadline = MonotonicClock.nowNanoseconds + 1_000_000_000
        for client in flood where client.receive(milliseconds: remainingMilliseconds(until: deadline)) != nil {
            answered += 1
        }
        #expect(answered == 49, "the listener limit of 50 (one taken by the veteran) admitted \(answered)")
        #expect(engine.datagramStats()["limited"]?.drops[.flowLimit] == 151)
        #expect(try veteran.echo([0xBB], via: listen), "an existing flow stopped working")
        // The global limit (60) counts every listener.
        let more = try (0..<15).map { _ in try DatagramClient() }
        defer { more.forEach { $0.close() } }
        var admitted = 0
        for client in more where try client.echo([9], via: other, milliseconds: 300) { admitted += 1 }
        #expect(admitted == 10)
        #expect(engine.flowAdmission.global.active == 60)
    }

    @Test("fixed source port toward several targets; a second flow to the same target takes the next port")
    func fixedSourcePort() throws {
        let echo1 = try DatagramEchoServer(), echo2 = try DatagramEchoServer()
        defer { echo1.stop(); echo2.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let ports = TestPorts.freeBlock(2)
        let base = ports.lowerBound
        let toOne = TestPorts.freeAddress(), toTwo = TestPorts.freeAddress()
        try engine.apply([udpRule("one", toOne, echo1.address, sourcePorts: ports),
                          udpRule("two", toTwo, echo2.address, sourcePorts: ports)])
        let a = try DatagramClient(), b = try DatagramClient(), c = try DatagramClient(), d = try DatagramClient()
        defer { [a, b, c, d].forEach { $0.close() } }
        #expect(try a.echo(Array("a".utf8), via: toOne))
        #expect(try b.echo(Array("b".utf8), via: toTwo))
        // Both targets saw the same fixed source port; replies were told apart by the target's address.
        #expect(echo1.senders.keys.map(\.port) == [base])
        #expect(echo2.senders.keys.map(\.port) == [base])
        // Collaboration: a second flow to echo1 leaves from the next port.
        #expect(try c.echo(Array("c".utf8), via: toOne))
        #expect(Set(echo1.senders.keys.map(\.port)) == [base, base + 1])
        // Interleaved traffic still reaches the right clients.
        for round in 0..<20 {
            #expect(try a.echo([UInt8(round), 1], via: toOne))
            #expect(try c.echo([UInt8(round), 3], via: toOne))
            #expect(try b.echo([UInt8(round), 2], via: toTwo))
        }
        // The range is used up toward echo1: a third flow is refused and counted.
        try d.send([4], to: toOne)
        #expect(d.receive(milliseconds: 300) == nil)
        #expect(engine.datagramStats()["one"]?.drops[.sourcePortsExhausted] == 1)
        #expect(engine.sourcePorts.count == 3)
    }

    @Test("TCP and UDP on one port number at once")
    func bothOnOnePort() throws {
        let port = TestPorts.free()
        // The target's TCP listener and UDP echo share a port number too.
        var target: (TestListener, DatagramEchoServer)?
        for _ in 0..<20 where target == nil {
            let listener = try TestListener()
            if let echo = try? DatagramEchoServer(port: listener.address.port) { target = (listener, echo) } else { listener.close() }
        }
        let (tcpTarget, echo) = try #require(target)
        defer { tcpTarget.close() }
        defer { echo.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = SocketAddress(ip: .v4(0x7f00_0001), port: port)
        try engine.apply([udpRule("both", listen, tcpTarget.address, transport: .both)])
        let tcp = try TestClient.connect(listen)
        defer { tcp.close() }
        let upstream = try #require(tcpTarget.accept())
        defer { upstream.close() }
        let udp = try DatagramClient()
        defer { udp.close() }
        try tcp.send([1, 2, 3])
        #expect(upstream.readExactly(3) == [1, 2, 3])
        #expect(try udp.echo([4, 5, 6], via: listen))
        try upstream.send([7])
        #expect(tcp.readExactly(1) == [7])
    }

    @Test("an unreachable target, a removed rule and a sender no rule allows: dropped, counted, nothing breaks")
    func badInput() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let dead = TestPorts.freeAddress() // nobody listens: ICMP port unreachable
        let toDead = TestPorts.freeAddress(), toEcho = TestPorts.freeAddress()
        try engine.apply([udpRule("dead", toDead, dead),
                          udpRule("live", toEcho, echo.address),
                          udpRule("closed", TestPorts.freeAddress(), echo.address, allow: [CIDR("10.0.0.0/8")!])])
        let client = try DatagramClient()
        defer { client.close() }
        // Each datagram to the dead target brings an ICMP unreachable back.
        #expect(eventually {
            try? client.send([1], to: toDead)
            return (engine.datagramStats()["dead"]?.drops[.unreachable] ?? 0) >= 1
        })
        #expect(try client.echo([2], via: toEcho), "one unreachable target broke the relay")
        // A sender outside every allow-list.
        let closedPort = engine.rules.first { $0.id == "closed" }!.listen
        try client.send([3], to: closedPort)
        #expect(client.receive(milliseconds: 300) == nil)
        #expect(eventually { engine.datagramStats()[""]?.drops[.notAllowed] == 1 })
        // The rule is removed: its flows end, the port closes, the rest works.
        try engine.apply([udpRule("live", toEcho, echo.address)])
        #expect(engine.flows().map(\.rule) == ["live"])
        try client.send([4], to: toDead)
        _ = client.receive(milliseconds: 200)
        #expect(try client.echo([5], via: toEcho))
        #expect(engine.flowAdmission.global.active == 1)
    }

    @Test("a UDP port held by another socket: a clear error and nothing changes")
    func udpPortInUse() throws {
        let holder = try DatagramClient()
        defer { holder.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let good = TestPorts.freeAddress()
        try engine.apply([udpRule("good", good, echo.address)])
        #expect {
            try engine.apply([udpRule("good", good, echo.address), udpRule("taken", holder.address, echo.address)])
        } throws: { error in
            guard let error = error as? RuleError, case .listenFailed(let rule, _, let cause) = error else { return false }
            return rule == "taken" && cause.errno == .addressInUse
        }
        #expect(engine.rules.map(\.id) == ["good"])
        let client = try DatagramClient()
        defer { client.close() }
        #expect(try client.echo([7], via: good))
    }

    @Test("bursts of one flow, equal sizes and a shorter tail, arrive whole and in order with and without GSO sends",
          arguments: [true, false])
    func bursts(segmentation: Bool) throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let engine = try makeEngine { $0.udpSegmentation = segmentation }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([udpRule("burst", listen, echo.address)])
        let client = try DatagramClient()
        defer { client.close() }
        // 3 bursts of 200: 1,200-byte datagrams, every tenth one shorter,
        // and one of 1,472 bytes (above the GSO segment limit) now and then.
        var sent: [[UInt8]] = []
        for burst in 0..<3 {
            for i in 0..<200 {
                let size = i % 37 == 36 ? 1472 : (i % 10 == 9 ? 100 + i : 1200)
                var payload = [UInt8](repeating: UInt8(truncatingIfNeeded: i &* 7 &+ burst), count: size)
                payload[0] = UInt8(burst); payload[1] = UInt8(i & 0xff); payload[2] = UInt8(i >> 8)
                sent.append(payload)
                try client.send(payload, to: listen)
            }
        }
        var received: [[UInt8]] = []
        let deadline = MonotonicClock.nowNanoseconds + 5_000_000_000
        while received.count < sent.count, let reply = client.receive(milliseconds: remainingMilliseconds(until: deadline)) {
            #expect(reply.peer == listen)
            received.append(reply.bytes)
        }
        #expect(received.count == sent.count)
        #expect(received == sent, "datagrams were cut, merged or reordered")
        let stats = try #require(engine.datagramStats()["burst"])
        #expect(stats.datagramsToTarget == 600 && stats.datagramsToClient == 600 && stats.totalDrops == 0)
        #expect(stats.bytesToTarget == sent.reduce(0) { $0 + $1.count })
    }

    @Test("a client that vanished: replies to it meet ICMP unreachable; the listener and other flows carry on")
    func vanishedClient() throws {
        // The target is a plain socket driven by the test, so it can keep
        // answering after the client has gone.
        let target = try DatagramClient()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([udpRule("v", listen, target.address)])
        let gone = try DatagramClient()
        try gone.send([1], to: listen)
        let first = try #require(target.receive())
        let flowAddress = try #require(first.peer)
        gone.close()
        // Replies to the closed port: the kernel answers each with ICMP port
        // unreachable toward the relay's listening socket.
        for i in 0..<20 { try target.send([UInt8(i)], to: flowAddress) }
        #expect(eventually { (engine.datagramStats()["v"]?.datagramsToClient ?? 0) + (engine.datagramStats()["v"]?.totalDrops ?? 0) >= 20 })
        // Another client is relayed both ways as before.
        let stay = try DatagramClient()
        defer { stay.close() }
        for i in 0..<5 {
            try stay.send([UInt8(100 + i)], to: listen)
            let got = try #require(target.receive())
            #expect(got.bytes == [UInt8(100 + i)])
            try target.send([UInt8(200 + i)], to: try #require(got.peer))
            #expect(stay.receive()?.bytes == [UInt8(200 + i)], "round \(i)")
        }
        #expect(engine.flows().count == 2)
    }
}
