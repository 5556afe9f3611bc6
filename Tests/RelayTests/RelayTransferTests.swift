import Testing
@testable import Relay
import SystemLayer
import TestSupport

/// Real sockets on loopback: the relay must deliver every byte both ways,
/// in order, with half-closes in either order.
@Suite("Relay transfers", .serialized, .offPool)
struct RelayTransferTests {
    @Test("random payloads of random sizes both ways with half-closes arrive byte for byte",
          arguments: [1024, 0])
    func randomPayloads(maxPipes: Int) throws {
        // maxPipes 0 forces every byte through the memory-copy fallback.
        let server = try PayloadServer()
        defer { server.stop() }
        let engine = try makeEngine { $0.maxPipes = maxPipes }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "t", listen: listen, target: server.address)])

        var plans: [ClientPlan] = []
        for i in 0..<60 {
            // Mix empty, tiny, odd and multi-megabyte payloads.
            let sizes: [UInt64] = [0, 1, 17, 4095, 65537, 300_001, 3_000_000]
            plans.append(ClientPlan(upLength: sizes[i % sizes.count] &+ UInt64.random(in: 0...999) * UInt64(i % 2),
                                    downLength: sizes[(i / 2) % sizes.count] &+ UInt64.random(in: 0...999),
                                    seed: UInt64.random(in: 1...UInt64.max)))
        }
        let outcomes = try ClientDriver.run(plans, to: listen)
        // The server records a result when it reads the client's FIN, which
        // can come just after the client has finished.
        #expect(eventually { server.resultCount == plans.count })
        for (i, outcome) in outcomes.enumerated() {
            #expect(outcome.error == nil, "client \(i): \(String(describing: outcome.error))")
            #expect(outcome.finished && outcome.intact && outcome.received == plans[i].downLength,
                    "client \(i) down: got \(outcome.received) of \(plans[i].downLength), intact \(outcome.intact)")
            let result = server.result(UInt64(i))
            #expect(result == PayloadServer.Result(received: plans[i].upLength, intact: true),
                    "client \(i) up: server saw \(String(describing: result)), expected \(plans[i].upLength)")
        }
        #expect(eventually { engine.stats().active == 0 })
        let stats = engine.stats()
        #expect(stats.established == 60)
        #expect(stats.resets == 0)
        if maxPipes == 0 { #expect(stats.pipesOpen == 0 && stats.spliceFallbacks == 0) }
        let upTotal = plans.reduce(UInt64(0)) { $0 + $1.upLength + UInt64(PayloadHeader.size) }
        #expect(stats.bytesClientToTarget == Int(upTotal))
        #expect(stats.bytesTargetToClient == Int(plans.reduce(UInt64(0)) { $0 + $1.downLength }))
    }

    @Test("bytes followed at once by the sender's FIN arrive, and so does the FIN, both ways",
          arguments: [1024, 0])
    func bytesThenFinAtOnce(maxPipes: Int) throws {
        // A small read that takes everything proves the socket drained, so
        // the relay waits for the next edge instead of reading again; a FIN
        // that came with the bytes raises no edge of its own and must still
        // be seen. 64 rounds of each direction, small and odd sizes.
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine { $0.maxPipes = maxPipes }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "fin", listen: listen, target: target.address)])
        for round in 0..<64 {
            let up = randomBytes(1 + round * 37 % 700)
            let down = randomBytes(1 + round * 53 % 900)
            let client = try TestClient.connect(listen)
            defer { client.close() }
            guard let upstream = target.accept() else {
                Issue.record("round \(round): the relay did not connect to the target")
                return
            }
            defer { upstream.close() }
            // Client to target: bytes and FIN in one go.
            try client.send(up)
            client.shutdownWrite()
            let (gotUp, upEnd) = upstream.readToEnd()
            #expect(gotUp == up && upEnd == .eof, "round \(round) up: \(gotUp.count) of \(up.count) bytes, ended \(upEnd)")
            // Target to client, the same.
            try upstream.send(down)
            upstream.shutdownWrite()
            let (gotDown, downEnd) = client.readToEnd()
            #expect(gotDown == down && downEnd == .eof, "round \(round) down: \(gotDown.count) of \(down.count) bytes, ended \(downEnd)")
        }
        #expect(eventually { engine.stats().active == 0 })
        #expect(engine.stats().resets == 0)
    }

    @Test("1,000 concurrent relayed connections, all open at once, all intact")
    func thousandConcurrent() throws {
        let server = try PayloadServer()
        defer { server.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "many", listen: listen, target: server.address)])

        let plans = (0..<1000).map { _ in
            ClientPlan(upLength: UInt64.random(in: 0...20_000), downLength: UInt64.random(in: 0...20_000),
                       seed: UInt64.random(in: 1...UInt64.max))
        }
        var peakActive = 0
        let outcomes = try ClientDriver.run(plans, to: listen, timeoutSeconds: 120) {
            let active = engine.stats().active
            peakActive = max(peakActive, active)
            return active == 1000 && server.acceptedCount == 1000
        }
        #expect(peakActive == 1000)
        #expect(eventually { server.resultCount == plans.count })
        let failures = outcomes.enumerated().filter { i, o in
            !(o.finished && o.intact && o.error == nil && o.received == plans[i].downLength)
                || server.result(UInt64(i)) != PayloadServer.Result(received: plans[i].upLength, intact: true)
        }
        #expect(failures.isEmpty, "\(failures.count) connection(s) failed, first: \(String(describing: failures.first))")
        #expect(eventually { engine.stats().active == 0 })
        #expect(engine.stats().totalRefused == 0)
    }

    @Test("idle connections hold no pipe: pipes come from the pool only while bytes are in flight")
    func idleConnectionsHoldNoPipe() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine { $0.idlePipesPerLoop = 0 }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "idle", listen: listen, target: target.address)])
        var pairs: [(TestClient, TestClient)] = []
        for _ in 0..<50 {
            let client = try TestClient.connect(listen)
            let upstream = try #require(target.accept())
            try client.send([1, 2, 3])
            #expect(upstream.readExactly(3) == [1, 2, 3])
            try upstream.send([4, 5])
            #expect(client.readExactly(2) == [4, 5])
            pairs.append((client, upstream))
        }
        #expect(eventually { engine.stats().active == 50 })
        // Every byte was delivered, so every pipe went back (and, with no idle
        // pipes kept, was closed).
        #expect(eventually { engine.stats().pipesOpen == 0 })
        for (client, upstream) in pairs { client.close(); upstream.close() }
    }
}
