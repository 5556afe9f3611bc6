import Testing
@testable import Relay
import SystemLayer
import TestSupport

/// Each fault the relay must survive, with real sockets on loopback.
@Suite("Relay faults", .serialized, .offPool)
struct RelayFaultTests {
    @Test("a target that refuses: the client is reset at once and the failure counted")
    func targetRefuses() throws {
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        let closedPort = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "refused", listen: listen, target: closedPort)])
        let client = try TestClient.connect(listen)
        defer { client.close() }
        #expect(client.read() == .reset)
        #expect(eventually { engine.stats().connectRefused == 1 && engine.stats().active == 0 })
    }

    @Test("a target that never answers: the connect times out, the client is reset")
    func targetNeverAnswers() throws {
        // A listener whose accept queue is full drops further SYNs, so a
        // connect to it hangs, all on loopback.
        let blackhole = try TestListener(backlog: 0)
        defer { blackhole.close() }
        var fillers: [FileDescriptor] = []
        defer { fillers.forEach { $0.close() } }
        for _ in 0..<4 {
            let fd = try Socket.makeTCP(family: blackhole.address.family)
            _ = try? Socket.connect(fd, to: blackhole.address)
            fillers.append(fd)
        }
        // The accept queue is full once a filler's handshake has completed.
        #expect(eventually { fillers.contains { BlockingWait.writable($0, timeoutMilliseconds: 0) && Socket.pendingError($0) == nil } })
        let engine = try makeEngine { $0.connectTimeoutNanoseconds = 300_000_000 }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "slow", listen: listen, target: blackhole.address)])
        let client = try TestClient.connect(listen)
        defer { client.close() }
        #expect(client.read() == .reset)
        #expect(eventually { engine.stats().connectTimedOut == 1 && engine.stats().active == 0 })
    }

    @Test("a target that resets mid-stream: the client gets the bytes before it, then a reset")
    func targetResetsMidStream() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "rst", listen: listen, target: target.address)])
        let client = try TestClient.connect(listen)
        defer { client.close() }
        let upstream = try #require(target.accept())
        let payload = randomBytes(10_000)
        try upstream.send(payload)
        #expect(client.readExactly(payload.count) == payload)
        upstream.reset()
        #expect(client.read() == .reset)
        #expect(eventually { engine.stats().active == 0 && engine.stats().resets == 1 })
    }

    @Test("a client that vanishes: the target is reset and nothing is left behind")
    func clientVanishes() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "gone", listen: listen, target: target.address)])
        let client = try TestClient.connect(listen)
        let upstream = try #require(target.accept())
        defer { upstream.close() }
        try client.send([42])
        #expect(upstream.readExactly(1) == [42])
        client.reset()
        #expect(upstream.read() == .reset)
        #expect(eventually { engine.stats().active == 0 })
        #expect(engine.stats().pipesOpen <= engine.settings.idlePipesPerLoop * engine.settings.loops)
    }

    @Test("a client that closes before the target answers does not leak the connection")
    func clientGoneDuringConnect() throws {
        let blackhole = try TestListener(backlog: 0)
        defer { blackhole.close() }
        var fillers: [FileDescriptor] = []
        defer { fillers.forEach { $0.close() } }
        for _ in 0..<4 {
            let fd = try Socket.makeTCP(family: blackhole.address.family)
            _ = try? Socket.connect(fd, to: blackhole.address)
            fillers.append(fd)
        }
        let engine = try makeEngine { $0.connectTimeoutNanoseconds = 30_000_000_000 }
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "slow", listen: listen, target: blackhole.address)])
        let client = try TestClient.connect(listen)
        #expect(eventually { engine.stats().active == 1 })
        client.reset()
        #expect(eventually { engine.stats().active == 0 })
    }

    @Test("a reader that never reads: the sender is held back and memory stays bounded")
    func readerThatNeverReads() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let listen = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "stuck", listen: listen, target: target.address)])
        let client = try TestClient.connect(listen)
        defer { client.close() }
        let upstream = try #require(target.accept())
        defer { upstream.close() }
        let residentBefore = ProcessResources.residentBytes()
        // Write without ever reading on the far side until the client's
        // socket stays full: backpressure reached the client.
        let chunk = [UInt8](repeating: 7, count: 65536)
        var written = 0
        var stalls = 0
        while stalls < 20 && written < 512 << 20 {
            let result = try chunk.withUnsafeBytes { raw in try client.fd.write(raw) }
            switch result {
            case .done(let n): written += n; stalls = 0
            case .wouldBlock: stalls += 1; BlockingWait.writable(client.fd, timeoutMilliseconds: 50)
            }
        }
        // Socket buffers on loopback autotune to a few MB each; the relay adds
        // at most one pipe per direction. Anything near 512 MB would mean the
        // relay kept reading without bound.
        #expect(written < 96 << 20, "the sender was never held back: \(written) bytes accepted")
        #expect(engine.stats().pipesOpen <= 2)
        let growth = ProcessResources.residentBytes() - residentBefore
        #expect(growth < 64 << 20, "resident memory grew by \(growth) bytes")
        // And the stream is intact once the reader reads.
        var received = 0
        while received < written {
            guard case .data(let bytes) = upstream.read() else { break }
            #expect(bytes.allSatisfy { $0 == 7 })
            received += bytes.count
        }
        #expect(received == written)
    }

    @Test("listen port already in use: a clear error and nothing changes")
    func portInUse() throws {
        let holder = try TestListener()
        defer { holder.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let good = TestPorts.freeAddress()
        try engine.apply([RelayRule(id: "good", listen: good, target: holder.address)])
        let other = TestPorts.freeAddress()
        #expect {
            try engine.apply([
                RelayRule(id: "good", listen: good, target: holder.address),
                RelayRule(id: "new", listen: other, target: holder.address),
                RelayRule(id: "taken", listen: holder.address, target: other),
            ])
        } throws: { error in
            guard let error = error as? RuleError, case .listenFailed(let rule, _, let cause) = error else { return false }
            return rule == "taken" && cause.errno == .addressInUse && "\(error)".contains("already in use")
        }
        // Nothing was half-applied: the old rule set stands, the new listener is not open.
        #expect(engine.rules.map(\.id) == ["good"])
        #expect(throws: Errno.self) { try TestClient.connect(other) }
        let client = try TestClient.connect(good)
        client.close()
    }

    @Test("a port another socket holds with SO_REUSEPORT is refused by the engine's probe, not shared; unless the caller has just probed it free (the gateway's allocator)")
    func reusePortHolderRefused() throws {
        let holder = try Socket.listen(on: TestPorts.freeAddress(), reusePort: true)
        defer { holder.close() }
        let held = try #require(Socket.localAddress(holder))
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        #expect {
            try engine.change(upserting: [RelayRule(id: "shared", listen: held, target: target.address)])
        } throws: { error in
            guard let error = error as? RuleError, case .listenFailed(let rule, _, let cause) = error else { return false }
            return rule == "shared" && cause.errno == .addressInUse
        }
        #expect(engine.rules.isEmpty)
        // A caller that says it probed the address free is trusted: the listener opens beside the holder.
        try engine.change(upserting: [RelayRule(id: "shared", listen: held, target: target.address)], probedFree: [held])
        #expect(engine.rules.map(\.id) == ["shared"])
    }
}
