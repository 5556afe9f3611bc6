import ControlProtocol
import Foundation
import GatewayControl
import Logging
import NetfilterKernel
import Relay
import Synchronization
import SystemLayer
import Testing
import TestSupport

/// The kernel table as the control core sees it, in memory: batches are all
/// or nothing like the kernel's, elements expire when the test says, and
/// the test counts traffic on them. (The real table is tested in
/// NetfilterKernelTests and Tests/e2e/kernel-path-netns.sh.)
final class MemoryKernel: KernelForwarding {
    struct Element: Equatable {
        var forward: KernelForward
        var timeout: UInt64?
        var flows: UInt64 = 0
        var packets: UInt64 = 0
        var bytes: UInt64 = 0
    }

    struct State {
        var exists = false
        var publics: [IPAddress] = []
        var elements: [KernelForward.Key: Element] = [:]
        var failNext: NetfilterError?
        var batches = 0
        var connectionsDeleted: [KernelForward] = []
    }

    let state = Mutex(State())
    /// Runs (once) after a read of the table, before it returns: another
    /// change landing between a tick's read and its lock.
    let onRead = Mutex<(@Sendable () -> Void)?>(nil)

    var elements: [KernelForward.Key: Element] { state.withLock { $0.elements } }

    func reconcile(publics: [IPAddress], forwards: [(KernelForward, timeoutMilliseconds: UInt64?)]) throws(NetfilterError) {
        try state.withLock { s throws(NetfilterError) in
            if let failure = s.failNext { s.failNext = nil; throw failure }
            if !s.exists || s.publics != publics { s.elements = [:] }
            s.exists = true
            s.publics = publics
            var next: [KernelForward.Key: Element] = [:]
            for (forward, timeout) in forwards {
                if let held = s.elements[forward.key], held.forward == forward { next[forward.key] = held } else {
                    next[forward.key] = Element(forward: forward, timeout: timeout)
                }
            }
            s.elements = next
            s.batches += 1
        }
    }

    func apply(_ changes: [KernelTable.Change]) throws(NetfilterError) {
        guard !changes.isEmpty else { return }
        try state.withLock { s throws(NetfilterError) in
            if let failure = s.failNext { s.failNext = nil; throw failure }
            var next = s.elements
            for change in changes {
                switch change {
                case .add(let forward, let timeout):
                    guard next[forward.key] == nil else { throw NetfilterError(operation: "test batch", errno: EEXIST, detail: "\(forward)") }
                    next[forward.key] = Element(forward: forward, timeout: timeout)
                case .remove(let forward):
                    next[forward.key] = nil   // like KernelTable: a missing one is no error
                }
            }
            s.elements = next
            s.batches += 1
        }
    }

    func forwards() throws(NetfilterError) -> [KernelForwardState] {
        defer { onRead.withLock { hook in let run = hook; hook = nil; return run }?() }
        return try state.withLock { s throws(NetfilterError) in
            guard s.exists else { throw NetfilterError(operation: "test read", errno: ENOENT, detail: nil) }
            return s.elements.values.map {
                KernelForwardState(forward: $0.forward, timeoutMilliseconds: $0.timeout ?? 0, expiresMilliseconds: $0.timeout ?? 0,
                                   flows: $0.flows, packets: $0.packets, bytes: $0.bytes)
            }
        }
    }

    func deleteConnections(of forward: KernelForward) throws(NetfilterError) -> Int {
        state.withLock { $0.connectionsDeleted.append(forward) }
        return 1
    }

    func delete() throws(NetfilterError) {
        state.withLock { $0 = State() }
    }

    /// The kernel's expiry of one element.
    func expire(_ key: KernelForward.Key) { state.withLock { _ = $0.elements.removeValue(forKey: key) } }
    /// Traffic the kernel counted on an element.
    func count(_ key: KernelForward.Key, flows: UInt64, packets: UInt64, bytes: UInt64) {
        state.withLock { s in
            s.elements[key]?.flows += flows
            s.elements[key]?.packets += packets
            s.elements[key]?.bytes += bytes
        }
    }
}

@Suite("Kernel path in the control core: pushes, expiry, offload, restore (in-memory table)", .offPool)
struct KernelPathControlTests {
    static let publicAddress = IPAddress("127.0.0.1")!

    /// A control core on an engine and `kernel`, on `folder`; every probe says free.
    /// - Parameter portRange: where random ports come from (default: a block
    ///   of `TestPorts` of its own, so a relay rule can listen on its random port).
    static func makeControl(folder: TempFolder, kernel: MemoryKernel?, clock: TestClock,
                            defaultPath: ForwardingPath = .userspace,
                            portRange: ClosedRange<Int>? = nil) throws -> (GatewayControl, RelayEngine) {
        var logger = Logger(label: "kernel-path-test")
        logger.logLevel = .critical
        let engine = try RelayEngine(settings: RelaySettings(loops: 1), logger: logger)
        var settings = TestGateway.settings(portRange: portRange, networks: ["127.0.0.0/8", "10.0.0.0/8", "2001:db8::/32"])
        settings.defaultForwarding = defaultPath
        let control = GatewayControl(engine: engine, settings: settings, baseRules: [], stateDirectory: folder.path,
                                     signer: nil, logger: logger, clock: { clock.now },
                                     probe: { _ in { _, _ in true } }, kernel: kernel)
        try control.restore()
        return (control, engine)
    }

    static func forward(_ rule: RuleState, client: String? = nil, _ transport: KernelForward.Transport = .tcp) -> KernelForward.Key {
        KernelForward.Key(client: client.flatMap(IPAddress.init), publicAddress: publicAddress, transport: transport, port: UInt16(rule.port))
    }

    @Test("a kernel rule is a kernel element with the rule's expiry, and no listener; method 1 and 2 elements carry the client")
    func kernelRuleIsAnElement() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let kernel = MemoryKernel(), clock = TestClock()
        let (control, engine) = try Self.makeControl(folder: folder, kernel: kernel, clock: clock, defaultPath: .kernel)
        defer { engine.shutdown() }
        let (open, created) = try control.put(id: "open", push: RulePush(protocol: .both, method: .randomPort, target: "10.1.0.5:3389",
                                                                          unusedExpirySeconds: 120))
        #expect(created && open.push.forwardingPath == .kernel)
        #expect(engine.rules.isEmpty, "a kernel rule opens no listener")
        let tcp = try #require(kernel.elements[Self.forward(open)])
        #expect(tcp.forward.target == SocketAddress("10.1.0.5:3389")!)
        #expect(tcp.timeout.map { $0 > 100_000 && $0 <= 120_000 } == true, "expiry in ms: \(String(describing: tcp.timeout))")
        #expect(kernel.elements[Self.forward(open, .udp)] != nil)

        let (client, _) = try control.put(id: "client", push: RulePush(protocol: .udp, method: .protocolPortClientOnly, target: "10.1.0.6:4172",
                                                                        clientIP: "198.51.100.7", port: 4172))
        #expect(kernel.elements[Self.forward(client, client: "198.51.100.7", .udp)] != nil)
        // The same port for another client (method 1 shares it), and the port is held for an open rule.
        let (other, _) = try control.put(id: "other", push: RulePush(protocol: .udp, method: .protocolPortClientOnly, target: "10.1.0.7:4172",
                                                                      clientIP: "198.51.100.8", port: 4172))
        #expect(other.port == 4172)
        #expect(throws: ControlError.self) {
            try control.put(id: "clash", push: RulePush(protocol: .udp, method: .randomPort, target: "10.1.0.7:4172", port: open.port))
        }
        // Counters show in the rules' answer.
        kernel.count(Self.forward(open), flows: 2, packets: 40, bytes: 6000)
        control.tick()
        let shown = try #require(control.rules().first { $0.id == "open" })
        #expect(shown.kernel == KernelTraffic(flows: 2, packets: 40, bytes: 6000))
        #expect(control.kernelSummary()?.traffic.bytes == 6000)
        #expect(RuleStore(directory: folder.path).load().rules.count == 3)
        #expect(RuleStore(directory: folder.path).load().rules.allSatisfy { $0.kernel == nil }, "counters are not stored")
    }

    @Test("a batch the kernel refuses changes nothing: no rule, no file, no element")
    func failedBatchChangesNothing() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let kernel = MemoryKernel(), clock = TestClock()
        let (control, engine) = try Self.makeControl(folder: folder, kernel: kernel, clock: clock)
        defer { engine.shutdown() }
        _ = try control.put(id: "first", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.5:3389", forwardingPath: .kernel))
        let before = kernel.elements
        kernel.state.withLock { $0.failNext = NetfilterError(operation: "test batch", errno: ENOBUFS, detail: nil) }
        let error = try #require(throws: ControlError.self) {
            try control.put(id: "second", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.6:3389", forwardingPath: .kernel))
        }
        #expect(error.status == 500 && error.field == "forwarding_path" && error.message.contains("kernel path"))
        #expect(kernel.elements == before)
        #expect(control.pushedRules().map(\.id) == ["first"])
        #expect(RuleStore(directory: folder.path).load().rules.map(\.id) == ["first"])
    }

    @Test("bad pushes for the kernel path are refused naming the field; a gateway without it refuses kernel pushes")
    func refusals() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let clock = TestClock()
        let (plain, engine) = try Self.makeControl(folder: folder, kernel: nil, clock: clock)
        defer { engine.shutdown() }
        let noKernel = try #require(throws: ControlError.self) {
            try plain.put(id: "k", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.5:3389", forwardingPath: .kernel))
        }
        #expect(noKernel.status == 409 && noKernel.field == "forwarding_path" && noKernel.message.contains("kernel_path = on"))
        #expect(plain.pushedRules().isEmpty)

        let folder2 = TempFolder()
        defer { folder2.remove() }
        let (control, engine2) = try Self.makeControl(folder: folder2, kernel: MemoryKernel(), clock: clock, defaultPath: .kernel)
        defer { engine2.shutdown() }
        let v6 = try #require(throws: ControlError.self) {
            try control.put(id: "v6", push: RulePush(protocol: .tcp, method: .randomPort, target: "[2001:db8::5]:3389"))
        }
        #expect(v6.status == 400 && v6.field == "target" && v6.message.contains("IPv4 only"), "\(v6)")
        // An explicit userspace push on a kernel-default gateway gets a listener.
        let (user, _) = try control.put(id: "user", push: RulePush(protocol: .tcp, method: .randomPort, target: "127.0.0.1:9", forwardingPath: .userspace))
        #expect(user.push.forwardingPath == nil, "userspace is stored as the default")
        #expect(engine2.rules.map(\.id) == ["broker:user"])
    }

    @Test("expiry: the kernel expires an unused rule and the core drops it; a used one loses its expiry and stays")
    func expiry() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let kernel = MemoryKernel(), clock = TestClock()
        let (control, engine) = try Self.makeControl(folder: folder, kernel: kernel, clock: clock, defaultPath: .kernel)
        defer { engine.shutdown() }
        let (unused, _) = try control.put(id: "unused", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.5:3389", unusedExpirySeconds: 60))
        let (used, _) = try control.put(id: "used", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.6:3389", unusedExpirySeconds: 60))
        // The core's clock alone never removes a kernel rule: the kernel decides.
        clock.advance(120)
        #expect(control.tick().isEmpty)
        kernel.count(Self.forward(used), flows: 1, packets: 10, bytes: 900)
        kernel.expire(Self.forward(unused))
        #expect(control.tick() == ["unused"])
        #expect(control.pushedRules().map(\.id) == ["used"])
        let element = try #require(kernel.elements[Self.forward(used)])
        #expect(element.timeout == nil, "a used rule's element is made again without expiry")
        #expect(control.pushedRules().first?.lastUsed != nil)
        // Its counters go on from where they were.
        kernel.count(Self.forward(used), flows: 1, packets: 5, bytes: 100)
        control.tick()
        #expect(control.rules().first?.kernel == KernelTraffic(flows: 2, packets: 15, bytes: 1000))
        #expect(RuleStore(directory: folder.path).load().rules.first?.lastUsed != nil, "the first use is stored")
    }

    @Test("a rule pushed between a tick's read of the table and its lock is not taken for expired")
    func pushDuringTick() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let kernel = MemoryKernel(), clock = TestClock()
        let (control, engine) = try Self.makeControl(folder: folder, kernel: kernel, clock: clock, defaultPath: .kernel)
        defer { engine.shutdown() }
        kernel.onRead.withLock { $0 = { _ = try? control.put(id: "late", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.5:3389")) } }
        #expect(control.tick().isEmpty)
        #expect(control.pushedRules().map(\.id) == ["late"], "the rule pushed during the tick was dropped")
        #expect(control.tick().isEmpty, "nor at the next tick")
        #expect(control.pushedRules().map(\.id) == ["late"])
    }

    @Test("delete removes the elements and ends their flows")
    func deleteEndsFlows() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let kernel = MemoryKernel(), clock = TestClock()
        let (control, engine) = try Self.makeControl(folder: folder, kernel: kernel, clock: clock, defaultPath: .kernel)
        defer { engine.shutdown() }
        let (rule, _) = try control.put(id: "r", push: RulePush(protocol: .both, method: .randomPortClientOnly, target: "10.1.0.5:3389", clientIP: "198.51.100.7"))
        try control.delete(id: "r")
        #expect(kernel.elements.isEmpty)
        let ended = kernel.state.withLock { $0.connectionsDeleted }
        #expect(Set(ended.map(\.key)) == [Self.forward(rule, client: "198.51.100.7"), Self.forward(rule, client: "198.51.100.7", .udp)])
        // An element the kernel already expired does not block the removal.
        let (other, _) = try control.put(id: "o", push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.5:3389"))
        kernel.expire(Self.forward(other))
        try control.delete(id: "o")
        #expect(control.pushedRules().isEmpty)
    }

    @Test("restore: held elements kept as they are, missing ones added, stale ones removed, rules expired while down dropped")
    func restore() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let kernel = MemoryKernel(), clock = TestClock()
        var rules: [RuleState] = []
        do {
            let (control, engine) = try Self.makeControl(folder: folder, kernel: kernel, clock: clock, defaultPath: .kernel)
            for id in ["kept", "usedWhileDown", "expiredWhileDown", "lostTable"] {
                rules.append(try control.put(id: id, push: RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.5:3389", unusedExpirySeconds: 60)).rule)
            }
            engine.shutdown()
        }
        // While the gateway is down: traffic on one, the kernel expires two, a stray element appears.
        kernel.count(Self.forward(rules[1]), flows: 1, packets: 3, bytes: 300)
        kernel.expire(Self.forward(rules[2]))
        kernel.expire(Self.forward(rules[3]))
        let stray = KernelForward(client: nil, publicAddress: Self.publicAddress, transport: .udp, port: 20000, target: SocketAddress("10.9.9.9:9")!)
        try kernel.apply([.add(stray, timeoutMilliseconds: nil)])
        clock.advance(120)
        // lostTable's element is missing and its time is up: dropped like expiredWhileDown.
        let (control, engine) = try Self.makeControl(folder: folder, kernel: kernel, clock: clock, defaultPath: .kernel)
        defer { engine.shutdown() }
        #expect(Set(control.pushedRules().map(\.id)) == ["kept", "usedWhileDown"])
        #expect(control.pushedRules().first { $0.id == "usedWhileDown" }?.lastUsed != nil)
        #expect(kernel.elements[stray.key] == nil, "an element no rule holds is removed")
        #expect(kernel.elements[Self.forward(rules[1])]?.packets == 3, "a held element keeps its counters")
        #expect(RuleStore(directory: folder.path).load().rules.count == 2)
    }

    @Test("offload: a client the relay admitted gets a kernel element; its rule keeps its listener")
    func offload() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let echo = try TCPEcho()
        defer { echo.stop() }
        let kernel = MemoryKernel(), clock = TestClock()
        let (control, engine) = try Self.makeControl(folder: folder, kernel: kernel, clock: clock)
        defer { engine.shutdown() }
        let (rule, _) = try control.put(id: "off", push: RulePush(protocol: .tcp, method: .randomPort, target: "\(echo.address)", forwardingPath: .offload))
        #expect(engine.rules.map(\.id) == ["broker:off"], "an offload rule keeps its userspace listener")
        #expect(kernel.elements.isEmpty, "nobody is admitted yet")
        let session = try #require(OpenSession(port: rule.port))
        defer { session.close() }
        #expect(eventually { control.tick(); return kernel.elements[Self.forward(rule, client: "127.0.0.1")] != nil },
                "the admitted client was not offloaded")
        #expect(control.pushedRules().first?.offloaded == ["127.0.0.1"])
        #expect(RuleStore(directory: folder.path).load().rules.first?.offloaded == ["127.0.0.1"], "offloaded clients survive a restart")
        try control.delete(id: "off")
        #expect(kernel.elements.isEmpty)
    }
}
