import ControlProtocol
import Foundation
@testable import GatewayControl
import Relay
import SystemLayer
import Testing
import TestSupport

@Suite(.offPool) struct RuleStoreTests {
    @Test func roundTrip() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let store = RuleStore(directory: folder.path)
        let rules = [
            RuleState(id: "r1", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.2.3:3389", unusedExpirySeconds: 300),
                      port: 20417, created: 1_700_000_000),
            RuleState(id: "r2", push: RulePush(protocol: .both, method: .protocolPortClientOnly, target: "10.1.2.4:4000",
                                               clientIP: "198.51.100.7", port: 4000, unusedExpirySeconds: 60),
                      port: 4000, created: 1_700_000_100, lastUsed: 1_700_000_200),
        ]
        try store.save(rules)
        #expect(StateFile.mode(store.path) == 0o600)
        let loaded = store.load()
        #expect(loaded.problem == nil)
        #expect(loaded.rules == rules)
        // No temporary file is left behind: the snapshot and its (empty) journal.
        let names = try FileManager.default.contentsOfDirectory(atPath: folder.path)
        #expect(names.sorted() == ["rules.journal.1", "rules.json"])

        // A rule that changes under the same id is written as it is now (the
        // store keeps each rule's JSON between saves); a removed one is gone.
        var changed = rules
        changed[0].port = 20418
        changed[0].lastUsed = 1_700_000_300
        try store.save(changed)
        #expect(store.load().rules == changed)
        try store.save([changed[1]])
        #expect(store.load().rules == [changed[1]])
        try store.save(changed)
        #expect(RuleStore(directory: folder.path).load().rules == changed)
    }

    @Test("the journal: a change appends its records and leaves the snapshot alone; a torn last record is the crash's and is dropped; compaction folds the journal into a new snapshot")
    func journal() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let store = RuleStore(directory: folder.path)
        func rule(_ n: Int) -> RuleState {
            RuleState(id: "j\(n)", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.2.3:3389"), port: 20000 + n, created: 1_700_000_000)
        }
        var rules = (0..<10).map(rule)
        try store.save(rules)
        let snapshot = try #require(try StateFile.read(store.path))
        rules.append(rule(10))
        try store.save(rules)
        rules.removeFirst()
        try store.save(rules)
        #expect(try StateFile.read(store.path) == snapshot, "a change rewrote the snapshot")
        let journal = folder.file("rules.journal.1")
        let written = try #require(try StateFile.read(journal))
        let records = AppendOnlyFile.records(in: written)
        #expect(written.count >= 64 << 10 && written[records.count...].allSatisfy { $0 == 0 }, "zeros are written ahead of the records")
        let lines = String(decoding: records, as: UTF8.self).split(separator: "\n")
        #expect(lines.count == 2 && lines[0].hasPrefix(#"{"put":"#) && lines[1] == #"{"delete":"j0"}"#, "\(lines)")
        #expect(RuleStore(directory: folder.path).load().rules == rules)

        // A crash in the middle of an append leaves a torn last line: dropped, nothing else lost.
        let handle = try #require(FileHandle(forWritingAtPath: journal))
        handle.seek(toFileOffset: UInt64(records.count))
        handle.write(Data(#"{"put":{"id":"torn","po"#.utf8))
        try handle.close()
        let reloaded = RuleStore(directory: folder.path).load()
        #expect(reloaded.rules == rules && reloaded.problem == nil, "\(String(describing: reloaded.problem))")

        // More than 256 records: the next change starts journal 2 and a snapshot of that moment replaces journal 1.
        let fresh = RuleStore(directory: folder.path)
        try fresh.save(rules)   // a new process's first change: a snapshot, then its own journal
        for n in 11..<300 {
            rules.append(rule(n))
            try fresh.save(rules)
        }
        #expect(eventually {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? []
            return names.filter { $0.hasPrefix("rules.journal.") }.count == 1
        }, "the older journals were not removed after compaction")
        #expect(RuleStore(directory: folder.path).load().rules == rules)
    }

    @Test("one change at a time (issue 15): a record per change, the order of creation kept through replacements and deletes, a seeded store's first change writes the seeded rules whole")
    func incrementalChanges() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        func rule(_ n: Int, port: Int? = nil) -> RuleState {
            RuleState(id: "i\(n)", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.2.3:3389"), port: port ?? 21000 + n, created: 1_700_000_000)
        }
        let store = RuleStore(directory: folder.path)
        // The first change of a process: a snapshot of what it was seeded with plus the change.
        store.seed((0..<5).map { rule($0) })
        #expect(try store.record(upserting: [rule(5)]) == nil, "the first change writes a snapshot, durable at once")
        #expect(RuleStore(directory: folder.path).load().rules.map(\.id) == ["i0", "i1", "i2", "i3", "i4", "i5"])
        let snapshot = try #require(try StateFile.read(store.path))
        // Then records only, each durable once asked.
        try #require(try store.record(upserting: [rule(6)])).makeDurable()
        try #require(try store.record(upserting: [rule(2, port: 29999)], removing: ["i0", "nosuch"])).makeDurable()
        #expect(try store.record(upserting: [rule(3)]) == nil, "an unchanged rule writes nothing")
        #expect(try store.record(removing: ["nosuch"]) == nil, "an unknown id writes nothing")
        #expect(try StateFile.read(store.path) == snapshot, "a change rewrote the snapshot")
        let loaded = RuleStore(directory: folder.path).load().rules
        #expect(loaded.map(\.id) == ["i1", "i2", "i3", "i4", "i5", "i6"], "a replaced rule keeps its place")
        #expect(loaded.first { $0.id == "i2" }?.port == 29999)
        // A whole-set save in another order is said by a snapshot.
        let reordered = loaded.reversed().map { $0 }
        try store.save(reordered)
        #expect(RuleStore(directory: folder.path).load().rules == reordered)
        // Compaction in the background keeps the order of creation.
        for n in 7..<600 { try store.record(upserting: [rule(n)]).map { try $0.makeDurable() } }
        for n in stride(from: 7, to: 600, by: 2) { try store.record(removing: ["i\(n)"]).map { try $0.makeDurable() } }
        #expect(store.waitForCompaction())
        let expected = reordered.map(\.id) + stride(from: 8, to: 600, by: 2).map { "i\($0)" }
        #expect(RuleStore(directory: folder.path).load().rules.map(\.id) == expected)
    }

    @Test("status.json: the rules written by hand inside JSONEncoder's report are its exact bytes, with no rules, one, and several (one named \"rules\":[]), and read back the same")
    func statusBytes() throws {
        let push = RulePush(protocol: .tcp, method: .randomPortClientOnly, target: "10.0.0.5:3389", clientIP: "203.0.113.9")
        let tricky = RuleState(id: #"x","rules":[]"#, push: push, port: 20_002, created: 2, lastUsed: 3, sessions: 1, offloaded: ["198.51.100.1"])
        for rules in [[], [RuleState(id: "a", push: push, port: 20_001, created: 1)], [RuleState(id: "a", push: push, port: 20_001, created: 1), tricky]] {
            let report = StatusReport(pid: 42, updated: 1_765_000_000, broker: #"https://broker.example:8443/"rules":[]"#, gatewayID: 7,
                                      registration: .init(state: "registered", lastRegistered: 5, lastError: "none"),
                                      rules: rules, sessions: 3, portsInUse: ["20001/tcp"], portRange: PortRange(first: 20_001, last: 22_000))
            let bytes = report.encoded()
            #expect(bytes == ControlJSON.encode(report), "\(String(decoding: bytes, as: UTF8.self))")
            #expect(try JSONDecoder().decode(StatusReport.self, from: Data(bytes)).rules == rules)
        }
    }

    @Test("status.json is rewritten when what it says changes, and at least every 10 s; not for its time alone")
    func statusRewrites() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let directory = StateDirectory(folder.path)
        let push = RulePush(protocol: .tcp, method: .randomPortClientOnly, target: "10.0.0.5:3389", clientIP: "203.0.113.9")
        func report(at t: Int64, sessions: Int = 0, rules: Int = 2) -> StatusReport {
            StatusReport(pid: 42, updated: t, broker: nil, gatewayID: 7, registration: .init(state: "registered"),
                         rules: (0..<rules).map { RuleState(id: "r\($0)", push: push, port: 20_001 + $0, created: 1, sessions: $0 == 0 ? sessions : 0) },
                         sessions: sessions, portsInUse: [], portRange: PortRange(first: 20_001, last: 22_000))
        }
        func written() -> StatusReport? { StatusReport.read(from: directory) }
        let writer = StatusWriter()
        #expect(writer.write(report(at: 100), to: directory))
        #expect(written()?.updated == 100)
        // The same report a second later: not written again.
        #expect(!writer.write(report(at: 101), to: directory))
        #expect(written()?.updated == 100)
        // A session on a rule, a rule more: written.
        #expect(writer.write(report(at: 102, sessions: 1), to: directory))
        #expect(written()?.rules.first?.sessions == 1)
        #expect(writer.write(report(at: 103, sessions: 1, rules: 3), to: directory))
        #expect(written()?.rules.count == 3)
        #expect(!writer.write(report(at: 112, sessions: 1, rules: 3), to: directory))
        // Unchanged for 10 s, or the clock set back: written, so `updated` stays current.
        #expect(writer.write(report(at: 113, sessions: 1, rules: 3), to: directory))
        #expect(written()?.updated == 113)
        #expect(writer.write(report(at: 50, sessions: 1, rules: 3), to: directory))
        #expect(written()?.updated == 50)
    }

    @Test func missingFileIsEmpty() {
        let folder = TempFolder()
        defer { folder.remove() }
        let loaded = RuleStore(directory: folder.path).load()
        #expect(loaded.rules.isEmpty)
        #expect(loaded.problem == nil)
    }

    @Test(arguments: ["{\"version\":1,\"rules\":[{\"id\":\"x\"", "not json at all", "{\"version\":9,\"rules\":[]}",
                      "{\"version\":1,\"rules\":[{\"id\":\"x\",\"push\":{\"protocol\":\"sctp\",\"method\":0,\"target\":\"10.0.0.1:1\"},\"port\":1,\"created\":0,\"sessions\":0}]}"])
    func corruptedFileIsKeptAside(content: String) throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let store = RuleStore(directory: folder.path)
        try content.write(toFile: store.path, atomically: false, encoding: .utf8)
        let loaded = store.load(now: 1234)
        #expect(loaded.rules.isEmpty)
        let problem = try #require(loaded.problem)
        #expect(problem.contains(store.path))
        #expect(problem.contains("kept as \(store.path).bad-1234"))
        // Nothing lost: the bad file is kept byte for byte.
        #expect(try String(contentsOfFile: store.path + ".bad-1234", encoding: .utf8) == content)
        #expect(!FileManager.default.fileExists(atPath: store.path))
        // And the store works again.
        try store.save([])
        #expect(store.load().problem == nil)
    }
}

@Suite(.offPool) struct PortAllocatorTests {
    let always: PortAllocator.Probe = { _, _ in true }

    @Test func randomPortInRangeAvoidsUsedPorts() throws {
        let allocator = PortAllocator(range: 30000...30009)
        let uses = (30000...30008).map { PortAllocator.Use(port: $0, transport: .tcp, allow: []) }
        for _ in 0..<20 {
            let port = try allocator.allocate(method: .randomPort, requested: nil, client: nil, transport: .tcp, holders: PortUses(uses).holders, probe: always)
            #expect(port == 30009)
        }
        var seen = Set<Int>()
        for _ in 0..<200 {
            let port = try allocator.allocate(method: .randomPortClientOnly, requested: nil, client: IPAddress("10.0.0.1"),
                                              transport: .tcp, holders: PortUses([]).holders, probe: always)
            #expect((30000...30009).contains(port))
            seen.insert(port)
        }
        #expect(seen.count > 1, "random ports should not always be the same")
    }

    @Test func udpPortOfATCPRuleIsFreeForUDP() throws {
        let allocator = PortAllocator(range: 30000...30000)
        let uses = [PortAllocator.Use(port: 30000, transport: .tcp, allow: [])]
        #expect(try allocator.allocate(method: .randomPort, requested: nil, client: nil, transport: .udp, holders: PortUses(uses).holders, probe: always) == 30000)
        #expect(throws: ControlError.self) {
            try allocator.allocate(method: .randomPort, requested: nil, client: nil, transport: .both, holders: PortUses(uses).holders, probe: always)
        }
    }

    @Test func methodOneTakesTheRequestedPort() throws {
        let allocator = PortAllocator(range: 30000...30009)
        let port = try allocator.allocate(method: .protocolPortClientOnly, requested: 3389, client: IPAddress("10.0.0.1"),
                                          transport: .tcp, holders: PortUses([]).holders, probe: always)
        #expect(port == 3389)
        // Another client's method-1 rule may share it; the relay tells them apart by address.
        let other = [PortAllocator.Use(port: 3389, transport: .tcp, allow: [CIDR("10.0.0.2/32")!])]
        #expect(try allocator.allocate(method: .protocolPortClientOnly, requested: 3389, client: IPAddress("10.0.0.1"),
                                       transport: .tcp, holders: PortUses(other).holders, probe: { _, _ in false }) == 3389)
    }

    @Test("methods 0 and 2 may ask for a port of the range (a cluster placing rules on every gateway)")
    func randomMethodsTakeARequestedPortOfTheRange() throws {
        let allocator = PortAllocator(range: 30000...30009)
        #expect(try allocator.allocate(method: .randomPort, requested: 30004, client: nil, transport: .both, holders: PortUses([]).holders, probe: always) == 30004)
        #expect(try allocator.allocate(method: .randomPortClientOnly, requested: 30009, client: IPAddress("10.0.0.1"),
                                       transport: .tcp, holders: PortUses([]).holders, probe: always) == 30009)
        #expect(throws: ControlError(400, field: "port", "port: 30010 is outside this gateway's port range 30000-30009")) {
            try allocator.allocate(method: .randomPort, requested: 30010, client: nil, transport: .tcp, holders: PortUses([]).holders, probe: always)
        }
        #expect(throws: ControlError(409, field: "port", "port: 30004/udp is already taken by another rule")) {
            try allocator.allocate(method: .randomPort, requested: 30004, client: nil, transport: .udp,
                                   holders: PortUses([PortAllocator.Use(port: 30004, transport: .both, allow: [])]).holders, probe: always)
        }
        do {
            _ = try allocator.allocate(method: .randomPort, requested: 30005, client: nil, transport: .tcp, holders: PortUses([]).holders, probe: { _, _ in false })
            Issue.record("a requested port another process holds was accepted")
        } catch {
            #expect(error.status == 409)
        }
    }

    @Test func methodOnePortTaken() {
        let allocator = PortAllocator(range: 30000...30009)
        let open = [PortAllocator.Use(port: 3389, transport: .tcp, allow: [])]
        #expect(throws: ControlError(409, field: "port", "port: 3389/tcp is already taken by another rule")) {
            try allocator.allocate(method: .protocolPortClientOnly, requested: 3389, client: IPAddress("10.0.0.1"),
                                   transport: .tcp, holders: PortUses(open).holders, probe: { _, _ in true })
        }
        let sameClient = [PortAllocator.Use(port: 3389, transport: .tcp, allow: [CIDR("10.0.0.1/32")!])]
        #expect(throws: ControlError.self) {
            try allocator.allocate(method: .protocolPortClientOnly, requested: 3389, client: IPAddress("10.0.0.1"),
                                   transport: .tcp, holders: PortUses(sameClient).holders, probe: { _, _ in true })
        }
        do {
            _ = try allocator.allocate(method: .protocolPortClientOnly, requested: 3389, client: IPAddress("10.0.0.1"),
                                       transport: .tcp, holders: PortUses([]).holders, probe: { _, _ in false })
            Issue.record("a port another process holds was accepted")
        } catch {
            #expect(error.status == 409)
            #expect(error.message.contains("3389"))
        }
    }

    @Test func exhaustedRange() {
        let allocator = PortAllocator(range: 30000...30003)
        let uses = [PortAllocator.Use(port: 30000, transport: .tcp, allow: []), PortAllocator.Use(port: 30001, transport: .both, allow: [])]
        // 30002 and 30003 are held by another process.
        let probe: PortAllocator.Probe = { port, _ in port < 30002 }
        do {
            _ = try allocator.allocate(method: .randomPort, requested: nil, client: nil, transport: .tcp, holders: PortUses(uses).holders, probe: probe)
            Issue.record("an exhausted range gave a port")
        } catch {
            #expect(error.status == 409)
            #expect(error.message.contains("30000-30003 is exhausted"))
        }
    }

    @Test func realProbeSeesAPortHeldElsewhere() throws {
        let held = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        defer { held.close() }
        let port = Int(Socket.localAddress(held)!.port)
        let probe = PortAllocator.bindProbe(on: IPAddress("127.0.0.1")!)
        #expect(!probe(port, .tcp))
    }
}

@Suite(.offPool) struct BrokerAddressTests {
    @Test func forms() throws {
        #expect(try BrokerAddress("10.0.0.5:8080").url == "http://10.0.0.5:8080")
        #expect(try BrokerAddress("http://broker.example:9000/base/").url == "http://broker.example:9000/base")
        #expect(try BrokerAddress("http://broker.example").port == 80)
        #expect(try BrokerAddress("[::1]:8080").url == "http://[::1]:8080")
        // https (issue 14): TLS, port 443 by default.
        let secure = try BrokerAddress("https://broker.example/base")
        #expect(secure.tls && secure.port == 443 && secure.url == "https://broker.example:443/base")
        #expect(try !BrokerAddress("http://broker.example").tls)
        for bad in ["", "ftp://x:1", "host:0", "host:99999", "http://:80", "https://:443"] {
            #expect(throws: ControlError.self, "\(bad)") { try BrokerAddress(bad) }
        }
    }
}

@Suite(.offPool) struct CertificateHashTests {
    @Test("hashes print as OpenSSL's -fingerprint -sha256 does and parse back, in both spellings")
    func fingerprints() throws {
        let hash: [UInt8] = (0..<32).map { UInt8($0 * 7 & 0xFF) }
        let text = TLSClientSession.fingerprint(hash)
        #expect(text.hasPrefix("SHA256:00:07:0E:15:"))
        #expect(TLSClientSession.parseFingerprint(text) == hash)
        #expect(TLSClientSession.parseFingerprint(text.lowercased()) == hash)
        #expect(TLSClientSession.parseFingerprint(hash.map { String(format: "%02x", $0) }.joined()) == hash)
        #expect(TLSClientSession.parseFingerprint("SHA256:00:11") == nil)
        #expect(TLSClientSession.parseFingerprint(String(repeating: "zz", count: 32)) == nil)
    }
}

@Suite(.offPool) struct PushedRulesAndPortUsesTests {
    func rule(_ id: String, port: Int = 1) -> RuleState {
        RuleState(id: id, push: RulePush(protocol: .tcp, method: .randomPort, target: "10.0.0.1:22"), port: port, created: 0)
    }

    @Test("pushed rules keep the order of creation through replacements, removals and in-place updates")
    func pushedRules() {
        var pushed = PushedRules([rule("a"), rule("b"), rule("c")])
        pushed["b"] = rule("b", port: 2)
        pushed["d"] = rule("d")
        pushed.remove(["a", "zz"])
        #expect(pushed.list.map(\.id) == ["b", "c", "d"])
        #expect(pushed["b"]?.port == 2 && pushed["a"] == nil && pushed.contains("c") && !pushed.contains("a"))
        pushed.updateEach { $0.sessions = 3 }
        #expect(pushed.list.allSatisfy { $0.sessions == 3 } && pushed.list.map(\.id) == ["b", "c", "d"])
        #expect(Set(pushed.filter { $0.port == 1 }.map(\.id)) == ["c", "d"])
        pushed["a"] = rule("a")
        #expect(pushed.list.map(\.id) == ["b", "c", "d", "a"], "a removed id pushed again goes last")
        #expect(pushed.unordered.map(\.id).sorted() == ["a", "b", "c", "d"])
        // Many rules: the order of creation, whatever the dictionary's order.
        var many = PushedRules((0..<500).map { rule("m\($0)") })
        many.remove(Set(stride(from: 0, to: 500, by: 3).map { "m\($0)" }))
        many["m3"] = rule("m3")
        #expect(many.list.map(\.id) == (0..<500).filter { $0 % 3 != 0 }.map { "m\($0)" } + ["m3"])
    }

    @Test("the port index answers by port, and forgets an owner's ports with it; the allocator refuses what it holds")
    func portUses() throws {
        var uses = PortUses()
        uses.set("r1", [PortAllocator.Use(port: 30000, transport: .tcp, allow: [])])
        uses.set("r2", [PortAllocator.Use(port: 30000, transport: .udp, allow: []), PortAllocator.Use(port: 30001, transport: .both, allow: [])])
        #expect(uses.holders(30000).count == 2 && uses.holders(30001).count == 1 && uses.holders(30002).isEmpty)
        let allocator = PortAllocator(range: 30000...30002)
        let always: PortAllocator.Probe = { _, _ in true }
        #expect(try allocator.allocate(method: .randomPort, requested: nil, client: nil, transport: .tcp,
                                       holders: uses.holders, probe: always) == 30002)
        #expect(throws: ControlError.self) {
            try allocator.allocate(method: .randomPort, requested: 30001, client: nil, transport: .udp, holders: uses.holders, probe: always)
        }
        uses.remove("r2")
        #expect(uses.holders(30001).isEmpty && uses.holders(30000).count == 1 && uses.owners == 1)
        uses.set("r1", [])
        #expect(uses.holders(30000).isEmpty && uses.owners == 0)
    }
}
