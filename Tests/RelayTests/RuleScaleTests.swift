import Testing
@testable import Relay
import SystemLayer
import TestSupport

/// Rule sets of thousands of per-client rules (the Security Gateway's one UDP
/// rule per client): checked in O(n), matched by a hash of the client's
/// address, and a change that keeps a rule keeps its flows. The new paths are
/// compared against the plain definitions (a scan in matching order; the
/// pairwise conflict rule), never against a clock.
@Suite("Relay rules at scale", .offPool)
struct RuleScaleTests {
    let listen = SocketAddress("0.0.0.0:4172")!
    let target = SocketAddress("10.9.0.1:4172")!

    /// The definition `ListenerRules.match` must agree with: the first rule, in matching order, that admits the client.
    func scan(_ rules: ListenerRules, _ client: IPAddress) -> RelayRule? {
        rules.rules.first { $0.admits(client) }
    }

    @Test("matching among thousands of host rules agrees with a scan in matching order (mixed with prefixes, v6, multi-host rules)")
    func matchAgreesWithScan() throws {
        var generator = SystemRandomNumberGenerator()
        for round in 0..<4 {
            var rules: [RelayRule] = []
            var hosts: [IPAddress] = []
            for i in 0..<3000 {
                let host = IPAddress.v4(0x0a01_0000 + UInt32(i * 3 + round))
                hosts.append(host)
                rules.append(RelayRule(id: "h\(i)", listen: listen, allow: [CIDR(address: host, prefixLength: 32)], target: target, transport: .udp))
            }
            // Not host-only: a host beside a network (specificity 32 too, so its place in the order decides).
            let mixedPosition = Int.random(in: 0..<rules.count, using: &generator)
            rules.insert(RelayRule(id: "mixed", listen: listen, allow: [CIDR("10.1.0.9/32")!, CIDR("10.2.0.0/16")!], target: target,
                                   transport: .udp), at: mixedPosition)
            // Two host rules naming the same host cannot coexist (a conflict), but one rule may name several hosts.
            rules.append(RelayRule(id: "pair", listen: listen, allow: [CIDR("10.3.0.1")!, CIDR("10.3.0.2")!], target: target, transport: .udp))
            rules.append(RelayRule(id: "net", listen: listen, allow: [CIDR("10.1.0.0/16")!], target: target, transport: .udp))
            rules.append(RelayRule(id: "v6host", listen: listen, allow: [CIDR("2001:db8::7")!], target: target, transport: .udp))
            rules.append(RelayRule(id: "mapped", listen: listen, allow: [CIDR("::ffff:10.4.0.1/128")!], target: target, transport: .udp))
            rules.append(RelayRule(id: "guard", listen: listen, allow: [CIDR("0.0.0.0/32")!], target: target, transport: .udp))
            if round % 2 == 1 { rules.append(RelayRule(id: "anyone", listen: listen, target: target, transport: .udp)) }
            rules.shuffle(using: &generator)
            try RuleError.validate(rules)
            let listener = ListenerRules.ordered(address: listen, rules: rules, gate: AdmissionGate(address: "udp", limit: 10))
            var clients = hosts.shuffled(using: &generator).prefix(500).map { $0 }
            clients += ["10.1.0.9", "10.2.3.4", "10.3.0.1", "10.3.0.2", "10.3.0.3", "10.1.255.255", "2001:db8::7", "2001:db8::8",
                        "10.4.0.1", "::ffff:10.4.0.1", "0.0.0.0", "192.0.2.1", "::ffff:10.1.0.3"].map { IPAddress($0)! }
            clients += (0..<300).map { _ in IPAddress.v4(0x0a01_0000 + UInt32.random(in: 0..<20000, using: &generator)) }
            for client in clients {
                let expected = scan(listener, client.unmapped)
                #expect(listener.match(client.unmapped)?.id == expected?.id, "client \(client), round \(round)")
            }
            // A host rule is found by the index; the mixed rule keeps its place among equals.
            #expect(listener.match(hosts[7])?.id == scan(listener, hosts[7])?.id)
            #expect(listener.match(IPAddress("10.3.0.2")!)?.id == "pair")
            #expect(listener.match(IPAddress("192.0.2.1")!)?.id == (round % 2 == 1 ? "anyone" : nil))
        }
    }

    @Test("conflicts are still found in a list of 20,000 rules, naming the same rules as the pairwise definition")
    func validationAtScale() throws {
        var rules = (0..<20_000).map { i in
            RelayRule(id: "u\(i)", listen: listen, allow: [CIDR(address: .v4(0x0a00_0000 + UInt32(i)), prefixLength: 32)],
                      target: target, transport: .udp)
        }
        try RuleError.validate(rules)
        // TCP on the same clients does not conflict with UDP.
        try RuleError.validate(rules + [RelayRule(id: "t", listen: listen, allow: rules[5].allow, target: target, transport: .tcp)])
        // The same allow-list in another order, on the same address and transport: the earlier rule is named.
        rules[100] = RelayRule(id: "two", listen: listen, allow: [CIDR("10.0.0.1")!, CIDR("172.16.0.0/12")!], target: target, transport: .udp)
        let swapped = RelayRule(id: "again", listen: listen, allow: [CIDR("172.16.0.0/12")!, CIDR("10.0.0.1")!], target: target, transport: .both)
        #expect(throws: RuleError.conflictingRules("two", "again", listen: listen)) { try RuleError.validate(rules + [swapped]) }
        #expect(throws: RuleError.conflictingRules("u7", "dup", listen: listen)) {
            try RuleError.validate(rules + [RelayRule(id: "dup", listen: listen, allow: rules[7].allow, target: target, transport: .udp)])
        }
        #expect(throws: RuleError.duplicateID("u9")) {
            try RuleError.validate(rules + [RelayRule(id: "u9", listen: SocketAddress("0.0.0.0:1")!, target: target)])
        }
        // A specific address beside the wildcard on the same port: conflict when a transport is shared, named by the first such wildcard rule.
        let specific = SocketAddress("10.8.0.1:4172")!
        try RuleError.validate(rules + [RelayRule(id: "tcp-here", listen: specific, target: target, transport: .tcp)])
        #expect(throws: RuleError.conflictingRules("u0", "udp-here", listen: specific)) {
            try RuleError.validate(rules + [RelayRule(id: "udp-here", listen: specific, target: target, transport: .udp)])
        }
    }

    @Test("a listener knows its rules by id and settings")
    func contains() throws {
        let a = RelayRule(id: "a", listen: listen, allow: [CIDR("10.0.0.1")!], target: target, transport: .udp)
        var changed = a
        changed.target = SocketAddress("10.9.0.2:4172")!
        let listener = ListenerRules.ordered(address: listen, rules: [a], gate: AdmissionGate(address: "udp", limit: 10))
        #expect(listener.contains(a))
        #expect(!listener.contains(changed))
        var renamed = a
        renamed.id = "b"
        #expect(!listener.contains(renamed))
    }

    @Test("re-applying 2,000 client rules keeps the flows of rules that stay and ends the flow of a changed rule")
    func flowsSurviveLargeChanges() throws {
        let echo = try DatagramEchoServer()
        defer { echo.stop() }
        let other = try DatagramEchoServer()
        defer { other.stop() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let relay = TestPorts.freeAddress()
        // Real clients on 127.0.0.2-127.0.0.5; the rest of the rules name addresses nobody uses.
        let clients = try (2...5).map { i in
            try Socket.bindUDP(SocketAddress("127.0.0.\(i):0")!, reusePort: false, receiveBuffer: 1 << 20)
        }
        defer { clients.forEach { $0.close() } }
        func rule(_ host: IPAddress, _ to: SocketAddress) -> RelayRule {
            RelayRule(id: "c-\(host)", listen: relay, allow: [CIDR(address: host, prefixLength: 32)], target: to, transport: .udp)
        }
        var rules = (0..<2000).map { i in rule(.v4(0x0a00_0000 + UInt32(i)), echo.address) }
        rules += (2...5).map { i in rule(IPAddress("127.0.0.\(i)")!, echo.address) }
        try engine.apply(rules)
        func exchange(_ fd: FileDescriptor, _ byte: UInt8) throws -> Bool {
            _ = try Socket.sendDatagram(fd, [byte], to: relay)
            guard BlockingWait.readable(fd, timeoutMilliseconds: TestDeadline.milliseconds),
                  case .done(let reply)? = try? Socket.receiveDatagram(fd) else { return false }
            return reply.bytes == [byte]
        }
        for (i, fd) in clients.enumerated() { #expect(try exchange(fd, UInt8(i)), "client \(i) through its own rule") }
        #expect(engine.flows().count == 4)
        let before = Set(engine.flows().map(\.client))
        // Change one client's target and 1,000 other rules; add 500, drop 500.
        rules[2000] = rule(IPAddress("127.0.0.2")!, other.address)
        rules.removeSubrange(0..<500)
        rules += (3000..<3500).map { i in rule(.v4(0x0a00_0000 + UInt32(i)), echo.address) }
        try engine.apply(rules)
        let after = engine.flows()
        #expect(after.count == 3, "the changed rule's flow ends, the three others stay: \(after.map(\.client))")
        #expect(Set(after.map(\.client)).isSubset(of: before))
        #expect(!after.contains { $0.client.ip == IPAddress("127.0.0.2")! })
        // The changed client now reaches the other target; the others still work on their flows.
        for (i, fd) in clients.enumerated() { #expect(try exchange(fd, UInt8(10 + i))) }
        #expect(eventually { other.senders.count == 1 })
        #expect(engine.flows().count == 4)
    }
}
