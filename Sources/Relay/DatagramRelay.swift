import EventLoop
import Logging
import Synchronization
import SystemLayer

/// Why a datagram was not relayed.
public enum DatagramDrop: String, CaseIterable, Sendable {
    /// No rule on this port allows the sender (or the rule was removed).
    case notAllowed = "not_allowed"
    /// MaxFlows (global or the listener's) was reached: no new flow.
    case flowLimit = "flow_limit"
    /// No descriptor or socket could be had for a new flow.
    case noSocket = "no_socket"
    /// Every source port of the rule is taken for this target.
    case sourcePortsExhausted = "source_ports_exhausted"
    /// The target (or client) answered with ICMP unreachable.
    case unreachable = "unreachable"
    /// The socket's send buffer was full.
    case sendBufferFull = "send_buffer_full"
    /// Any other send error (ENOBUFS, EMSGSIZE, ...).
    case sendFailed = "send_failed"
}

/// UDP figures for one rule, summed over the loops.
public struct DatagramStats: Sendable, Equatable {
    public var flowsActive = 0
    public var flowsCreated = 0
    public var flowsExpired = 0
    public var datagramsToTarget = 0
    public var bytesToTarget = 0
    public var datagramsToClient = 0
    public var bytesToClient = 0
    public var drops: [DatagramDrop: Int] = [:]

    public var totalDrops: Int { drops.values.reduce(0, +) }

    mutating func add(_ other: DatagramStats) {
        flowsActive += other.flowsActive
        flowsCreated += other.flowsCreated
        flowsExpired += other.flowsExpired
        datagramsToTarget += other.datagramsToTarget
        bytesToTarget += other.bytesToTarget
        datagramsToClient += other.datagramsToClient
        bytesToClient += other.bytesToClient
        for (reason, count) in other.drops { drops[reason, default: 0] += count }
    }
}

/// One live UDP flow, as reported by `RelayEngine.flows()`.
public struct FlowInfo: Sendable, Equatable {
    public let rule: String
    public let client: SocketAddress
    public let target: SocketAddress
    /// The local port the flow's datagrams leave from toward the target.
    public let sourcePort: UInt16
    public let datagramsToTarget: Int
    public let bytesToTarget: Int
    public let datagramsToClient: Int
    public let bytesToClient: Int
}

/// A loop's running UDP figures for one rule. Loop-thread only; read by a
/// command on the loop, so plain integers suffice.
final class DatagramCounters {
    var stats = DatagramStats()

    @inline(__always)
    func drop(_ reason: DatagramDrop, _ count: Int = 1) { stats.drops[reason, default: 0] += count }
}

/// Which (source port, target) pairs are taken by fixed-source-port flows,
/// across all loops: two flows on the same pair could not be told apart by
/// the kernel, so a second flow to the same target takes the next port of
/// the rule's range (the collaboration case). Touched only when a flow
/// opens or closes, never per datagram.
public final class SourcePortRegistry: Sendable {
    private struct Key: Hashable { let port: UInt16; let target: SocketAddress }
    private let taken = Mutex<Set<Key>>([])

    public init() {}

    /// Claims the first port of `range` not yet used toward `target`.
    func claim(_ range: ClosedRange<UInt16>, toward target: SocketAddress) -> UInt16? {
        taken.withLock { set in
            for port in range where !set.contains(Key(port: port, target: target)) {
                set.insert(Key(port: port, target: target))
                return port
            }
            return nil
        }
    }

    /// Marks `port` taken toward `target` (a flow handed over by a predecessor).
    func take(_ port: UInt16, toward target: SocketAddress) {
        _ = taken.withLock { $0.insert(Key(port: port, target: target)) }
    }

    func release(_ port: UInt16, toward target: SocketAddress) {
        _ = taken.withLock { $0.remove(Key(port: port, target: target)) }
    }

    public var count: Int { taken.withLock { $0.count } }
}

/// A loop's UDP socket for one listening address and the flows it carries.
/// The kernel spreads datagrams over the loops' SO_REUSEPORT sockets by the
/// sender's address, so a client's flow always lives on one loop.
final class DatagramListener: EventHandler {
    let fd: FileDescriptor
    var rules: ListenerRules
    unowned let context: LoopContext
    /// Bound to a wildcard address: replies must name the source address the
    /// client used (IP_PKTINFO), or the kernel might pick another.
    let wildcard: Bool
    private(set) var flows: [SocketAddress: DatagramFlow] = [:]
    private var closed = false

    init(fd: FileDescriptor, rules: ListenerRules, context: LoopContext) {
        self.fd = fd
        self.rules = rules
        self.context = context
        wildcard = rules.address.ip.isUnspecified
    }

    /// Reads up to eight batches per readiness event (the socket is
    /// level-triggered, so the rest is reported again), to stay fair to the
    /// loop's other work.
    func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop) {
        let rx = context.datagramsIn
        for _ in 0..<8 {
            guard !closed else { return }
            let result: IOResult<Int>
            do { result = try rx.receive(on: fd) } catch { return }
            guard case .done(let count) = result else { return }
            forward(rx, count, loop: loop)
            if count < rx.capacity { return }
        }
    }

    /// Sends each received datagram on its flow's upstream socket, opening
    /// flows for new senders; consecutive datagrams of one flow go out in one
    /// sendmmsg.
    private func forward(_ rx: DatagramBatch, _ count: Int, loop: EventLoop) {
        let tx = context.datagramsOut
        tx.reset()
        var current: DatagramFlow?
        for i in 0..<count {
            guard let peer = rx.peer(i) else { continue }
            let flow: DatagramFlow
            if let c = current, c.client == peer {
                flow = c
            } else if let known = flows[peer] {
                flow = known
            } else {
                guard let opened = openFlow(for: peer, local: wildcard ? rx.localDestination(i) : nil, loop: loop) else { continue }
                flow = opened
            }
            if flow !== current {
                current?.sendUpstream(tx)
                tx.reset()
                current = flow
            }
            flow.lastActivity = loop.now
            _ = tx.append(from: rx, index: i, to: nil, source: nil)
        }
        current?.sendUpstream(tx)
        tx.reset()
    }

    private func openFlow(for client: SocketAddress, local: IPAddress?, loop: EventLoop) -> DatagramFlow? {
        guard let rule = rules.match(client.ip.unmapped) else {
            context.unmatchedDrops += 1
            context.log.limited(.refusal, "udp: dropped datagrams from \(client) on \(rules.address): no rule on this port allows this client",
                                ["client": "\(client)", "reason": "not_allowed"])
            return nil
        }
        let counters = context.datagramCounters(for: rule.id)
        if let reason = context.flowAdmission.admit(rules.gate) {
            counters.drop(.flowLimit)
            context.log.limited(.refusal, "udp: no new flow for \(client) on \(rules.address): \(reason == .globalLimit ? "MaxFlows (\(context.flowAdmission.global.limit))" : "listener MaxFlows (\(rules.gate.limit))") reached")
            return nil
        }
        // Routed UDP: the rule's router names this flow's target and port.
        var route: DatagramRoute?
        if let router = rule.router?.router {
            guard let chosen = router.route(client: client, rule: rule.id) else {
                context.flowAdmission.release(rules.gate)
                counters.drop(.notAllowed)
                context.log.limited(.refusal, "udp: dropped datagrams from \(client) on rule \"\(rule.id)\": its router has no route for this client")
                return nil
            }
            route = chosen
        }
        let target = route?.target ?? rule.target
        /// Gives the route back when the flow cannot open.
        func abandon() {
            if let route { rule.router?.router.flowEnded(client: client, route: route) }
            context.flowAdmission.release(rules.gate)
        }
        var sourcePort: UInt16?
        if let range = route?.sourcePort.map({ $0...$0 }) ?? rule.sourcePorts {
            guard let port = context.sourcePorts.claim(range, toward: target) else {
                abandon()
                counters.drop(.sourcePortsExhausted)
                context.log.limited(.refusal, "udp: no new flow for \(client) on rule \"\(rule.id)\": source ports \(range) all in use toward \(target)")
                return nil
            }
            sourcePort = port
        }
        let upstream: FileDescriptor
        do {
            upstream = try Socket.connectUDP(to: target, sourcePort: sourcePort,
                                             receiveBuffer: context.settings.udpReceiveBuffer,
                                             sendBuffer: context.settings.udpSendBuffer)
        } catch {
            if let port = sourcePort { context.sourcePorts.release(port, toward: target) }
            abandon()
            counters.drop(.noSocket)
            context.log.limited(.connectFailure, "udp: cannot open a socket toward \(target) for rule \"\(rule.id)\": \(error)")
            return nil
        }
        let flow = DatagramFlow(fd: upstream, client: client, local: local, rule: rule, target: target, route: route,
                                listener: self, counters: counters, sourcePort: sourcePort, now: loop.now)
        do {
            try loop.register(upstream, interest: [.readable], handler: flow)
        } catch {
            upstream.close()
            if let port = sourcePort { context.sourcePorts.release(port, toward: target) }
            abandon()
            counters.drop(.noSocket)
            return nil
        }
        flows[client] = flow
        counters.stats.flowsCreated += 1
        counters.stats.flowsActive += 1
        return flow
    }

    /// Takes a flow handed over by a predecessor.
    func adoptFlow(_ flow: DatagramFlow) {
        flows[flow.client] = flow
        flow.counters.stats.flowsActive += 1
    }

    /// Removes flows idle for longer than their rule allows.
    func expire(now: UInt64) {
        var idle: [DatagramFlow] = []
        for flow in flows.values where now &- flow.lastActivity >= flow.rule.udpIdleTimeoutNanoseconds {
            idle.append(flow)
        }
        for flow in idle {
            flow.counters.stats.flowsExpired += 1
            closeFlow(flow)
        }
    }

    func closeFlow(_ flow: DatagramFlow) {
        guard flows.removeValue(forKey: flow.client) != nil else { return }
        flow.close()
        context.flowAdmission.release(rules.gate)
    }

    /// Closes the socket and every flow (the rule was removed, or shutdown).
    func close() {
        guard !closed else { return }
        closed = true
        for flow in Array(flows.values) { closeFlow(flow) }
        context.loop.deregister(fd)
        fd.close()
    }
}

/// One client's UDP flow: its own connected upstream socket, so the kernel
/// hands each reply to the right flow, even when flows share a fixed
/// source port toward different targets.
final class DatagramFlow: EventHandler {
    let fd: FileDescriptor
    let client: SocketAddress
    /// The address the client sent to (wildcard listeners only).
    let local: IPAddress?
    let rule: RelayRule
    /// Where this flow goes: the rule's target, or its router's choice.
    let target: SocketAddress
    /// The router's choice, handed back when the flow closes.
    let route: DatagramRoute?
    unowned let listener: DatagramListener
    let counters: DatagramCounters
    let sourcePort: UInt16?
    var lastActivity: UInt64
    var datagramsToTarget = 0
    var bytesToTarget = 0
    var datagramsToClient = 0
    var bytesToClient = 0
    private var closed = false

    init(fd: FileDescriptor, client: SocketAddress, local: IPAddress?, rule: RelayRule, target: SocketAddress,
         route: DatagramRoute?, listener: DatagramListener, counters: DatagramCounters, sourcePort: UInt16?, now: UInt64) {
        self.fd = fd
        self.client = client
        self.local = local
        self.rule = rule
        self.target = target
        self.route = route
        self.listener = listener
        self.counters = counters
        self.sourcePort = sourcePort
        lastActivity = now
    }

    /// Sends the batch on the upstream socket; what cannot be sent is dropped
    /// and counted (UDP has no backpressure to give).
    @inline(__always)
    func sendUpstream(_ tx: DatagramBatch) {
        let sent = DatagramFlow.send(tx, on: fd, counters: counters, context: listener.context)
        datagramsToTarget += sent.datagrams
        bytesToTarget += sent.bytes
        counters.stats.datagramsToTarget += sent.datagrams
        counters.stats.bytesToTarget += sent.bytes
    }

    /// Replies from the target, relayed to the client from the address it used.
    func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop) {
        let context = listener.context
        let rx = context.datagramsIn
        let tx = context.datagramsOut
        for _ in 0..<8 {
            guard !closed else { return }
            let result: IOResult<Int>
            do {
                result = try rx.receive(on: fd)
            } catch {
                // ICMP port unreachable from the target shows up here; the
                // error is consumed by reading it, and the flow stays.
                counters.drop(error == .connectionRefused ? .unreachable : .sendFailed)
                continue
            }
            guard case .done(let count) = result else { return }
            tx.reset()
            for i in 0..<count {
                _ = tx.append(from: rx, index: i, to: client, source: local)
            }
            lastActivity = loop.now
            let sent = DatagramFlow.send(tx, on: listener.fd, counters: counters, context: context)
            datagramsToClient += sent.datagrams
            bytesToClient += sent.bytes
            counters.stats.datagramsToClient += sent.datagrams
            counters.stats.bytesToClient += sent.bytes
            tx.reset()
            if count < rx.capacity { return }
        }
    }

    /// Sends every queued datagram (runs of equal sizes as one GSO send),
    /// skipping one that fails and dropping the rest when the socket is full.
    /// - Returns: the datagrams and bytes sent.
    @inline(__always)
    static func send(_ tx: DatagramBatch, on fd: FileDescriptor, counters: DatagramCounters,
                     context: LoopContext) -> (datagrams: Int, bytes: Int) {
        var start = 0
        let total = tx.pending
        var datagrams = 0, bytes = 0
        while start < total {
            do {
                switch try tx.sendFlow(on: fd, from: start, gso: &context.segmentation) {
                case .done(let n):
                    for i in start..<(start + n) { bytes += tx.queuedLength(i) }
                    datagrams += n
                    start += max(n, 1)
                case .wouldBlock:
                    counters.drop(.sendBufferFull, total - start)
                    return (datagrams, bytes)
                }
            } catch {
                counters.drop(error == .connectionRefused ? .unreachable : .sendFailed)
                start += 1
            }
        }
        return (datagrams, bytes)
    }

    func close() {
        guard !closed else { return }
        closed = true
        counters.stats.flowsActive -= 1
        let loop = listener.context.loop
        loop.forget(fd)
        fd.close()
        if let port = sourcePort { listener.context.sourcePorts.release(port, toward: target) }
        if let route { rule.router?.router.flowEnded(client: client, route: route) }
    }

    /// This flow as a handover record with its socket.
    func handoverRecord(loop: Int, now: UInt64) -> HandedSocket {
        let state = HandoverRecord.FlowState(local: local.map { "\($0)" }, sourcePort: sourcePort,
                                             idleNanoseconds: now &- lastActivity,
                                             datagramsToTarget: datagramsToTarget, bytesToTarget: bytesToTarget,
                                             datagramsToClient: datagramsToClient, bytesToClient: bytesToClient)
        return HandedSocket(record: HandoverRecord(kind: .flow, loop: loop, listen: "\(listener.rules.address)", descriptors: 1,
                                                   rule: rule.id, target: "\(target)", client: "\(client)", flow: state),
                            descriptors: [fd])
    }

    var info: FlowInfo {
        FlowInfo(rule: rule.id, client: client, target: target,
                 sourcePort: sourcePort ?? Socket.localAddress(fd)?.port ?? 0,
                 datagramsToTarget: datagramsToTarget, bytesToTarget: bytesToTarget,
                 datagramsToClient: datagramsToClient, bytesToClient: bytesToClient)
    }
}
