import Testing
@testable import Relay
import SystemLayer
import TestSupport

/// A scripted `DirectionIO`: the state machine is exercised without sockets.
struct ScriptedIO: DirectionIO {
    enum Step { case bytes(Int), wouldBlock, eof, fail(Errno) }
    var reads: [Step]
    var writes: [Step]
    var capacity = 100
    var holding = false
    var log: [String] = []
    /// Every fill reports the source drained (a short read with no hang-up).
    var drainsSource = false
    var sourceDrained: Bool { drainsSource }

    mutating func acquireBuffer() -> Int { holding = true; return capacity }
    mutating func releaseBuffer() { if holding { log.append("release") }; holding = false }
    mutating func fill(maxBytes: Int) throws(Errno) -> IOResult<Int> {
        log.append("fill")
        guard !reads.isEmpty else { return .wouldBlock }
        switch reads.removeFirst() {
        case .bytes(let n): return .done(min(n, maxBytes))
        case .wouldBlock: return .wouldBlock
        case .eof: return .done(0)
        case .fail(let e): throw e
        }
    }
    mutating func flush(maxBytes: Int) throws(Errno) -> IOResult<Int> {
        log.append("flush")
        guard !writes.isEmpty else { return .done(maxBytes) }
        switch writes.removeFirst() {
        case .bytes(let n): return .done(min(n, maxBytes))
        case .wouldBlock: return .wouldBlock
        case .eof: return .done(0)
        case .fail(let e): throw e
        }
    }
    mutating func finishDestination() { log.append("fin") }
}

@Suite("Relay state machines", .offPool)
struct RelayStateTests {
    @Test("bytes move until the source is empty, and the buffer is released then")
    func simpleFlow() {
        var direction = RelayDirection(io: ScriptedIO(reads: [.bytes(60), .bytes(100), .wouldBlock], writes: []))
        #expect(direction.pump() == .waitingForSource)
        #expect(direction.delivered == 160)
        #expect(direction.io.holding == false)
        #expect(direction.io.log == ["fill", "flush", "fill", "flush", "fill", "release"])
    }

    @Test("a fill that drained the source is delivered, and the source is not read again until its next edge")
    func drainedSourceNotProbed() {
        var direction = RelayDirection(io: ScriptedIO(reads: [.bytes(60), .bytes(40), .eof], writes: [], drainsSource: true))
        #expect(direction.pump() == .waitingForSource)
        #expect(direction.delivered == 60)
        #expect(direction.io.log == ["fill", "flush", "release"])
        #expect(direction.io.holding == false)
        // The next edge: the next bytes, then (a separate edge) the end.
        direction.io.log = []
        #expect(direction.pump() == .waitingForSource)
        #expect(direction.delivered == 100)
        #expect(direction.io.log == ["fill", "flush", "release"])
        #expect(direction.pump() == .finished)
        // Without the proof, the same bytes take a probe read that would block.
        var probing = RelayDirection(io: ScriptedIO(reads: [.bytes(60), .wouldBlock], writes: []))
        #expect(probing.pump() == .waitingForSource)
        #expect(probing.io.log == ["fill", "flush", "fill", "release"])
    }

    @Test("a drained fill whose destination is full keeps its bytes in flight until it is writable")
    func drainedSourceBackpressure() {
        var direction = RelayDirection(io: ScriptedIO(reads: [.bytes(80)], writes: [.bytes(30), .wouldBlock], drainsSource: true))
        #expect(direction.pump() == .waitingForDestination)
        #expect(direction.inFlight == 50)
        #expect(direction.io.holding)
        // Writable: the rest goes; then the source is read (this pump has no proof of its own).
        direction.io.log = []
        #expect(direction.pump() == .waitingForSource)
        #expect(direction.delivered == 80)
        #expect(direction.io.log == ["flush", "fill", "release"])
    }

    @Test("a full destination stops reading: backpressure, and the bytes stay in flight")
    func backpressure() {
        var direction = RelayDirection(io: ScriptedIO(reads: [.bytes(100), .bytes(100)], writes: [.bytes(30), .wouldBlock]))
        #expect(direction.pump() == .waitingForDestination)
        #expect(direction.inFlight == 70)
        #expect(direction.io.log == ["fill", "flush", "flush"])
        #expect(direction.io.holding)
        // Writable again: the rest goes out before anything more is read.
        direction.io.log = []
        #expect(direction.pump() == .waitingForDestination || direction.inFlight == 0)
        #expect(direction.io.log.first == "flush")
    }

    @Test("end of stream is passed on once, after every byte")
    func halfClose() {
        var direction = RelayDirection(io: ScriptedIO(reads: [.bytes(50), .eof], writes: [.wouldBlock]))
        #expect(direction.pump() == .waitingForDestination)
        #expect(!direction.io.log.contains("fin"))
        #expect(direction.pump() == .finished)
        #expect(direction.delivered == 50)
        #expect(direction.io.log.filter { $0 == "fin" }.count == 1)
        #expect(direction.pump() == .finished)
        #expect(direction.io.log.filter { $0 == "fin" }.count == 1)
    }

    @Test("failures say which side failed")
    func failures() {
        var reading = RelayDirection(io: ScriptedIO(reads: [.fail(.connectionReset)], writes: []))
        #expect(reading.pump() == .sourceFailed(.connectionReset))
        var writing = RelayDirection(io: ScriptedIO(reads: [.bytes(10)], writes: [.fail(.brokenPipe)]))
        #expect(writing.pump() == .destinationFailed(.brokenPipe))
    }

    @Test("rule matching prefers the most specific allow-list and maps IPv4 in IPv6")
    func ruleMatching() throws {
        let listen = SocketAddress("0.0.0.0:3389")!
        let target = SocketAddress("10.0.0.5:3389")!
        let any = RelayRule(id: "any", listen: listen, target: target)
        let net = RelayRule(id: "net", listen: listen, allow: [CIDR("198.51.100.0/24")!], target: target)
        let host = RelayRule(id: "host", listen: listen, allow: [CIDR("198.51.100.7")!], target: target)
        let gate = AdmissionGate(address: "x", limit: 10)
        let rules = ListenerRules.ordered(address: listen, rules: [any, net, host], gate: gate)
        #expect(rules.match(IPAddress("198.51.100.7")!)?.id == "host")
        #expect(rules.match(IPAddress("198.51.100.8")!)?.id == "net")
        #expect(rules.match(IPAddress("203.0.113.1")!)?.id == "any")
        #expect(rules.match(IPAddress("::ffff:198.51.100.7")!.unmapped)?.id == "host")
    }

    @Test("conflicting rule sets are refused, naming the rules")
    func validation() {
        let a = SocketAddress("127.0.0.1:5000")!, t = SocketAddress("127.0.0.1:6000")!
        #expect(throws: RuleError.duplicateID("x")) {
            try RuleError.validate([RelayRule(id: "x", listen: a, target: t), RelayRule(id: "x", listen: SocketAddress("127.0.0.1:5001")!, target: t)])
        }
        #expect(throws: RuleError.conflictingRules("x", "y", listen: a)) {
            try RuleError.validate([RelayRule(id: "x", listen: a, target: t), RelayRule(id: "y", listen: a, target: t)])
        }
        #expect(throws: RuleError.self) {
            try RuleError.validate([RelayRule(id: "w", listen: SocketAddress("0.0.0.0:5000")!, target: t),
                                    RelayRule(id: "s", listen: a, target: t)])
        }
    }

    @Test("admission counts globally and per listener and releases exactly")
    func admission() {
        let control = AdmissionControl(maxConnections: 3)
        let one = AdmissionGate(address: "one", limit: 2), two = AdmissionGate(address: "two", limit: 5)
        #expect(control.admit(one) == nil)
        #expect(control.admit(one) == nil)
        #expect(control.admit(one) == .listenerLimit)
        #expect(control.admit(two) == nil)
        #expect(control.admit(two) == .globalLimit)
        control.release(one)
        #expect(control.admit(two) == nil)
        #expect(control.global.active == 3 && one.active == 1 && two.active == 2)
    }
}
