import Testing
@testable import Relay
import SystemLayer
import TestSupport

/// The relay's half of the hot upgrade, inside one process: engine A
/// suspends with bytes in flight, every descriptor crosses a real Unix
/// socket (SCM_RIGHTS), engine B adopts them and the streams carry on.
@Suite("Relay handover", .serialized, .offPool)
struct RelayHandoverTests {
    /// Sends every handed socket over a SOCK_SEQPACKET pair, as the upgrade
    /// does, and returns what arrived (fresh descriptors); ours are closed
    /// by `releaseAfterHandover`, as in the predecessor.
    private func passThroughSocket(_ handed: [HandedSocket]) throws -> [HandedSocket] {
        let (a, b) = try MessageSocket.pair()
        defer { a.close(); b.close() }
        var received: [HandedSocket] = []
        for item in handed {
            try a.send(Array("x".utf8), descriptors: item.descriptors, timeoutMilliseconds: TestDeadline.milliseconds)
            let got = try #require(try b.receive(timeoutMilliseconds: TestDeadline.milliseconds))
            #expect(got.descriptors.count == item.descriptors.count)
            received.append(HandedSocket(record: item.record, descriptors: got.descriptors))
        }
        return received
    }

    /// A client's deterministic stream, written until the socket refuses
    /// more (the relay's buffers toward a target that does not read are full).
    private struct Sender {
        var stream: PayloadStream
        var pending: [UInt8] = []
        var sent = 0

        init(seed: UInt64) { stream = PayloadStream(seed: seed) }

        mutating func fill(_ client: TestClient, limit: Int) {
            while sent < limit {
                if pending.isEmpty {
                    pending = [UInt8](repeating: 0, count: 65536)
                    pending.withUnsafeMutableBytes { stream.fill($0) }
                }
                let result = pending.withUnsafeBytes { try? client.fd.write($0) }
                guard case .done(let n)? = result, n > 0 else { return }
                sent += n
                pending.removeFirst(n)
            }
        }
    }

    @Test("a connection with bytes in flight moves to another engine and delivers every byte",
          arguments: [1024, 0])
    func connectionMidTransfer(maxPipes: Int) throws {
        // maxPipes 0: the bytes in flight are in memory, not in a pipe.
        let target = try TestListener()
        defer { target.close() }
        // Small buffers at both ends, so that a few MiB fill the path up to
        // the relay's pipe (the test shares the machine with the others).
        Socket.setBufferSizes(target.fd, receive: 65536, send: 65536)
        let listen = TestPorts.freeAddress()
        let rule = RelayRule(id: "desk", listen: listen, target: target.address)
        let a = try makeEngine { $0.maxPipes = maxPipes; $0.pipeSize = 65536 }
        try a.apply([rule])
        let client = try TestClient.connect(listen)
        defer { client.close() }
        Socket.setBufferSizes(client.fd, receive: 65536, send: 65536)
        let upstream = try #require(target.accept())
        defer { upstream.close() }
        #expect(eventually { a.connections().first?.established == true })

        // The target reads nothing yet: the client's bytes pile up in the
        // kernel's buffers and in the relay's pipe (or memory).
        var sender = Sender(seed: 7)
        // Until the relay holds bytes it could not deliver yet: the kernel's
        // buffers on the way grow as they are used, so a pause in the
        // client's writes is not yet a full path; look, and fill again.
        var handed: [HandedSocket] = []
        for _ in 0..<100 {
            sender.fill(client, limit: sender.sent + (1 << 20))
            BlockingWait.writable(client.fd, timeoutMilliseconds: 20)
            handed = try a.suspendForHandover()
            if handed.first(where: { $0.record.kind == .connection })?.record.connection?.toTarget.inFlight ?? 0 > 0 { break }
            a.resumeAfterHandover()
        }
        let record = try #require(handed.first { $0.record.kind == .connection }?.record.connection)
        #expect(record.established)
        #expect(record.toTarget.inFlight > 0, "the relay held no byte in flight; the test proves nothing")
        if maxPipes == 0 { #expect(record.toTarget.memory != nil) } else { #expect(record.toTarget.pipeCapacity != nil) }
        #expect(handed.filter { $0.record.kind == .tcpListener }.count == 2)

        let moved = try passThroughSocket(handed)
        a.releaseAfterHandover()

        let b = try makeEngine { $0.maxPipes = maxPipes }
        defer { b.shutdown() }
        #expect(b.inheritHandedListeners(moved).isEmpty)
        try b.apply([rule])
        #expect(b.discardUnclaimedHandedListeners().isEmpty)
        let report = b.adopt(moved)
        #expect(report == AdoptionReport(connections: 1, flows: 0, refused: []))

        // Everything the client sent reaches the target, in order; then a
        // reply goes back and both half-closes pass through.
        // The stream ends where the socket stopped taking bytes: the target
        // must get exactly the first `sent` bytes of it.
        client.shutdownWrite()
        let sent = sender.sent
        var check = PayloadStream(seed: 7)
        let (bytes, end) = upstream.readToEnd()
        #expect(end == .eof)
        #expect(bytes.count == sent, "the target got \(bytes.count) of \(sent) bytes")
        #expect(bytes.withUnsafeBytes { check.matches($0) }, "the bytes arrived altered or out of order")
        let reply = randomBytes(300_000)
        try upstream.send(reply)
        upstream.shutdownWrite()
        let (back, backEnd) = client.readToEnd()
        #expect(backEnd == .eof && back == reply)
        #expect(eventually { b.stats().active == 0 })
        #expect(b.stats().resets == 0)

        // The handed listener serves new clients from engine B.
        let second = try TestClient.connect(listen)
        defer { second.close() }
        let secondUp = try #require(target.accept())
        defer { secondUp.close() }
        try second.send([1, 2, 3])
        #expect(secondUp.readExactly(3) == [1, 2, 3])
        #expect(b.stats().accepted == 1)
    }

    @Test("a handover that does not happen resumes every connection as it was")
    func resumeAfterFailedHandover() throws {
        let target = try TestListener()
        defer { target.close() }
        let listen = TestPorts.freeAddress()
        let engine = try makeEngine()
        defer { engine.shutdown() }
        try engine.apply([RelayRule(id: "desk", listen: listen, target: target.address)])
        let client = try TestClient.connect(listen)
        defer { client.close() }
        let upstream = try #require(target.accept())
        defer { upstream.close() }
        var sender = Sender(seed: 9)
        sender.fill(client, limit: 16 << 20)

        let handed = try engine.suspendForHandover()
        #expect(handed.contains { $0.record.kind == .connection })
        // Rule changes wait for the outcome.
        #expect(throws: RuleError.self) { try engine.apply([]) }
        engine.resumeAfterHandover()

        // The stream ends where the socket stopped taking bytes: the target
        // must get exactly the first `sent` bytes of it.
        client.shutdownWrite()
        let sent = sender.sent
        var check = PayloadStream(seed: 9)
        let (bytes, end) = upstream.readToEnd()
        #expect(end == .eof && bytes.count == sent)
        #expect(bytes.withUnsafeBytes { check.matches($0) })
        // Still accepting, and rules change again.
        let second = try TestClient.connect(listen)
        second.close()
        try engine.apply([])
    }

    @Test("a UDP flow keeps its socket and source port across the handover")
    func udpFlow() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let listen = TestPorts.freeAddress()
        let rule = RelayRule(id: "udp", listen: listen, target: echo.address, transport: .udp)
        let a = try makeEngine()
        try a.apply([rule])
        let client = try DatagramClient()
        defer { client.close() }
        #expect(try client.echo([1, 2, 3], via: listen))
        let before = try #require(a.flows().first)

        let handed = try a.suspendForHandover()
        #expect(handed.filter { $0.record.kind == .flow }.count == 1)
        #expect(handed.filter { $0.record.kind == .udpListener }.count == 2)
        let moved = try passThroughSocket(handed)
        a.releaseAfterHandover()

        let b = try makeEngine()
        defer { b.shutdown() }
        _ = b.inheritHandedListeners(moved)
        try b.apply([rule])
        // A datagram arriving between the rules and the adoption waits for
        // its flow (read earlier, it would open a second one).
        try client.send([4, 5, 6], to: listen)
        #expect(b.adopt(moved) == AdoptionReport(connections: 0, flows: 1, refused: []))
        #expect(client.receive()?.bytes == [4, 5, 6])
        #expect(try client.echo([7, 8, 9], via: listen))
        #expect(b.flows().count == 1)
        let after = try #require(b.flows().first)
        #expect(after.sourcePort == before.sourcePort)
        #expect(after.datagramsToTarget == 3 && after.datagramsToClient == 3)
        // The echo server saw one sender: the same flow, not a new one.
        #expect(echo.senders.count == 1)
    }

    @Test("rules that inspect or route connections are not handed over")
    func inspectingRulesRefused() throws {
        let engine = try makeEngine()
        defer { engine.shutdown() }
        var rule = RelayRule(id: "sg", listen: TestPorts.freeAddress(), target: TestPorts.freeAddress())
        rule.inspector = RuleInspector(name: "never", inspector: NeverDecides())
        try engine.apply([rule])
        #expect(throws: HandoverError.self) { try engine.suspendForHandover() }
        // Nothing was suspended: rules still change.
        try engine.apply([])
    }

    @Test("base64 of in-flight bytes round-trips every length")
    func base64() {
        for length in [0, 1, 2, 3, 4, 5, 64, 65535] {
            let bytes = randomBytes(length)
            let text = bytes.withUnsafeBytes { HandoverBase64.encode($0) }
            #expect(HandoverBase64.decode(text) == bytes)
        }
        #expect(HandoverBase64.decode("a*==") == nil)
        #expect(HandoverBase64.decode("abc") == nil)
    }
}

/// An inspector that never decides (only its presence matters here).
private struct NeverDecides: ConnectionInspector {
    var maxBytes: Int { 16 }
    var timeoutNanoseconds: UInt64 { 1_000_000_000 }
    func makeInspection(client: SocketAddress) -> any Inspection { Undecided() }
}

private final class Undecided: Inspection {
    func feed(_ all: [UInt8]) -> InspectionDecision { .needMore }
    func endOfStream() -> InspectionDecision { .refuse("closed") }
    func timedOut() -> InspectionDecision { .refuse("timeout") }
    func sessionEnded() {}
}
