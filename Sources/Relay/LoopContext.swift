import EventLoop
import Logging
import SystemLayer

/// A loop's share of the relay: its listening sockets, its connections, its
/// pipe pool and counters. Touched only on the loop's thread.
final class LoopContext: TimerHandler {
    unowned let loop: EventLoop
    let settings: RelaySettings
    let admission: AdmissionControl
    let flowAdmission: AdmissionControl
    let sourcePorts: SourcePortRegistry
    let counters = LoopCounters()
    /// The loop's datagram batches, reused for every recvmmsg/sendmmsg.
    let datagramsIn: DatagramBatch
    let datagramsOut: DatagramBatch
    /// UDP GSO sends (settings.udpSegmentation, cleared when the system refuses it).
    var segmentation: Bool
    private var udpListeners: [SocketAddress: DatagramListener] = [:]
    private var datagramCountersByRule: [String: DatagramCounters] = [:]
    /// Datagrams from senders no rule allows, on any UDP listener of this loop.
    var unmatchedDrops = 0
    private var sweeping = false
    let pool: PipePool
    let log: RateLimitedLog
    fileprivate(set) var connections: [UInt64: RelayConnection] = [:]
    /// Connections of inspect-first rules whose inspector has not decided yet.
    private(set) var inspecting: [UInt64: InspectingConnection] = [:]
    /// Per rule id: connections accepted since the rule was installed (so the
    /// control plane sees a rule used even by a session that ended between
    /// two of its looks) and bytes of closed connections (live ones are added
    /// at read time, for `/metrics`). Looked up here once per rule change;
    /// connections and listeners hold their rule's object.
    private var tcpCountersByRule: [String: TCPRuleCounters] = [:]
    /// Connections accepted per rule id since the rule was installed.
    var acceptedByRule: [String: Int] { tcpCountersByRule.compactMapValues { $0.accepted > 0 ? $0.accepted : nil } }
    private var listeners: [SocketAddress: ListenerHandler] = [:]
    fileprivate var nextID: UInt64 = 0
    private var reserve: FileDescriptor?
    private(set) var draining = false
    /// Handed over (hot upgrade): nothing is watched; timers only wait.
    private(set) var suspended = false
    /// Handed UDP listeners not read yet (their flows are adopted first).
    private var heldDatagramListeners: [SocketAddress] = []

    init(loop: EventLoop, settings: RelaySettings, admission: AdmissionControl, flowAdmission: AdmissionControl,
         sourcePorts: SourcePortRegistry, budget: PipeBudget, logger: Logger) {
        self.loop = loop
        self.settings = settings
        self.admission = admission
        self.flowAdmission = flowAdmission
        self.sourcePorts = sourcePorts
        let batch = min(max(settings.udpBatch, 1), 64)
        datagramsIn = DatagramBatch(capacity: batch, bufferSize: 65536)
        datagramsOut = DatagramBatch(capacity: batch, bufferSize: 0)
        segmentation = settings.udpSegmentation
        pool = PipePool(budget: budget, pipeSize: settings.pipeSize, maxIdle: settings.idlePipesPerLoop)
        log = RateLimitedLog(logger: logger)
        reserve = try? FileDescriptor.openReadOnly("/dev/null")
        nextID = UInt64(loop.id) << 48
    }

    // MARK: Rules

    /// A change of rules as a loop sees it: the new rules of each address
    /// touched (nil: its listener closes), the rule ids gone, and the UDP
    /// addresses whose new sockets are registered without interest until
    /// `releaseHeldDatagramListeners` (a hot upgrade's handed sockets, read
    /// only once their flows are adopted).
    struct RuleDelta: Sendable {
        var tcp: [SocketAddress: ListenerRules?]
        var udp: [SocketAddress: ListenerRules?]
        var removedIDs: [String]
        /// Rules removed or replaced: only their UDP flows can have lost their rule.
        var changedIDs: Set<String> = []
        var held: Set<SocketAddress> = []
    }

    /// Applies `delta` to the addresses it names, and to nothing else:
    /// listeners whose address lost its last rule close (their established
    /// connections go on), new ones are registered with the sockets the
    /// engine opened for this loop, kept ones get their new rules.
    func install(_ delta: RuleDelta, newSockets: [SocketAddress: FileDescriptor],
                 newDatagramSockets: [SocketAddress: FileDescriptor] = [:]) {
        installDatagram(delta, newSockets: newDatagramSockets)
        for id in delta.removedIDs { tcpCountersByRule[id] = nil }
        for (address, change) in delta.tcp {
            guard let rules = change else {
                listeners.removeValue(forKey: address)?.close()
                continue
            }
            if let listener = listeners[address] {
                listener.rules = rules
                listener.ruleCounters = rules.rules.map { tcpCounters(for: $0.id) }
            } else if let fd = newSockets[address] {
                let listener = ListenerHandler(fd: fd, rules: rules, context: self)
                listener.ruleCounters = rules.rules.map { tcpCounters(for: $0.id) }
                do {
                    try loop.register(fd, interest: [.readable], handler: listener)
                    listeners[address] = listener
                } catch {
                    log.logger.error("cannot watch listener \(address) on loop \(loop.id): \(error)")
                    fd.close()
                }
            }
        }
    }

    /// Stops accepting: closes every listener and refuses what is still queued.
    /// UDP listeners close with their flows (a datagram flow has nothing to drain).
    func stopListening() {
        draining = true
        for listener in listeners.values { listener.close() }
        listeners.removeAll()
        for listener in udpListeners.values { listener.close() }
        udpListeners.removeAll()
    }

    // MARK: UDP

    private func installDatagram(_ delta: RuleDelta, newSockets: [SocketAddress: FileDescriptor]) {
        for (address, change) in delta.udp {
            guard let rules = change else {
                // The rule is gone: its flows end with it (replies could not be
                // sent without the listening socket), and later datagrams from
                // their clients meet a closed port.
                udpListeners.removeValue(forKey: address)?.close()
                continue
            }
            if let listener = udpListeners[address] {
                listener.rules = rules
                // Flows whose rule no longer admits their client end now
                // (only a removed or replaced rule can do that: rules only
                // added cost no look at the flows).
                if !delta.changedIDs.isEmpty {
                    for flow in Array(listener.flows.values) where delta.changedIDs.contains(flow.rule.id) && !rules.contains(flow.rule) {
                        listener.closeFlow(flow)
                    }
                }
            } else if let fd = newSockets[address] {
                let listener = DatagramListener(fd: fd, rules: rules, context: self)
                do {
                    let held = delta.held.contains(address)
                    try loop.register(fd, interest: held ? [] : [.readable], handler: listener)
                    if held { heldDatagramListeners.append(address) }
                    udpListeners[address] = listener
                } catch {
                    log.logger.error("cannot watch udp listener \(address) on loop \(loop.id): \(error)")
                    fd.close()
                }
            }
        }
        if !udpListeners.isEmpty && !sweeping {
            sweeping = true
            loop.schedule(afterNanoseconds: LoopContext.sweepInterval, target: self)
        }
    }

    static let sweepInterval: UInt64 = 1_000_000_000

    /// Once a second: expire idle UDP flows.
    func timerFired(tag: Int, loop: EventLoop) {
        if suspended {
            loop.schedule(afterNanoseconds: LoopContext.sweepInterval, target: self)
            return
        }
        for listener in udpListeners.values { listener.expire(now: loop.now) }
        if udpListeners.isEmpty {
            sweeping = false
        } else {
            loop.schedule(afterNanoseconds: LoopContext.sweepInterval, target: self)
        }
    }

    /// A rule's TCP counters on this loop (made at its first use).
    func tcpCounters(for ruleID: String) -> TCPRuleCounters {
        if let counters = tcpCountersByRule[ruleID] { return counters }
        let counters = TCPRuleCounters()
        tcpCountersByRule[ruleID] = counters
        return counters
    }

    func datagramCounters(for ruleID: String) -> DatagramCounters {
        if let counters = datagramCountersByRule[ruleID] { return counters }
        let counters = DatagramCounters()
        datagramCountersByRule[ruleID] = counters
        return counters
    }

    /// This loop's UDP figures by rule.
    func datagramStats() -> [String: DatagramStats] { datagramCountersByRule.mapValues(\.stats) }

    /// TCP traffic per rule id on this loop: connections accepted, live, and
    /// bytes each way (closed connections plus what live ones delivered so far).
    func tcpTraffic() -> [String: TCPRuleTraffic] {
        var all: [String: TCPRuleTraffic] = [:]
        for (id, counters) in tcpCountersByRule where counters.accepted > 0 {
            all[id, default: TCPRuleTraffic()].accepted = counters.accepted
            all[id, default: TCPRuleTraffic()].bytesToTarget += counters.closed.toTarget
            all[id, default: TCPRuleTraffic()].bytesToClient += counters.closed.toClient
        }
        for connection in connections.values {
            var traffic = all[connection.rule.id, default: TCPRuleTraffic()]
            traffic.active += 1
            traffic.bytesToTarget += Int(truncatingIfNeeded: connection.toTarget.delivered &+ connection.replayedBytes)
            traffic.bytesToClient += Int(truncatingIfNeeded: connection.toClient.delivered)
            all[connection.rule.id] = traffic
        }
        for connection in inspecting.values { all[connection.rule.id, default: TCPRuleTraffic()].active += 1 }
        return all
    }

    /// This loop's live UDP flows.
    func flowInfos() -> [FlowInfo] { udpListeners.values.flatMap { $0.flows.values.map(\.info) } }

    /// Closes the connections of `ruleID` with a reset on both sides.
    /// - Returns: how many were closed.
    func revoke(ruleID: String) -> Int {
        let doomed = connections.values.filter { $0.rule.id == ruleID }
        for connection in doomed {
            connection.close(resetClient: true, resetUpstream: true)
            counters.bump(counters.revoked)
        }
        let undecided = inspecting.values.filter { $0.rule.id == ruleID }
        for connection in undecided {
            abortInspection(connection)
            counters.bump(counters.revoked)
        }
        return doomed.count + undecided.count
    }

    /// Resets every connection an inspector started whose inspection
    /// `predicate` picks (a revoked session), counted as revoked.
    func closeInspected(where predicate: (any Inspection) -> Bool) -> Int {
        var doomed: [RelayConnection] = []
        for connection in connections.values {
            if let inspection = connection.inspection, predicate(inspection) { doomed.append(connection) }
        }
        for connection in doomed {
            connection.close(resetClient: true, resetUpstream: true)
            counters.bump(counters.revoked)
        }
        return doomed.count
    }

    /// Closes the UDP flows `predicate` picks (their session ended); returns how many.
    func closeFlows(where predicate: (FlowInfo) -> Bool) -> Int {
        var closed = 0
        for listener in udpListeners.values {
            for flow in Array(listener.flows.values) where predicate(flow.info) {
                listener.closeFlow(flow)
                closed += 1
            }
        }
        return closed
    }

    /// Closes every connection (the end of a drain).
    func closeAll() -> Int {
        let all = Array(connections.values)
        for connection in all { connection.close(resetClient: true, resetUpstream: true) }
        let undecided = Array(inspecting.values)
        for connection in undecided { abortInspection(connection) }
        pool.drainIdle()
        return all.count + undecided.count
    }

    // MARK: Accepting

    /// Takes a new client from `listener`: admission, rule match, then the
    /// upstream connect. A refused client is reset at once.
    func accepted(_ accepted: AcceptedConnection, on listener: ListenerHandler) {
        counters.bump(counters.accepted)
        if draining { return refuse(accepted, listener: listener, reason: .draining) }
        guard let position = listener.rules.matchPosition(accepted.peer.ip.unmapped) else {
            return refuse(accepted, listener: listener, reason: .notAllowed)
        }
        let rule = listener.rules.rules[position]
        let ruleCounters = listener.ruleCounters[position]
        let gate = listener.rules.gate
        if let reason = admission.admit(gate) {
            return refuse(accepted, listener: listener, reason: reason)
        }
        if let inspector = rule.inspector {
            return startInspection(accepted, rule: rule, inspector: inspector.inspector, gate: gate, ruleCounters: ruleCounters)
        }
        let upstream: FileDescriptor
        do {
            upstream = try Socket.makeTCP(family: rule.target.family)
        } catch {
            admission.release(gate)
            if error.isDescriptorExhaustion {
                return refuse(accepted, listener: listener, reason: .descriptorsExhausted)
            }
            counters.bump(counters.connectOtherFailure)
            log.limited(.connectFailure, "cannot open a socket to \(rule.target) for rule \"\(rule.id)\": \(error)")
            Socket.setResetOnClose(accepted.fd)
            accepted.fd.close()
            return
        }
        // The accepted socket inherits TCP_NODELAY, keepalive and
        // TCP_USER_TIMEOUT from its listener (set once in `RelayEngine.apply`).
        Socket.setNoDelay(upstream)
        nextID &+= 1
        let connection = RelayConnection(id: nextID, client: accepted.fd, upstream: upstream, clientAddress: accepted.peer,
                                         rule: rule, gate: gate, ruleCounters: ruleCounters, context: self, now: loop.now)
        let interest: EpollEvents = [.readable, .writable, .readHangUp, .edgeTriggered]
        do {
            try loop.register(accepted.fd, interest: interest, handler: connection)
            try loop.register(upstream, interest: interest, handler: connection)
        } catch {
            loop.deregister(accepted.fd)
            admission.release(gate)
            Socket.setResetOnClose(accepted.fd)
            accepted.fd.close()
            upstream.close()
            counters.bump(counters.connectOtherFailure)
            log.limited(.connectFailure, "cannot watch connection from \(accepted.peer): \(error)")
            return
        }
        connections[connection.id] = connection
        ruleCounters.accepted &+= 1
        counters.bump(counters.active)
        connection.startConnect(loop: loop)
    }

    // MARK: Inspect first

    /// Reads the client's first bytes for the rule's inspector before any upstream connect.
    private func startInspection(_ accepted: AcceptedConnection, rule: RelayRule, inspector: any ConnectionInspector,
                                 gate: AdmissionGate, ruleCounters: TCPRuleCounters) {
        nextID &+= 1
        let connection = InspectingConnection(id: nextID, client: accepted.fd, clientAddress: accepted.peer, rule: rule,
                                              inspector: inspector, gate: gate, context: self, now: loop.now)
        do {
            try loop.register(accepted.fd, interest: [.readable, .readHangUp], handler: connection)
        } catch {
            connection.abort()
            admission.release(gate)
            counters.bump(counters.connectOtherFailure)
            log.limited(.connectFailure, "cannot watch connection from \(accepted.peer): \(error)")
            return
        }
        inspecting[connection.id] = connection
        ruleCounters.accepted &+= 1
        counters.bump(counters.active)
    }

    /// The inspector refused the client: reset at once, counted by reason.
    func inspectionRefused(_ connection: InspectingConnection, reason: String) {
        connection.abort()
        endInspection(connection)
        counters.countInspectionRefusal(reason)
        log.limited(.refusal, "refused \(connection.clientAddress) on \(connection.rule.listen) (rule \"\(connection.rule.id)\"): \(reason)",
                    ["client": "\(connection.clientAddress)", "rule": "\(connection.rule.id)", "reason": "\(reason)"])
    }

    /// A revoke or a drain ends an undecided connection.
    private func abortInspection(_ connection: InspectingConnection) {
        connection.abort()
        endInspection(connection)
    }

    private func endInspection(_ connection: InspectingConnection) {
        inspecting[connection.id] = nil
        admission.release(connection.gate)
        counters.bump(counters.active, by: -1)
        counters.bump(counters.closed)
    }

    /// The inspector chose `target`: the client socket, its admission slot
    /// and the bytes read move to a `RelayConnection`, which connects, writes
    /// them first and then relays as for any rule.
    func inspectionConnect(_ connection: InspectingConnection, target: SocketAddress) {
        inspecting[connection.id] = nil
        loop.deregister(connection.client)
        let rule = connection.rule
        let upstream: FileDescriptor
        do {
            upstream = try Socket.makeTCP(family: target.family)
        } catch {
            counters.bump(counters.connectOtherFailure)
            log.limited(.connectFailure, "cannot open a socket to \(target) for rule \"\(rule.id)\": \(error)")
            Socket.setResetOnClose(connection.client)
            connection.client.close()
            admission.release(connection.gate)
            counters.bump(counters.active, by: -1)
            counters.bump(counters.closed)
            connection.inspection.sessionEnded()
            return
        }
        Socket.setNoDelay(upstream)
        let relay = RelayConnection(id: connection.id, client: connection.client, upstream: upstream,
                                    clientAddress: connection.clientAddress, rule: rule, target: target, gate: connection.gate,
                                    ruleCounters: tcpCounters(for: rule.id), context: self, now: loop.now, replay: connection.bytes,
                                    inspection: connection.inspection, startedAt: connection.startedAt)
        let interest: EpollEvents = [.readable, .writable, .readHangUp, .edgeTriggered]
        do {
            try loop.register(connection.client, interest: interest, handler: relay)
            try loop.register(upstream, interest: interest, handler: relay)
        } catch {
            loop.deregister(connection.client)
            Socket.setResetOnClose(connection.client)
            connection.client.close()
            upstream.close()
            admission.release(connection.gate)
            counters.bump(counters.active, by: -1)
            counters.bump(counters.closed)
            counters.bump(counters.connectOtherFailure)
            connection.inspection.sessionEnded()
            log.limited(.connectFailure, "cannot watch connection from \(connection.clientAddress): \(error)")
            return
        }
        connections[relay.id] = relay
        relay.startConnect(loop: loop)
    }

    private func refuse(_ accepted: AcceptedConnection, listener: ListenerHandler, reason: RefusalReason) {
        counters.countRefusal(reason)
        Socket.setResetOnClose(accepted.fd)
        accepted.fd.close()
        log.limited(.refusal, "refused \(accepted.peer) on \(listener.rules.address): \(Self.explain(reason, listener.rules.gate, admission))",
                    ["client": "\(accepted.peer)", "reason": "\(reason.rawValue)"])
    }

    static func explain(_ reason: RefusalReason, _ gate: AdmissionGate, _ admission: AdmissionControl) -> String {
        switch reason {
        case .globalLimit: "MaxConnections (\(admission.global.limit)) reached"
        case .listenerLimit: "listener MaxConnections (\(gate.limit)) reached"
        case .notAllowed: "no rule on this port allows this client"
        case .descriptorsExhausted: "out of file descriptors"
        case .draining: "shutting down"
        }
    }

    /// The process is out of descriptors: refuse the client at the head of the
    /// queue with the reserve descriptor's help, so it is told at once rather
    /// than left waiting, and pause the listener briefly so that a full accept
    /// queue cannot spin the loop.
    func descriptorsExhausted(on listener: ListenerHandler) {
        counters.countRefusal(.descriptorsExhausted)
        log.limited(.descriptors, "out of file descriptors (limit \(ProcessResources.openFilesLimit)) on \(listener.rules.address): refusing new clients until some close")
        if let spare = reserve {
            spare.close()
            reserve = nil
            if case .done(let victim)? = try? Socket.accept(listener.fd) {
                Socket.setResetOnClose(victim.fd)
                victim.fd.close()
            }
            reserve = try? FileDescriptor.openReadOnly("/dev/null")
        }
        listener.pause(nanoseconds: 50_000_000)
    }

    func connectionClosed(_ connection: RelayConnection, wasEstablished: Bool) {
        connections[connection.id] = nil
        admission.release(connection.gate)
        counters.bump(counters.active, by: -1)
        counters.bump(counters.closed)
        counters.bump(counters.bytesClientToTarget, by: Int(truncatingIfNeeded: connection.toTarget.delivered &+ connection.replayedBytes))
        counters.bump(counters.bytesTargetToClient, by: Int(truncatingIfNeeded: connection.toClient.delivered))
        connection.ruleCounters.closed.add(
            toTarget: Int(truncatingIfNeeded: connection.toTarget.delivered &+ connection.replayedBytes),
            toClient: Int(truncatingIfNeeded: connection.toClient.delivered))
        if log.logger.logLevel <= .debug {
            let seconds = Double(loop.now &- connection.startedAt) / 1e9
            log.logger.debug("closed \(connection.clientAddress) -> \(connection.target) rule=\(connection.rule.id) established=\(wasEstablished) bytes_to_target=\(connection.toTarget.delivered) bytes_to_client=\(connection.toClient.delivered) seconds=\(seconds)")
        }
    }
}

// MARK: Hot upgrade

extension LoopContext {
    /// Stops watching every listener, connection and flow of this loop,
    /// closing nothing, and describes them with their descriptors.
    func suspendForHandover() -> [HandedSocket] {
        suspended = true
        var handed: [HandedSocket] = []
        let id = loop.id
        for (address, listener) in listeners {
            loop.deregister(listener.fd)
            handed.append(HandedSocket(record: HandoverRecord(kind: .tcpListener, loop: id, listen: "\(address)", descriptors: 1),
                                       descriptors: [listener.fd]))
        }
        for (address, listener) in udpListeners {
            loop.deregister(listener.fd)
            handed.append(HandedSocket(record: HandoverRecord(kind: .udpListener, loop: id, listen: "\(address)", descriptors: 1),
                                       descriptors: [listener.fd]))
            for flow in listener.flows.values {
                loop.deregister(flow.fd)
                handed.append(flow.handoverRecord(loop: id, now: loop.now))
            }
        }
        for connection in connections.values {
            connection.suspend()
            if let record = connection.handoverRecord(loop: id, now: loop.now) { handed.append(record) }
        }
        return handed
    }

    /// The handover did not happen: everything is watched again, as it was.
    func resumeAfterHandover() {
        suspended = false
        for listener in listeners.values {
            listener.resumeAfterHandover()
        }
        for listener in udpListeners.values {
            try? loop.register(listener.fd, interest: [.readable], handler: listener)
            for flow in listener.flows.values { try? loop.register(flow.fd, interest: [.readable], handler: flow) }
        }
        for connection in Array(connections.values) { connection.resume() }
    }

    /// The successor holds everything: our descriptors close without a word
    /// to any peer (the sockets live on in the successor).
    func releaseAfterHandover() {
        for listener in listeners.values { listener.close() }
        listeners.removeAll()
        // Flows were taken out of epoll at suspension; closing a listener
        // closes its flows' descriptors without sending anything.
        for listener in udpListeners.values { listener.close() }
        udpListeners.removeAll()
        for connection in Array(connections.values) { connection.releaseHandedOver() }
        pool.drainIdle()
    }

    /// Starts reading the handed UDP listeners (their flows are adopted).
    func releaseHeldDatagramListeners() {
        for address in heldDatagramListeners {
            if let listener = udpListeners[address] { try? loop.modify(listener.fd, interest: [.readable]) }
        }
        heldDatagramListeners.removeAll()
    }

    /// Takes a connection or flow a predecessor handed over (its rule
    /// looked up in `rules` by id, else rebuilt from the record), watches it
    /// and pumps it. On failure its descriptors are closed.
    /// - Returns: nil, or why it was refused.
    func adopt(_ item: HandedSocket, gates: [SocketAddress: AdmissionGate], byID: [String: RelayRule]) -> String? {
        let record = item.record
        func refuse(_ reason: String) -> String {
            item.descriptors.forEach { $0.close() }
            return "\(record.kind.rawValue) \(record.client ?? "?") on \(record.listen): \(reason)"
        }
        guard let listen = SocketAddress(record.listen), let client = record.client.flatMap(SocketAddress.init),
              let target = record.target.flatMap(SocketAddress.init), let ruleID = record.rule else {
            return refuse("addresses or rule missing")
        }
        switch record.kind {
        case .connection:
            guard let state = record.connection else { return refuse("no connection state") }
            // The connection keeps going where it went (`target`), whatever its rule says now.
            let rule = byID[ruleID] ?? RelayRule(id: ruleID, listen: listen, target: target,
                                                 idleTimeoutNanoseconds: state.idleTimeoutNanoseconds)
            let gate = gates[listen] ?? AdmissionGate.unlimited(record.listen)
            let ruleCounters = tcpCounters(for: ruleID)
            nextID &+= 1
            let connection: RelayConnection
            do throws(HandoverError) {
                connection = try RelayConnection.adopted(item, state: state, id: nextID, clientAddress: client, rule: rule,
                                                         target: target, gate: gate, ruleCounters: ruleCounters, context: self)
            } catch {
                return refuse(error.message)
            }
            admission.force(gate)
            connections[connection.id] = connection
            ruleCounters.accepted &+= 1
            counters.bump(counters.active)
            connection.resume()
            return nil
        case .flow:
            guard let state = record.flow else { return refuse("no flow state") }
            guard let listener = udpListeners[listen] else { return refuse("no UDP listener for it on this loop") }
            guard item.descriptors.count == 1 else { return refuse("\(item.descriptors.count) descriptor(s) for 1") }
            let rule = byID[ruleID] ?? RelayRule(id: ruleID, listen: listen, target: target, transport: .udp)
            if let port = state.sourcePort { sourcePorts.take(port, toward: target) }
            let flow = DatagramFlow(fd: item.descriptors[0], client: client, local: state.local.flatMap(IPAddress.init),
                                    rule: rule, target: target, route: nil, listener: listener,
                                    counters: datagramCounters(for: ruleID), sourcePort: state.sourcePort,
                                    now: loop.now &- min(state.idleNanoseconds, loop.now))
            flow.datagramsToTarget = state.datagramsToTarget
            flow.bytesToTarget = state.bytesToTarget
            flow.datagramsToClient = state.datagramsToClient
            flow.bytesToClient = state.bytesToClient
            do {
                try loop.register(flow.fd, interest: [.readable], handler: flow)
            } catch {
                if let port = state.sourcePort { sourcePorts.release(port, toward: target) }
                return refuse("cannot watch it: \(error)")
            }
            flowAdmission.force(listener.rules.gate)
            listener.adoptFlow(flow)
            return nil
        case .tcpListener, .udpListener:
            return refuse("a listener is taken by apply, not adopt")
        }
    }
}

/// A loop's listening socket for one address, with the rules that use it.
final class ListenerHandler: EventHandler, TimerHandler {
    let fd: FileDescriptor
    var rules: ListenerRules
    /// Each rule's counters on this loop, by position in `rules.rules`.
    var ruleCounters: [TCPRuleCounters] = []
    unowned let context: LoopContext
    private var closed = false
    private var paused = false

    init(fd: FileDescriptor, rules: ListenerRules, context: LoopContext) {
        self.fd = fd
        self.rules = rules
        self.context = context
    }

    /// Accepts up to 64 clients per readiness event (the socket is
    /// level-triggered, so what is left is reported again), to stay fair to
    /// the connections already on this loop.
    func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop) {
        for _ in 0..<64 {
            guard !closed, !paused else { return }
            do {
                switch try Socket.accept(fd) {
                case .wouldBlock: return
                case .done(let connection): context.accepted(connection, on: self)
                }
            } catch where error.isDescriptorExhaustion {
                context.descriptorsExhausted(on: self)
                return
            } catch {
                // ECONNABORTED, EPROTO, ENETDOWN...: that client is gone; go on.
                continue
            }
        }
    }

    /// Watched again after a handover that did not happen.
    func resumeAfterHandover() {
        guard !closed else { return }
        paused = false
        try? context.loop.register(fd, interest: [.readable], handler: self)
    }

    func pause(nanoseconds: UInt64) {
        guard !paused, !closed else { return }
        paused = true
        try? context.loop.modify(fd, interest: [])
        context.loop.schedule(afterNanoseconds: nanoseconds, target: self)
    }

    func timerFired(tag: Int, loop: EventLoop) {
        guard paused, !closed else { return }
        paused = false
        try? loop.modify(fd, interest: [.readable])
    }

    func close() {
        guard !closed else { return }
        closed = true
        context.loop.deregister(fd)
        fd.close()
    }
}
