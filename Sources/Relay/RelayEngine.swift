import EventLoop
import Logging
import ServiceSupport
import Synchronization
import SystemLayer

/// The TCP relay: a group of event loops that carry out a rule set.
///
/// Control calls (`apply`, `revoke`, `drain`, `stats`, ...) may come from any
/// thread and are serialized; they reach the loops as commands carrying
/// immutable snapshots, so the data path takes no lock.
public final class RelayEngine: Sendable {
    public let settings: RelaySettings
    public let admission: AdmissionControl
    /// MaxFlows for UDP, globally and per listener.
    public let flowAdmission: AdmissionControl
    public let sourcePorts = SourcePortRegistry()
    public let pipeBudget: PipeBudget
    private let group: EventLoopGroup
    private let contexts: LoopContexts
    private let logger: Logger
    private let control: BlockingMutex<ControlState>

    private struct ControlState {
        /// Every rule, indexed for changes one at a time.
        var index = RuleIndex()
        var gates: [SocketAddress: AdmissionGate] = [:]
        var udpGates: [SocketAddress: AdmissionGate] = [:]
        var stopped = false
        /// Listening sockets the service manager passed (socket activation),
        /// by address: the first rule set that wants the address takes it.
        var inherited: [SocketAddress: FileDescriptor] = [:]
        /// Listening sockets a predecessor handed over (hot upgrade), by
        /// address, in its loops' order: rules on those addresses use them.
        var handedTCP: [SocketAddress: [FileDescriptor]] = [:]
        var handedUDP: [SocketAddress: [FileDescriptor]] = [:]
        /// Everything is suspended for a handover: no rule change.
        var handingOver = false
        /// Handed UDP listeners watched only once `adopt` has placed their flows.
        var heldUDP: Set<SocketAddress> = []
    }

    /// Holds the per-loop contexts; each is touched only by commands on its own loop.
    private final class LoopContexts: @unchecked Sendable {
        var all: [LoopContext] = []
    }

    /// Starts the loops. No listener is open until `apply`.
    /// - Throws: `Errno` when a loop cannot be created.
    public init(settings: RelaySettings, logger: Logger = Logger(label: "relay")) throws(Errno) {
        self.settings = settings
        self.logger = logger
        admission = AdmissionControl(maxConnections: settings.maxConnections)
        flowAdmission = AdmissionControl(maxConnections: settings.maxFlows)
        pipeBudget = PipeBudget(limit: settings.maxPipes)
        group = try EventLoopGroup(count: settings.loops, name: "relay")
        control = BlockingMutex(ControlState())
        let contexts = LoopContexts()
        for loop in group.loops {
            contexts.all.append(LoopContext(loop: loop, settings: settings, admission: admission,
                                            flowAdmission: flowAdmission, sourcePorts: sourcePorts,
                                            budget: pipeBudget, logger: logger))
        }
        self.contexts = contexts
    }

    /// Takes listening TCP sockets passed by the service manager
    /// (`LISTEN_FDS`): a later rule on the same address uses the passed
    /// socket instead of binding its own (each loop gets a duplicate of it),
    /// so the address can be privileged or held across restarts by systemd.
    /// - Returns: the adopted addresses, and the descriptors that are not
    ///   listening stream sockets (left alone, for the caller to report).
    public func adopt(_ sockets: [FileDescriptor]) -> (adopted: [SocketAddress], refused: [FileDescriptor]) {
        var adopted: [SocketAddress] = []
        var refused: [FileDescriptor] = []
        control.withLock { state in
            for fd in sockets {
                if let address = Socket.adoptListener(fd), state.inherited[address] == nil {
                    state.inherited[address] = fd
                    adopted.append(address)
                } else {
                    refused.append(fd)
                }
            }
        }
        return (adopted, refused)
    }

    /// Replaces the rule set: the difference from the rules in force is
    /// applied as one `change` (rules whose settings are unchanged are
    /// untouched). New listeners are opened first, on this thread; if any
    /// cannot be opened, the ones opened so far are closed and nothing
    /// changes. Established connections are never touched: a removed rule
    /// only stops new connections.
    /// - Parameter logLevel: the level of the "rules applied" line (a caller
    ///   that applies often, as the Security Gateway per session, logs it at debug).
    /// - Throws: `RuleError` naming the rule and the reason.
    public func apply(_ rules: [RelayRule], logLevel: Logger.Level = .info) throws(RuleError) {
        try RuleError.validate(rules)
        let wanted = Set(rules.map(\.id))
        let removing = control.withLock { state in state.index.byID.keys.filter { !wanted.contains($0) } }
        try change(upserting: rules, removing: removing, logLevel: logLevel)
    }

    /// Adds or replaces the rules `upserting` and removes the rules whose
    /// ids are in `removing` (unknown ids are ignored), all or nothing, at a
    /// cost that depends on the addresses touched, not on the rules held:
    /// a listener opens when its address gets its first rule and closes
    /// when its last goes; the loops update only those addresses.
    /// Established connections are never touched.
    /// - Parameter probedFree: TCP addresses the caller has just found free
    ///   with `Socket.probeFree` (the gateway's port allocator, under the
    ///   lock it holds across this call): their listeners open without the
    ///   engine's own probe of them, the same bind a few microseconds later
    ///   (issue 15: each probe was about 5 % of a push's CPU).
    /// - Throws: `RuleError` naming the rule and the reason; nothing changed.
    public func change(upserting: [RelayRule] = [], removing: [String] = [], logLevel: Logger.Level = .debug,
                       probedFree: Set<SocketAddress> = []) throws(RuleError) {
        let summary: (rules: Int, addresses: Int)? = try control.withLock { state throws(RuleError) in
            guard !state.stopped else { throw RuleError.invalid(rule: "-", reason: "the relay is shutting down") }
            guard !state.handingOver else { throw RuleError.invalid(rule: "-", reason: "the relay is being handed to its successor") }
            let plan = try state.index.plan(upserting: upserting, removing: removing)
            if plan.isEmpty { return nil }
            let (opened, openedUDP) = try openListeners(plan, &state, probedFree: probedFree)
            state.index.commit(plan)

            // Each touched address's rules, gate and limit (the tightest any
            // of its rules sets), made from its own few rules only.
            var tcpDelta: [SocketAddress: ListenerRules?] = [:]
            var udpDelta: [SocketAddress: ListenerRules?] = [:]
            for address in plan.touched {
                let all = state.index.rules(at: address)
                tcpDelta[address] = Self.listener(address, rules: all.filter { $0.transport.contains(.tcp) }, gates: &state.gates,
                                                  limit: \.maxConnections, defaultLimit: settings.maxConnectionsPerListener,
                                                  gateName: address.description)
                udpDelta[address] = Self.listener(address, rules: all.filter { $0.transport.contains(.udp) }, gates: &state.udpGates,
                                                  limit: \.maxFlows, defaultLimit: settings.maxFlowsPerListener,
                                                  gateName: "udp \(address)")
            }
            for address in opened.keys {
                state.inherited[address] = nil
                state.handedTCP[address] = nil
            }
            for address in openedUDP.keys { state.handedUDP[address] = nil }
            let delta = LoopContext.RuleDelta(tcp: tcpDelta, udp: udpDelta, removedIDs: plan.removed,
                                              changedIDs: Set(plan.removed + plan.replaced), held: state.heldUDP)
            let contexts = self.contexts
            group.onEveryLoop { loop in
                contexts.all[loop.id].install(delta, newSockets: opened.mapValues { $0[loop.id] },
                                              newDatagramSockets: openedUDP.mapValues { $0[loop.id] })
            }
            return (state.index.count, state.index.addressCount)
        }
        if let summary {
            logger.log(level: logLevel, "rules applied: \(summary.rules) rule(s) on \(summary.addresses) address(es)")
        }
    }

    /// One transport's listener at `address` after a change, for the loops:
    /// its rules with its gate (kept in `gates`, its limit the tightest a
    /// rule sets), `.some(nil)` when it closes, nil when it neither was nor is.
    private static func listener(_ address: SocketAddress, rules: [RelayRule], gates: inout [SocketAddress: AdmissionGate],
                                 limit: KeyPath<RelayRule, Int?>, defaultLimit: Int, gateName: String) -> ListenerRules?? {
        guard !rules.isEmpty else {
            return gates.removeValue(forKey: address) == nil ? nil : .some(nil)
        }
        let tightest = rules.compactMap { $0[keyPath: limit] }.min() ?? defaultLimit
        let gate = gates[address] ?? AdmissionGate(address: gateName, limit: tightest)
        gate.setLimit(tightest)
        gates[address] = gate
        return ListenerRules.ordered(address: address, rules: rules, gate: gate)
    }

    /// A probe bind without SO_REUSEPORT (a port another process holds is
    /// reported, not shared; skipped when the caller has `probed` it just
    /// now), then one socket per loop from `open`; on a failure those
    /// opened are closed.
    private func openPerLoop(_ address: SocketAddress, owner: String,
                             probe: (SocketAddress) throws(SystemCallError) -> Void, probed: Bool = false,
                             open: () throws(SystemCallError) -> FileDescriptor) throws(RuleError) -> [FileDescriptor] {
        var fds: [FileDescriptor] = []
        do throws(SystemCallError) {
            if !probed { try probe(address) }
            for _ in group.loops { fds.append(try open()) }
            return fds
        } catch {
            fds.forEach { $0.close() }
            throw RuleError.listenFailed(rule: owner, address: address, error)
        }
    }

    /// Opens the listening sockets `plan` needs (one per loop per address),
    /// or takes the handed or passed ones; on any failure closes what it
    /// opened (a passed or handed socket stays, adoptable) and throws.
    private func openListeners(_ plan: RuleIndex.Plan, _ state: inout ControlState, probedFree: Set<SocketAddress>) throws(RuleError)
        -> ([SocketAddress: [FileDescriptor]], [SocketAddress: [FileDescriptor]]) {
        var opened: [SocketAddress: [FileDescriptor]] = [:]
        var openedUDP: [SocketAddress: [FileDescriptor]] = [:]
        do throws(RuleError) {
            for address in plan.openTCP {
                let owner = plan.owners[address] ?? "-"
                if let handed = state.handedTCP[address] {
                    // Hot upgrade: loop i takes the predecessor's socket i.
                    opened[address] = try Self.spread(handed, over: group.loops.count, owner: owner, address: address)
                    continue
                }
                if let passed = state.inherited[address] {
                    // Socket activation: loop 0 takes the passed socket, the others a duplicate.
                    opened[address] = try Self.spread([passed], over: group.loops.count, owner: owner, address: address)
                    Socket.setNoDelay(passed)
                    Socket.apply(settings.liveness, to: passed)
                    continue
                }
                opened[address] = try openPerLoop(address, owner: owner, probe: Socket.probeFree,
                                                  probed: probedFree.contains(address)) { () throws(SystemCallError) in
                    let fd = try Socket.listen(on: address, reusePort: true, backlog: settings.listenBacklog)
                    // Accepted sockets inherit these, which saves
                    // several setsockopt calls per connection.
                    Socket.setNoDelay(fd)
                    Socket.apply(settings.liveness, to: fd)
                    return fd
                }
            }
            for address in plan.openUDP {
                let owner = plan.udpOwners[address] ?? "-"
                if let handed = state.handedUDP[address] {
                    openedUDP[address] = try Self.spread(handed, over: group.loops.count, owner: owner, address: address)
                    // Not read until the flows are adopted: a datagram of
                    // a handed flow read before would open a second flow.
                    state.heldUDP.insert(address)
                    continue
                }
                openedUDP[address] = try openPerLoop(address, owner: owner, probe: Socket.probeFreeUDP) { () throws(SystemCallError) in
                    try Socket.bindUDP(address, reusePort: true, packetInfo: address.ip.isUnspecified,
                                       receiveBuffer: settings.udpReceiveBuffer, sendBuffer: settings.udpSendBuffer)
                }
            }
        } catch {
            for (address, fds) in opened {
                let kept = state.handedTCP[address]?.count ?? (state.inherited[address] != nil ? 1 : 0)
                fds.dropFirst(kept).forEach { $0.close() }
            }
            for (address, fds) in openedUDP {
                fds.dropFirst(state.handedUDP[address]?.count ?? 0).forEach { $0.close() }
                if state.handedUDP[address] != nil { state.heldUDP.remove(address) }
            }
            throw error
        }
        return (opened, openedUDP)
    }

    /// One socket per loop from the handed ones: loop i takes socket i;
    /// missing ones are duplicates of the first (the successor has more
    /// loops). Extra ones cannot be given a loop: the caller keeps them
    /// only when the loop counts match, which the upgrade arranges.
    private static func spread(_ handed: [FileDescriptor], over loops: Int, owner: String,
                               address: SocketAddress) throws(RuleError) -> [FileDescriptor] {
        var fds = Array(handed.prefix(loops))
        do throws(Errno) {
            while fds.count < loops { fds.append(try Socket.duplicate(handed[0])) }
        } catch {
            fds.dropFirst(handed.count).forEach { $0.close() }
            throw RuleError.listenFailed(rule: owner, address: address, SystemCallError("fcntl(F_DUPFD_CLOEXEC)", error, context: "of the handed socket for \(address)"))
        }
        return fds
    }

    // MARK: Hot upgrade

    /// The number of loops (a successor runs as many, so that each UDP
    /// flow stays with the socket its client's datagrams reach).
    public var loopCount: Int { group.loops.count }

    /// Stops watching every listener, connection and flow, closing nothing,
    /// and returns them with their descriptors for a successor process.
    /// Rule changes are refused until `resumeAfterHandover` or
    /// `releaseAfterHandover`. The pause a relayed stream sees starts here.
    /// - Throws: `HandoverError` when the rules cannot travel (an inspector
    ///   or a router, as the Security Gateway's), with nothing suspended.
    public func suspendForHandover() throws(HandoverError) -> [HandedSocket] {
        try control.withLock { state throws(HandoverError) in
            guard !state.stopped else { throw HandoverError("the relay is shutting down") }
            guard !state.handingOver else { throw HandoverError("a handover is already under way") }
            if let rule = state.index.byID.values.first(where: { $0.inspector != nil || $0.router != nil }) {
                throw HandoverError("rule \"\(rule.id)\" inspects or routes its connections; such sessions cannot be handed over")
            }
            state.handingOver = true
        }
        return gather { $0.suspendForHandover() }.flatMap { $0 }
    }

    /// The successor did not take over: everything is watched again and
    /// rule changes are accepted.
    public func resumeAfterHandover() {
        let contexts = self.contexts
        group.onEveryLoop { loop in contexts.all[loop.id].resumeAfterHandover() }
        control.withLock { $0.handingOver = false }
    }

    /// The successor took everything: our descriptors close without a
    /// word to any peer, and the relay stops (the caller exits).
    public func releaseAfterHandover() {
        forgetRules()
        let contexts = self.contexts
        group.onEveryLoop { loop in contexts.all[loop.id].releaseAfterHandover() }
        group.shutdown()
    }

    /// Takes the listening sockets of a predecessor's handover: the rules
    /// applied next use them for their addresses instead of binding.
    /// - Returns: problems with records that were not listeners of a known
    ///   address (their descriptors closed).
    public func inheritHandedListeners(_ items: [HandedSocket]) -> [String] {
        var problems: [String] = []
        control.withLock { state in
            var tcp: [SocketAddress: [(Int, FileDescriptor)]] = [:]
            var udp: [SocketAddress: [(Int, FileDescriptor)]] = [:]
            for item in items where item.record.kind == .tcpListener || item.record.kind == .udpListener {
                guard let address = SocketAddress(item.record.listen), item.descriptors.count == 1 else {
                    problems.append("\(item.record.kind.rawValue) \(item.record.listen): not an address with one socket")
                    item.descriptors.forEach { $0.close() }
                    continue
                }
                if item.record.kind == .tcpListener {
                    tcp[address, default: []].append((item.record.loop, item.descriptors[0]))
                } else {
                    udp[address, default: []].append((item.record.loop, item.descriptors[0]))
                }
            }
            for (address, fds) in tcp { state.handedTCP[address] = fds.sorted { $0.0 < $1.0 }.map(\.1) }
            for (address, fds) in udp { state.handedUDP[address] = fds.sorted { $0.0 < $1.0 }.map(\.1) }
        }
        return problems
    }

    /// Closes handed listening sockets no rule took (their addresses are
    /// gone from the successor's rules).
    /// - Returns: the addresses closed.
    public func discardUnclaimedHandedListeners() -> [String] {
        control.withLock { state in
            let closed = state.handedTCP.keys.map { "tcp \($0)" } + state.handedUDP.keys.map { "udp \($0)" }
            state.handedTCP.values.joined().forEach { $0.close() }
            state.handedUDP.values.joined().forEach { $0.close() }
            state.handedTCP.removeAll()
            state.handedUDP.removeAll()
            return closed.sorted()
        }
    }

    /// Takes the connections and flows a predecessor handed over, each on
    /// the loop of the same number (flows must be: their client's datagrams
    /// reach that loop's socket), watches them and pumps them. Call after
    /// the rules are applied (with the handed listeners).
    public func adopt(_ items: [HandedSocket]) -> AdoptionReport {
        let (byID, gates) = control.withLock { ($0.index.byID, $0.gates) }
        let loops = group.loops.count
        var perLoop = [[HandedSocket]](repeating: [], count: loops)
        for item in items where item.record.kind == .connection || item.record.kind == .flow {
            perLoop[((item.record.loop % loops) + loops) % loops].append(item)
        }
        let work = perLoop
        let reports = gather { context -> AdoptionReport in
            var report = AdoptionReport()
            for item in work[context.loop.id] {
                if let problem = context.adopt(item, gates: gates, byID: byID) {
                    report.refused.append(problem)
                } else if item.record.kind == .connection {
                    report.connections += 1
                } else {
                    report.flows += 1
                }
            }
            // The flows are in place: the handed UDP sockets are read from now on.
            context.releaseHeldDatagramListeners()
            return report
        }
        control.withLock { $0.heldUDP.removeAll() }
        return reports.reduce(into: AdoptionReport()) { all, one in
            all.connections += one.connections
            all.flows += one.flows
            all.refused += one.refused
        }
    }

    /// The rules in force.
    public var rules: [RelayRule] { control.withLock { $0.index.rules } }

    /// Removes the rule `id` and closes its established connections (with a
    /// reset on both sides).
    /// - Returns: how many connections were closed, or nil when no such rule exists.
    @discardableResult
    public func revoke(ruleID: String) -> Int? {
        guard control.withLock({ $0.index.byID[ruleID] != nil }) else { return nil }
        // Removing a rule cannot make the set invalid or open a listener.
        try? change(removing: [ruleID])
        let total = sumOnEveryLoop { $0.revoke(ruleID: ruleID) }
        logger.info("rule \"\(ruleID)\" revoked: \(total) connection(s) closed")
        return total
    }

    /// Resets the established connections that an inspector started and
    /// `predicate` picks (on each loop, with that connection's `Inspection`):
    /// how the Security Gateway ends a revoked session. Their rules stay.
    /// - Returns: how many connections were reset (counted as revoked).
    @discardableResult
    public func closeInspected(where predicate: @escaping @Sendable (any Inspection) -> Bool) -> Int {
        sumOnEveryLoop { $0.closeInspected(where: predicate) }
    }

    /// Closes the UDP flows `predicate` picks, on every loop (the Security
    /// Gateway ends the flows of a session that ended). Must not be called
    /// from a relay loop: it waits for each loop.
    /// - Returns: how many flows were closed.
    @discardableResult
    public func closeFlows(where predicate: @escaping @Sendable (FlowInfo) -> Bool) -> Int {
        sumOnEveryLoop { $0.closeFlows(where: predicate) }
    }

    /// Runs `work` on every loop with its context, waits for all, and
    /// returns the sum of what they answered (connections or flows closed).
    private func sumOnEveryLoop(_ work: @escaping @Sendable (LoopContext) -> Int) -> Int {
        gather(work).reduce(0, +)
    }

    /// Sums every loop's counters.
    public func stats() -> RelayStats {
        var stats = RelayStats()
        for context in contexts.all {
            let c = context.counters
            stats.accepted += c.accepted.load(ordering: .relaxed)
            stats.established += c.established.load(ordering: .relaxed)
            stats.closed += c.closed.load(ordering: .relaxed)
            stats.active += c.active.load(ordering: .relaxed)
            stats.connectRefused += c.connectRefused.load(ordering: .relaxed)
            stats.connectTimedOut += c.connectTimedOut.load(ordering: .relaxed)
            stats.connectOtherFailure += c.connectOtherFailure.load(ordering: .relaxed)
            stats.resets += c.resets.load(ordering: .relaxed)
            stats.idleClosed += c.idleClosed.load(ordering: .relaxed)
            stats.revoked += c.revoked.load(ordering: .relaxed)
            stats.spliceFallbacks += c.spliceFallbacks.load(ordering: .relaxed)
            stats.bytesClientToTarget += c.bytesClientToTarget.load(ordering: .relaxed)
            stats.bytesTargetToClient += c.bytesTargetToClient.load(ordering: .relaxed)
            for reason in RefusalReason.allCases { stats.refused[reason, default: 0] += c.refusal(reason) }
            for (reason, n) in c.inspectionRefusals.withLock({ $0 }) { stats.inspectionRefusals[reason, default: 0] += n }
        }
        stats.pipesOpen = pipeBudget.count
        return stats
    }

    /// Runs `read` on every loop with its context (a command each, so the
    /// loop's own tables are read without a lock) and returns what each answered.
    private func gather<T: Sendable>(_ read: @escaping @Sendable (LoopContext) -> T) -> [T] {
        let found = Mutex<[T]>([])
        let contexts = self.contexts
        group.onEveryLoop { loop in
            let mine = read(contexts.all[loop.id])
            found.withLock { $0.append(mine) }
        }
        return found.withLock { $0 }
    }

    /// UDP figures by rule id, summed over the loops; datagrams from senders
    /// no rule allows are under the empty id.
    public func datagramStats() -> [String: DatagramStats] {
        var all: [String: DatagramStats] = [:]
        for (mine, unmatched) in gather({ ($0.datagramStats(), $0.unmatchedDrops) }) {
            for (id, stats) in mine { all[id, default: DatagramStats()].add(stats) }
            if unmatched > 0 { all["", default: DatagramStats()].drops[.notAllowed, default: 0] += unmatched }
        }
        return all
    }

    /// TCP connections accepted per rule id (summed over the loops) since
    /// each rule was installed; a removed rule's count is dropped.
    public func acceptedByRule() -> [String: Int] {
        gather { $0.acceptedByRule }.reduce(into: [:]) { all, mine in all.merge(mine, uniquingKeysWith: +) }
    }

    /// TCP traffic per rule id, summed over the loops.
    public func tcpTraffic() -> [String: TCPRuleTraffic] {
        var all: [String: TCPRuleTraffic] = [:]
        for mine in gather({ $0.tcpTraffic() }) {
            for (id, traffic) in mine { all[id, default: TCPRuleTraffic()].add(traffic) }
        }
        return all
    }

    /// Each relay loop as the service watchdog probes it: `answer` runs on the loop.
    public var loopProbes: [ServiceHeartbeat.Loop] {
        group.loops.map { loop in
            ServiceHeartbeat.Loop(name: "relay loop \(loop.id)") { answer in loop.execute { _ in answer() } }
        }
    }

    /// Every live UDP flow with its accounting.
    public func flows() -> [FlowInfo] {
        gather { $0.flowInfos() }.flatMap { $0 }.sorted { $0.client.description < $1.client.description }
    }

    /// Every live connection with its accounting.
    public func connections() -> [ConnectionInfo] {
        gather { $0.connections.values.map(\.info) }.flatMap { $0 }.sorted { $0.id < $1.id }
    }

    /// Refuses rule changes from now on and forgets the rules (their
    /// listeners are the loops' to close).
    private func forgetRules() {
        control.withLock { state in
            state.stopped = true
            state.index = RuleIndex()
        }
    }

    /// Closes every listener (TCP and UDP) and refuses rule changes from
    /// now on; established sessions go on. Returns once every loop has closed
    /// its listeners, so a client connecting afterwards is refused.
    public func stopAccepting() {
        forgetRules()
        let contexts = self.contexts
        group.onEveryLoop { loop in contexts.all[loop.id].stopListening() }
    }

    /// Graceful stop: closes every listener at once, lets established
    /// connections finish for up to `timeoutNanoseconds`, then resets what is left.
    /// - Returns: how many connections had to be closed at the deadline.
    @discardableResult
    public func drain(timeoutNanoseconds: UInt64) -> Int {
        stopAccepting()
        let deadline = MonotonicClock.nowNanoseconds &+ timeoutNanoseconds
        while stats().active > 0 && MonotonicClock.nowNanoseconds < deadline {
            BlockingWait.sleep(milliseconds: 20)
        }
        return sumOnEveryLoop { $0.closeAll() }
    }

    /// Stops the loops (after `drain`, or at once when there is nothing to keep).
    public func shutdown() {
        control.withLock { $0.stopped = true }
        let contexts = self.contexts
        group.onEveryLoop { loop in
            contexts.all[loop.id].stopListening()
            _ = contexts.all[loop.id].closeAll()
        }
        group.shutdown()
    }
}
