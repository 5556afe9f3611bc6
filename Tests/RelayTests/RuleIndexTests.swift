import Testing
@testable import Relay
import SystemLayer
import TestSupport

/// The engine's incremental rule index, without sockets: what a change
/// opens and closes, and that it refuses what a whole-set check refuses.
@Suite("Rule index", .offPool)
struct RuleIndexTests {
    private func rule(_ id: String, _ listen: String, allow: [String] = [], transport: Transport = .tcp) -> RelayRule {
        RelayRule(id: id, listen: SocketAddress(listen)!, allow: allow.map { CIDR($0)! },
                  target: SocketAddress("10.0.0.9:3389")!, transport: transport)
    }

    private func indexed(_ rules: [RelayRule]) throws -> RuleIndex {
        var index = RuleIndex()
        index.commit(try index.plan(upserting: rules, removing: []))
        return index
    }

    @Test("a rule is a value: copies share one box until one is changed, and compare and hash by their fields")
    func ruleIsAValueSharingItsFields() {
        let original = rule("a", "0.0.0.0:20001", allow: ["10.1.0.1/32"])
        var copy = original
        #expect(copy.box === original.box, "a copy costs a reference, not the fields")
        copy.target = SocketAddress("10.0.0.7:3389")!
        #expect(copy.box !== original.box)
        #expect(original.target == SocketAddress("10.0.0.9:3389")! && copy.target == SocketAddress("10.0.0.7:3389")!)
        #expect(copy != original)
        copy.target = original.target
        #expect(copy == original && copy.hashValue == original.hashValue, "equal fields in two boxes are equal")
        copy.allow.append(CIDR("10.2.0.0/16")!)
        #expect(copy.allow.count == 2 && original.allow.count == 1)
        #expect(copy.admits(IPAddress("10.2.3.4")!) && !original.admits(IPAddress("10.2.3.4")!))
        #expect(Set([original, copy, original]).count == 2)
    }

    @Test("a listener opens with its address's first rule and closes with its last")
    func openAndClose() throws {
        var index = try indexed([rule("a", "0.0.0.0:20001", allow: ["10.1.0.1/32"])])
        // A second rule on the same address opens nothing.
        var plan = try index.plan(upserting: [rule("b", "0.0.0.0:20001", allow: ["10.1.0.2/32"])], removing: [])
        #expect(plan.openTCP.isEmpty && plan.closeTCP.isEmpty)
        index.commit(plan)
        #expect(index.rules(at: SocketAddress("0.0.0.0:20001")!).map(\.id) == ["a", "b"])
        // Removing one of two closes nothing; removing the last closes it.
        plan = try index.plan(upserting: [], removing: ["a"])
        #expect(plan.closeTCP.isEmpty)
        index.commit(plan)
        plan = try index.plan(upserting: [], removing: ["b"])
        #expect(plan.closeTCP == [SocketAddress("0.0.0.0:20001")!])
        index.commit(plan)
        #expect(index.count == 0 && index.addressCount == 0)
        // TCP becoming TCP+UDP opens the UDP side only.
        index = try indexed([rule("c", "0.0.0.0:20002")])
        plan = try index.plan(upserting: [rule("c", "0.0.0.0:20002", transport: .both)], removing: [])
        #expect(plan.openTCP.isEmpty && plan.openUDP == [SocketAddress("0.0.0.0:20002")!])
    }

    @Test("an unchanged rule and an unknown id change nothing")
    func noChange() throws {
        let index = try indexed([rule("a", "0.0.0.0:20001")])
        #expect(try index.plan(upserting: [rule("a", "0.0.0.0:20001")], removing: ["nope"]).isEmpty)
    }

    @Test("conflicts with rules already held are refused, naming both rules")
    func conflicts() throws {
        let index = try indexed([rule("a", "0.0.0.0:20001", allow: ["10.1.0.1/32"]), rule("w", "0.0.0.0:20003")])
        #expect(throws: RuleError.conflictingRules("a", "b", listen: SocketAddress("0.0.0.0:20001")!)) {
            try index.plan(upserting: [rule("b", "0.0.0.0:20001", allow: ["10.1.0.1/32"])], removing: [])
        }
        // The same clients on UDP only do not conflict with a TCP rule.
        _ = try index.plan(upserting: [rule("u", "0.0.0.0:20001", allow: ["10.1.0.1/32"], transport: .udp)], removing: [])
        // A specific address under a held wildcard, and the reverse.
        #expect(throws: RuleError.conflictingRules("w", "s", listen: SocketAddress("10.0.0.2:20003")!)) {
            try index.plan(upserting: [rule("s", "10.0.0.2:20003")], removing: [])
        }
        // Once the wildcard goes in the same change, the specific address is fine.
        let plan = try index.plan(upserting: [rule("s", "10.0.0.2:20003")], removing: ["w"])
        #expect(plan.openTCP == [SocketAddress("10.0.0.2:20003")!] && plan.closeTCP == [SocketAddress("0.0.0.0:20003")!])
        #expect(throws: RuleError.duplicateID("x")) {
            try index.plan(upserting: [rule("x", "0.0.0.0:20004"), rule("x", "0.0.0.0:20005")], removing: [])
        }
        #expect(throws: RuleError.self) { try index.plan(upserting: [rule("z", "0.0.0.0:0")], removing: []) }
    }

    @Test("a replaced rule keeps its place among its address's rules; a moved one leaves its old address")
    func replace() throws {
        var index = try indexed([rule("a", "0.0.0.0:20001", allow: ["10.1.0.1/32"]),
                                 rule("b", "0.0.0.0:20001", allow: ["10.1.0.2/32"])])
        index.commit(try index.plan(upserting: [rule("a", "0.0.0.0:20001", allow: ["10.1.0.3/32"])], removing: []))
        #expect(index.rules(at: SocketAddress("0.0.0.0:20001")!).map(\.id) == ["a", "b"])
        let plan = try index.plan(upserting: [rule("b", "0.0.0.0:20002")], removing: [])
        #expect(plan.openTCP == [SocketAddress("0.0.0.0:20002")!] && plan.closeTCP.isEmpty)
        index.commit(plan)
        #expect(index.rules(at: SocketAddress("0.0.0.0:20001")!).map(\.id) == ["a"])
        #expect(index.rules.map(\.id) == ["a", "b"])
    }

    @Test("a thousand rules, then one change: the plan touches one address")
    func scale() throws {
        let many = (0..<1000).map { rule("r\($0)", "0.0.0.0:\(20001 + $0)") }
        let index = try indexed(many)
        let plan = try index.plan(upserting: [rule("new", "0.0.0.0:30000")], removing: ["r5"])
        #expect(plan.touched.count == 2)
        #expect(plan.openTCP == [SocketAddress("0.0.0.0:30000")!] && plan.closeTCP == [SocketAddress("0.0.0.0:20006")!])
    }
}

/// `RelayEngine.change`: one rule at a time on real sockets.
@Suite("Rule changes one at a time", .serialized, .offPool)
struct RuleChangeTests {
    @Test("adding and removing single rules leaves the other listeners and live connections alone; a failed change changes nothing")
    func singleChanges() throws {
        let target = try TestListener()
        defer { target.close() }
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let a = RelayRule(id: "a", listen: TestPorts.freeAddress(), target: target.address)
        try engine.change(upserting: [a])
        let live = try TestClient.connect(a.listen)
        defer { live.close() }
        let liveUp = try #require(target.accept())
        defer { liveUp.close() }

        let b = RelayRule(id: "b", listen: TestPorts.freeAddress(), target: target.address)
        try engine.change(upserting: [b])
        let viaB = try TestClient.connect(b.listen)
        defer { viaB.close() }
        let viaBUp = try #require(target.accept())
        defer { viaBUp.close() }
        try viaB.send([1])
        #expect(viaBUp.readExactly(1) == [1])

        // Removing a: new clients refused, the live connection goes on.
        try engine.change(removing: ["a"])
        #expect((try? TestClient.connect(a.listen)) == nil, "a's listener still accepts after its rule was removed")
        #expect(engine.rules.map(\.id) == ["b"])
        try live.send([2, 3])
        #expect(liveUp.readExactly(2) == [2, 3])

        // A port held by someone else: refused, nothing changes.
        let holder = try Socket.listen(on: TestPorts.freeAddress(), reusePort: false)
        defer { holder.close() }
        let taken = RelayRule(id: "c", listen: Socket.localAddress(holder)!, target: target.address)
        #expect(throws: RuleError.self) { try engine.change(upserting: [taken], removing: ["b"]) }
        #expect(engine.rules.map(\.id) == ["b"])
        let again = try TestClient.connect(b.listen)
        defer { again.close() }
        let againUp = try #require(target.accept())
        defer { againUp.close() }
        try again.send([4])
        #expect(againUp.readExactly(1) == [4])
    }
}
