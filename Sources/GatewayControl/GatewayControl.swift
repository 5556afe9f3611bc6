import ControlProtocol
import Logging
import NetfilterKernel
import Relay
import Synchronization
import SystemLayer

/// The gateway's side of the control plane, without HTTP: the pushed rules,
/// their ports, persistence, expiry and reconciliation, carried out on a
/// `RelayEngine` together with the config file's forwards.
///
/// Every change runs under one lock in this order: check, choose a port,
/// give the engine just the rules that change (all or nothing), append the
/// change to the rules journal; if the write fails the engine's change is
/// undone. So an error changes nothing, and what is on disk is what runs.
/// A push or a delete costs what it changes, not the rules held (issue 15):
/// the pushed rules, the ports in use and the journal are all kept by id.
///
/// Rules on the kernel path (`forwarding_path` kernel or offload, see
/// `KernelRules`) are elements of the gateway's nftables table: a change is
/// one netlink batch made under the same lock, between the engine and the
/// file, and rolled back with them.
public final class GatewayControl: Sendable {
    public let engine: RelayEngine
    public let store: RuleStore
    /// The kernel path, when the gateway's config enables it.
    public let kernel: (any KernelForwarding)?
    public let replay = ReplayGuard()
    private let logger: Logger
    private let clock: @Sendable () -> Int64
    private let probe: @Sendable (ControlSettings) -> PortAllocator.Probe
    private let state: BlockingMutex<State>
    /// Copies of the settings and the signer, under a lock of their own held
    /// only to copy: every request reads them (body limit, signature check)
    /// and must not wait for a change in progress (which holds `state`
    /// across the relay loops and the journal's fdatasync).
    private let published: Mutex<(settings: ControlSettings, signer: ControlSigner?)>
    /// Each pushed rule's relay rule, by id, with what it was made from:
    /// every push applies the whole set, and parsing thousands of targets
    /// each time made a push O(rules) in string parsing.
    private let relayCache = Mutex<[String: (state: RuleState, address: IPAddress, rule: RelayRule?)]>([:])

    private struct State {
        var settings: ControlSettings
        var signer: ControlSigner?
        var baseRules: [RelayRule]
        /// Broker forwarding, when configured and the broker is known.
        var forward: RelayRule?
        /// The config's forwards and broker forwarding: every rule not pushed.
        var fixed: [RelayRule] { baseRules + (forward.map { [$0] } ?? []) }
        /// Pushed rules by id, in creation order.
        var pushed = PushedRules()
        /// The ports the config's forwards and broker forwarding hold, and
        /// those each pushed rule holds (by rule id): a push's port choice
        /// costs the ports it tries, not the rules held.
        var fixedPorts = PortUses()
        var pushedPorts = PortUses()
        /// Connections and flows ever seen per pushed rule id, at the last tick.
        var seenUse: [String: Int] = [:]
        /// Why the last write of `rules.json` failed; nil once one succeeds.
        var storeError: String?
        /// The kernel path's counters per rule id at the last tick, and what
        /// elements replaced since (their counters restart) had counted.
        var kernelTraffic: [String: KernelTraffic] = [:]
        var kernelBase: [String: KernelTraffic] = [:]
        /// Why the last read or change of the kernel table at a tick failed.
        var kernelError: String?
        /// Counts kernel rules added; each one's count when it was. A tick
        /// reads the table before it takes the lock, so a rule added after
        /// that read is not in it and must not count as expired.
        var kernelGeneration: UInt64 = 0
        var kernelAddedIn: [String: UInt64] = [:]
    }

    /// - Parameters:
    ///   - baseRules: the config file's forwards, applied with the pushed rules.
    ///   - stateDirectory: where `rules.json` lives.
    ///   - signer: the enrolled key, or nil while the gateway has none (every push is refused).
    ///   - clock: unix seconds (tests move it).
    public init(engine: RelayEngine, settings: ControlSettings, baseRules: [RelayRule], stateDirectory: String,
                signer: ControlSigner?, logger: Logger = Logger(label: "gateway-control"),
                clock: @escaping @Sendable () -> Int64 = { ControlClock.unixSeconds() },
                probe: @escaping @Sendable (ControlSettings) -> PortAllocator.Probe = { PortAllocator.bindProbe(on: $0.publicAddress) },
                kernel: (any KernelForwarding)? = nil) {
        self.engine = engine
        self.kernel = kernel
        self.logger = logger
        self.clock = clock
        self.probe = probe
        var initial = State(settings: settings, signer: signer, baseRules: baseRules)
        Self.indexFixedPorts(&initial)
        let state = BlockingMutex(initial)
        self.state = state
        self.store = RuleStore(directory: stateDirectory) { [state] problem in
            // rules_sync = background: the change was answered, and is in effect, but may not survive the machine's crash.
            state.withLock { $0.storeError = problem }
            logger.critical("control: \(problem); changes answered since the last sync are in effect but not durable")
        }
        published = Mutex((settings, signer))
    }

    // MARK: Start and configuration

    /// Loads `rules.json` and applies the config's forwards with every
    /// persisted rule that can still be opened; a rule that cannot (its port
    /// was taken meanwhile, its target is no longer allowed) is dropped and
    /// logged, and the broker re-pushes it at registration if it still wants it.
    ///
    /// With the kernel path, the table is then reconciled with the kept
    /// rules: elements the kernel still holds stay as they are (with their
    /// counters and expiry, and the flows in conntrack go on), missing ones
    /// are added, others removed. A kernel rule whose element the kernel
    /// expired while the gateway was down, unused, is dropped.
    /// - Returns: problems worth a log line (a corrupt file moved aside, dropped rules).
    /// - Throws: `RuleError` when the config's own forwards cannot be applied,
    ///   `NetfilterError` when the kernel table cannot be read or reconciled.
    @discardableResult
    public func restore() throws -> [String] {
        let loaded = store.load(now: clock())
        let now = clock()
        var problems: [String] = loaded.problem.map { [$0] } ?? []
        // What the kernel holds from before (nothing when the table is new).
        var held: [KernelForward.Key: KernelForwardState] = [:]
        if let kernel {
            switch Result(catching: { () throws(NetfilterError) in try kernel.forwards() }) {
            case .success(let states):
                for state in states { held[state.forward.key] = state }
            case .failure(let error):
                if !error.isMissing { throw error }   // missing: a new table
            }
        }
        try state.withLock { s throws in
            // On top of what the relay holds: a control plane restarted on a
            // running relay (a hot upgrade that did not happen) finds its
            // rules there, and listeners that stay are not closed and reopened.
            try engine.change(upserting: s.fixed, logLevel: .info)
            var kept: [RuleState] = []
            for rule in loaded.rules {
                do throws(ControlError) {
                    try RulePolicy.checkID(rule.id)
                    let checked = try RulePolicy.check(rule.push, settings: s.settings)
                    if rule.forwardingPath != .userspace {
                        guard kernel != nil else {
                            throw ControlError(409, field: "forwarding_path", "it takes the kernel path (\(rule.forwardingPath.rawValue)), which this gateway's config does not enable (kernel_path = on)")
                        }
                        if let refusal = KernelRules.refusal(checked, settings: s.settings) { throw refusal }
                    }
                    var rule = rule
                    if rule.forwardingPath == .kernel && rule.lastUsed == nil {
                        let forwards = KernelRules.forwards(rule, publicAddress: s.settings.publicAddress)
                        let states = forwards.compactMap { held[$0.key] }
                        if states.contains(where: { $0.flows > 0 || $0.packets > 0 }) {
                            rule.lastUsed = now   // used while the gateway was down
                        } else if states.count < forwards.count
                                    && now - rule.created >= Int64(rule.push.unusedExpirySeconds ?? s.settings.defaultUnusedExpirySeconds) {
                            throw ControlError(410, "expired unused while the gateway was down")
                        }
                    }
                    guard RulePolicy.relayRule(rule, settings: s.settings) != nil else {
                        throw ControlError(400, "rule \(rule.id): bad port \(rule.port)")
                    }
                    do throws(RuleError) {
                        // One rule at a time, on top of those kept so far.
                        try engine.change(upserting: relayRules([rule], s.settings))
                    } catch {
                        throw ControlError(409, "\(error)")
                    }
                    var restored = rule
                    restored.sessions = 0
                    kept.append(restored)
                } catch {
                    problems.append("persisted rule \(rule.id) not restored: \(error)")
                }
            }
            // Exactly these from now on (on a fresh relay, nothing to remove).
            try engine.apply(s.fixed + relayRules(kept, s.settings))
            if let kernel {
                var wanted: [(KernelForward, timeoutMilliseconds: UInt64?)] = []
                for rule in kept {
                    let timeout = KernelRules.timeoutMilliseconds(rule, now: now, defaultExpiry: s.settings.defaultUnusedExpirySeconds)
                    for forward in KernelRules.forwards(rule, publicAddress: s.settings.publicAddress) {
                        // An element still held keeps its own expiry (reconcile leaves it).
                        wanted.append((forward, timeout))
                    }
                }
                try kernel.reconcile(publics: [s.settings.publicAddress], forwards: wanted)
            }
            s.pushed = PushedRules(kept)
            let live = Set(kept.map(\.id))
            relayCache.withLock { cache in cache = cache.filter { live.contains($0.key) } }
            reindexPorts(&s)
            store.seed(kept)
            if kept != loaded.rules {
                do throws(ControlError) { try store.save(kept) } catch { problems.append("\(error)") }
            }
        }
        for problem in problems { logger.error("\(problem)") }
        logger.info("control: \(pushedRules().count) pushed rule(s) restored from \(store.path)")
        return problems
    }

    /// Replaces the config file's forwards (SIGHUP), keeping the pushed rules.
    /// - Throws: `RuleError` and changes nothing when the new list cannot be applied.
    public func setBaseRules(_ rules: [RelayRule]) throws(RuleError) {
        try state.withLock { s throws(RuleError) in
            try engine.apply(rules + (s.forward.map { [$0] } ?? []) + relayRules(s.pushed.list, s.settings))
            s.baseRules = rules
            Self.indexFixedPorts(&s)
        }
    }

    /// Sets or removes the broker-forwarding rule (see `BrokerForwarding`).
    /// - Throws: `RuleError` and changes nothing when it cannot be applied (its port is taken).
    public func setForwardRule(_ rule: RelayRule?) throws(RuleError) {
        try state.withLock { s throws(RuleError) in
            guard s.forward != rule else { return }
            try engine.apply(s.baseRules + (rule.map { [$0] } ?? []) + relayRules(s.pushed.list, s.settings))
            s.forward = rule
            Self.indexFixedPorts(&s)
        }
    }

    /// Replaces the key pushes are verified with (nil: refuse every push).
    public func setSigner(_ signer: ControlSigner?) {
        state.withLock { s in
            s.signer = signer
            published.withLock { $0.signer = signer }
        }
    }

    /// Changes the port range new rules take ports from; existing rules stay.
    public func setPortRange(_ range: ClosedRange<Int>) {
        state.withLock { s in
            s.settings.portRange = range
            published.withLock { $0.settings = s.settings }
        }
    }

    /// Changes the settings new pushes are checked against (e.g. the bound
    /// control address once known); existing rules stay.
    public func updateSettings(_ change: @Sendable (inout ControlSettings) -> Void) {
        state.withLock { s in
            let address = s.settings.publicAddress
            change(&s.settings)
            published.withLock { $0.settings = s.settings }
            if s.settings.publicAddress != address { reindexPorts(&s) }
        }
    }

    public var settings: ControlSettings { published.withLock { $0.settings } }
    public var signer: ControlSigner? { published.withLock { $0.signer } }

    // MARK: The broker's calls

    /// Verifies a broker-to-gateway request.
    /// - Throws: `ControlError` 401 with the reason.
    public func authenticate(header: String?, method: String, path: String, body: [UInt8]) throws(ControlError) {
        guard let signer = self.signer else {
            throw ControlError(401, field: "Authorization", "Authorization: this gateway has no control key yet (leostream-gateway --broker ADDRESS --gateway-id N --control-key-file FILE)")
        }
        guard let header else { throw ControlError(401, field: "Authorization", ControlAuthError.missing.description) }
        do throws(ControlAuthError) {
            let authorization = try ControlAuthorization(header: header)
            try signer.verify(authorization, direction: .brokerToGateway, method: method, path: path, body: body,
                              replay: replay, now: clock())
        } catch {
            throw ControlError(401, field: "Authorization", error.description)
        }
    }

    /// `PUT /control/v1/rules/{id}`.
    /// - Returns: the rule and whether it was created (false: an identical rule existed).
    /// - Throws: `ControlError` (400, 403, 409, 500); nothing changed.
    public func put(id: String, push: RulePush) throws(ControlError) -> (rule: RuleState, created: Bool) {
        // A batch of one: the same checks, placement, journal record and
        // durable wait (shared with pushes arriving meanwhile: group commit).
        try batch(putting: [(id, push)], deleting: []).put[0].get()
    }

    /// One item's outcome in a batch: a put's rule and whether it was
    /// created, or why it was refused; a delete's success or refusal.
    public typealias PutOutcome = Result<(rule: RuleState, created: Bool), ControlError>
    public typealias DeleteOutcome = Result<Void, ControlError>

    /// `POST /control/v1/rules`: many puts and deletes in one call, each
    /// with the outcome it would have had alone (what one refusal refuses is
    /// that item, nothing else), for a broker that pushes in bursts. What
    /// the calls share is paid once: the request, one change of the relay's
    /// listeners (when one rule of it cannot listen, each is tried alone, so
    /// only that one is refused), one journal write and one fdatasync before
    /// the answer. Deletes go first, so their ports are free for the puts.
    /// An id named twice in one batch is refused (400) the second time.
    /// - Returns: one outcome per item, in the order given.
    public func batch(putting puts: [(id: String, push: RulePush)], deleting deletes: [String])
        -> (put: [PutOutcome], delete: [DeleteOutcome]) {
        let now = clock()
        var putOutcomes: [PutOutcome] = []
        var deleteOutcomes: [DeleteOutcome] = []
        let pending = state.withLock { s -> [RuleStore.Pending] in
            var pending: [RuleStore.Pending] = []
            var named = Set<String>()
            func claim(_ id: String) throws(ControlError) {
                try RulePolicy.checkID(id)
                guard named.insert(id).inserted else {
                    throw ControlError(400, field: "id", "id: \(id) is named twice in this batch")
                }
            }
            var leaving: [String] = []
            for id in deletes {
                do throws(ControlError) {
                    try claim(id)
                    guard s.pushed.contains(id) else { throw ControlError(404, field: "id", "id: no rule \(id)") }
                    leaving.append(id)
                    deleteOutcomes.append(.success(()))
                } catch {
                    deleteOutcomes.append(.failure(error))
                }
            }
            if !leaving.isEmpty {
                do throws(ControlError) {
                    if let written = try remove(Set(leaving), from: &s, waitDurable: false) { pending.append(written) }
                } catch {
                    for i in deleteOutcomes.indices where (try? deleteOutcomes[i].get()) != nil { deleteOutcomes[i] = .failure(error) }
                }
            }

            var placed: [(index: Int, placed: Placed)] = []
            var held = PortUses()
            for (index, item) in puts.enumerated() {
                do throws(ControlError) {
                    try claim(item.id)
                    switch try place(id: item.id, push: item.push, now: now, in: &s, alsoHeld: { held.holders($0) }) {
                    case .existing(let rule):
                        putOutcomes.append(.success((rule, false)))
                    case .new(let new):
                        held.set(new.rule.id, portUses(of: new.rule, s.settings))
                        placed.append((index, new))
                        putOutcomes.append(.success((new.rule, true)))
                    }
                } catch {
                    putOutcomes.append(.failure(error))
                }
            }
            let relayed = placed.filter { !$0.placed.onKernel }
            if !relayed.isEmpty {
                do throws(ControlError) {
                    try applyToEngine(upserting: relayRules(relayed.map(\.placed.rule), s.settings),
                                      probedFree: Set(relayed.compactMap(\.placed.probedFree)))
                } catch where relayed.count == 1 {
                    putOutcomes[relayed[0].index] = .failure(error)
                    relayCache.withLock { $0[relayed[0].placed.rule.id] = nil }
                    placed.removeAll { $0.index == relayed[0].index }
                } catch {
                    // Each alone: only the rules that cannot be opened are refused.
                    var refused = Set<Int>()
                    for item in relayed {
                        do throws(ControlError) {
                            try applyToEngine(upserting: relayRules([item.placed.rule], s.settings),
                                              probedFree: item.placed.probedFree.map { [$0] } ?? [])
                        } catch {
                            refused.insert(item.index)
                            putOutcomes[item.index] = .failure(error)
                            relayCache.withLock { $0[item.placed.rule.id] = nil }
                        }
                    }
                    placed.removeAll { refused.contains($0.index) }
                }
            }
            guard !placed.isEmpty else { return pending }
            do throws(ControlError) {
                if let written = try store.record(upserting: placed.map(\.placed.rule)) { pending.append(written) }
            } catch {
                s.storeError = error.message
                undo(placed.map(\.placed))
                for item in placed { putOutcomes[item.index] = .failure(error) }
                return pending
            }
            commit(placed.map(\.placed), to: &s)
            return pending
        }
        // One fdatasync covers the batch (the last append first: the earlier
        // one, in the same file, is then durable already).
        for written in pending.reversed() {
            do throws(ControlError) {
                try waitDurable(written)
            } catch {
                for i in putOutcomes.indices {
                    if case .success(let done) = putOutcomes[i], done.created { putOutcomes[i] = .failure(error) }
                }
                for i in deleteOutcomes.indices where (try? deleteOutcomes[i].get()) != nil { deleteOutcomes[i] = .failure(error) }
                break
            }
        }
        return (putOutcomes, deleteOutcomes)
    }

    /// A push checked and given a port; on the kernel path already in the
    /// kernel table, otherwise not yet in the relay.
    private struct Placed {
        let rule: RuleState
        /// The kernel forwards added for it (`onKernel`), to undo them.
        let added: [KernelForward]
        /// The TCP address the allocator's probe found free for it just now.
        var probedFree: SocketAddress? = nil
        var onKernel: Bool { rule.forwardingPath == .kernel }
    }

    private enum Placement {
        /// An identical rule is held already.
        case existing(RuleState)
        case new(Placed)
    }

    /// Checks a push and gives it a port (one that neither a held rule nor
    /// `alsoHeld`, the rules placed earlier in the same batch, holds); a
    /// kernel-path rule's forwards are added to the kernel table.
    /// - Throws: `ControlError` (400, 403, 409); nothing changed.
    private func place(id: String, push: RulePush, now: Int64, in s: inout State,
                       alsoHeld: (Int) -> [PortAllocator.Use]) throws(ControlError) -> Placement {
        let checked = try RulePolicy.check(push, settings: s.settings)
        var normalized = push
        normalized.unusedExpirySeconds = checked.unusedExpirySeconds
        let path = push.forwardingPath ?? s.settings.defaultForwarding
        normalized.forwardingPath = path == .userspace ? nil : path
        if path != .userspace {
            guard kernel != nil else {
                throw ControlError(409, field: "forwarding_path", "forwarding_path: \(path.rawValue) needs the kernel path, which this gateway's config does not enable (kernel_path = on; it needs CAP_NET_ADMIN)")
            }
            if let refusal = KernelRules.refusal(checked, settings: s.settings) { throw refusal }
        }
        if let existing = s.pushed[id] {
            guard existing.push == normalized else {
                throw ControlError(409, field: "id", "id: rule \(id) already exists with other settings (delete it first)")
            }
            return .existing(existing)
        }
        let allocator = PortAllocator(range: s.settings.portRange)
        let fixed = s.fixedPorts, pushed = s.pushedPorts
        let probe = self.probe(s.settings)
        // The TCP ports the probe found free: the engine need not probe them again.
        var probedTCP = Set<Int>()
        let port = try allocator.allocate(method: push.method, requested: push.port, client: checked.client,
                                          transport: checked.transport,
                                          holders: { fixed.holders($0) + pushed.holders($0) + alsoHeld($0) },
                                          probe: { port, transport in
                                              let free = probe(port, transport)
                                              if free && transport.contains(.tcp) { probedTCP.insert(port) }
                                              return free
                                          })
        let rule = RuleState(id: id, push: normalized, port: port, created: now)
        var added: [KernelForward] = []
        if path == .kernel, let kernel {
            added = KernelRules.forwards(rule, publicAddress: s.settings.publicAddress)
            let timeout = KernelRules.timeoutMilliseconds(rule, now: now, defaultExpiry: s.settings.defaultUnusedExpirySeconds)
            do throws(NetfilterError) {
                try kernel.apply(added.map { .add($0, timeoutMilliseconds: timeout) })
            } catch {
                throw error.isAlreadyPresent
                    ? ControlError(409, field: "port", "port: \(port) is already forwarded in the kernel table (\(error))")
                    : error.controlError
            }
        }
        let probedFree: SocketAddress? = probedTCP.contains(port) && path != .kernel
            ? UInt16(exactly: port).map { SocketAddress(ip: s.settings.publicAddress, port: $0) } : nil
        return .new(Placed(rule: rule, added: added, probedFree: probedFree))
    }

    /// Takes placed rules out of the kernel table and the relay again (their
    /// journal record could not be written).
    private func undo(_ placed: [Placed]) {
        let added = placed.flatMap(\.added)
        if !added.isEmpty { try? kernel?.apply(added.map { .remove($0) }) }
        let relayed = placed.filter { !$0.onKernel }.map { RulePolicy.idPrefix + $0.rule.id }
        if !relayed.isEmpty { try? engine.change(removing: relayed) }
        relayCache.withLock { cache in for item in placed { cache[item.rule.id] = nil } }
    }

    /// Placed rules, in effect and recorded, become held rules.
    private func commit(_ placed: [Placed], to s: inout State) {
        s.storeError = nil
        for item in placed {
            if !item.added.isEmpty {
                s.kernelGeneration += 1
                s.kernelAddedIn[item.rule.id] = s.kernelGeneration
            }
            s.pushed[item.rule.id] = item.rule
            s.pushedPorts.set(item.rule.id, portUses(of: item.rule, s.settings))
        }
    }

    /// Waits for a recorded change to be durable. A failure leaves the change
    /// in effect (in the relay and in memory; the next change writes the
    /// whole set again) and says so: the page cache holds it, but it was not
    /// acknowledged as durable.
    private func waitDurable(_ pending: RuleStore.Pending) throws(ControlError) {
        let sync = published.withLock { $0.settings.rulesSync }
        do throws(ControlError) {
            try store.makeDurable(pending, sync: sync)
        } catch {
            state.withLock { $0.storeError = error.message }
            logger.critical("control: \(error.message); the change is in effect but not durable")
            throw ControlError(500, "\(error.message); the change is in effect but was not made durable")
        }
    }

    /// `DELETE /control/v1/rules/{id}`: the listener closes; sessions already
    /// established through the rule continue until they end.
    /// - Throws: `ControlError` 404 for an unknown id, 500 when the state cannot be written.
    public func delete(id: String) throws(ControlError) {
        try batch(putting: [], deleting: [id]).delete[0].get()
        logger.info("control: rule \(id) deleted")
    }

    /// The pushed rules with their live session counts (`GET /control/v1/rules`).
    /// - Parameter sessions: `sessionCounts()` when the caller has it already
    ///   (the status writer, which also needs the total).
    public func rules(sessions: [String: Int]? = nil) -> [RuleState] {
        let sessions = sessions ?? sessionCounts()
        // A copy under the lock (copy-on-write: O(1)); the ordering outside it,
        // so a push does not wait for it (--status writes this every second).
        let (held, traffic) = state.withLock { ($0.pushed, $0.kernelTraffic) }
        return held.list.map { rule in
            var rule = rule
            rule.sessions = sessions[RulePolicy.idPrefix + rule.id] ?? 0
            if rule.forwardingPath != .userspace {
                rule.kernel = traffic[rule.id] ?? KernelTraffic(offloadedClients: rule.offloaded?.count ?? 0)
            }
            return rule
        }
    }

    /// The kernel path's totals over every rule, and the last problem with
    /// the table (nil: none), for SIGUSR1 and the status.
    public func kernelSummary() -> (forwards: Int, traffic: KernelTraffic, problem: String?)? {
        guard kernel != nil else { return nil }
        return state.withLock { s in
            var total = KernelTraffic()
            var forwards = 0
            for rule in s.pushed.list where rule.forwardingPath != .userspace {
                forwards += KernelRules.forwards(rule, publicAddress: s.settings.publicAddress).count
                if let t = s.kernelTraffic[rule.id] {
                    total.flows += t.flows
                    total.packets += t.packets
                    total.bytes += t.bytes
                    total.offloadedClients += t.offloadedClients
                }
            }
            return (forwards, total, s.kernelError)
        }
    }

    /// What keeps the gateway from taking rules (the state file cannot be
    /// written), or nil. Waits for a change in progress.
    public var problem: String? { state.withLock { $0.storeError } }

    /// The pushed rules as last recorded (no engine query).
    public func pushedRules() -> [RuleState] { state.withLock { $0.pushed.list } }

    /// The broker's answer to a registration: removes the rules in `sent`
    /// (the ones the registration listed) that `keep` does not hold. Rules
    /// pushed after the registration was sent are left alone.
    /// - Returns: the removed ids.
    @discardableResult
    public func reconcile(sent: [String], keep: [String]) -> [String] {
        let drop = Set(sent).subtracting(keep)
        guard !drop.isEmpty else { return [] }
        let removed: [String] = state.withLock { s in
            let present = drop.filter { s.pushed.contains($0) }
            guard !present.isEmpty else { return [] }
            do throws(ControlError) { try remove(present, from: &s) } catch {
                logger.error("control: reconciliation could not remove \(present.sorted()): \(error)")
                return []
            }
            return present.sorted()
        }
        if !removed.isEmpty { logger.info("control: the broker no longer wants \(removed); removed") }
        return removed
    }

    // MARK: Expiry

    /// Records which rules have sessions and removes rules unused for their
    /// `unused_expiry_s` since creation. A rule with live sessions is never
    /// removed; a rule that was used keeps until the broker deletes it.
    /// - Returns: the expired ids.
    ///
    /// Kernel path: a `kernel` rule is used once the kernel counted a flow
    /// or a packet for it; its elements then lose their expiry (one batch).
    /// One whose elements the kernel expired unused is removed here. An
    /// `offload` rule gets a kernel element for each client the relay has
    /// admitted, so that client's next connections and flows take the kernel.
    @discardableResult
    public func tick() -> [String] {
        let sessions = sessionCounts()
        // Counted since each rule was installed: a session that began and
        // ended between two ticks still marks its rule used.
        var everUsed = engine.acceptedByRule()
        for (id, stats) in engine.datagramStats() where !id.isEmpty { everUsed[id, default: 0] += stats.flowsCreated }
        // Who the relay admitted, per rule (offload).
        var admitted: [String: Set<IPAddress>] = [:]
        if kernel != nil {
            for connection in engine.connections() { admitted[connection.rule, default: []].insert(connection.client.ip.unmapped) }
            for flow in engine.flows() { admitted[flow.rule, default: []].insert(flow.client.ip.unmapped) }
        }
        var kernelRead: Result<[KernelForward.Key: KernelForwardState], NetfilterError>?
        let readGeneration = state.withLock { $0.kernelGeneration }
        if let kernel {
            kernelRead = Result { () throws(NetfilterError) in
                var held: [KernelForward.Key: KernelForwardState] = [:]
                for state in try kernel.forwards() { held[state.forward.key] = state }
                return held
            }
        }
        let now = clock()
        // Keyed by the pushed rule's own id here, outside the lock: the pass
        // over every rule under it then makes no string (a push waits for it).
        let pushedSessions = Self.pushedIDs(sessions), pushedUse = Self.pushedIDs(everUsed)
        let expired: [String] = state.withLock { s in
            var firstUse = false
            let seenBefore = s.seenUse
            s.pushed.updateEach { rule in
                let count = pushedSessions[rule.id] ?? 0
                rule.sessions = count
                if count > 0 || (pushedUse[rule.id] ?? 0) > (seenBefore[rule.id] ?? 0) {
                    if rule.lastUsed == nil { firstUse = true }
                    rule.lastUsed = now
                }
            }
            s.seenUse = pushedUse
            var kernelExpired = Set<String>()
            if let kernelRead {
                switch kernelRead {
                case .success(let held):
                    let (expiredByKernel, changed) = syncKernel(held: held, readGeneration: readGeneration, admitted: admitted, now: now, s: &s)
                    kernelExpired = expiredByKernel
                    if changed { firstUse = true }
                case .failure(let error):
                    if s.kernelError == nil { logger.error("control: cannot read the kernel table: \(error)") }
                    s.kernelError = "cannot read the kernel table: \(error)"
                }
            }
            // Kernel rules expire in the kernel (above), not by this clock.
            let expiring = kernelExpired.union(s.pushed.filter { rule in
                rule.forwardingPath != .kernel && rule.lastUsed == nil && rule.sessions == 0
                    && now - rule.created >= Int64(rule.push.unusedExpirySeconds ?? s.settings.defaultUnusedExpirySeconds)
            }.map(\.id))
            if !expiring.isEmpty {
                do throws(ControlError) { try remove(expiring, from: &s) } catch {
                    logger.error("control: could not expire \(expiring.sorted()): \(error)")
                    return []
                }
            }
            if firstUse {
                // The first use is worth a write: after a restart the rule must not expire.
                do throws(ControlError) { try store.save(s.pushed.list) } catch { logger.error("control: \(error)") }
            }
            return expiring.sorted()
        }
        for id in expired { logger.info("control: rule \(id) expired (unused since it was created)") }
        return expired
    }

    /// The kernel half of a tick, inside the lock: counters, first use,
    /// elements the kernel expired, offloaded clients. Changes to the table
    /// go in one batch; when it fails, the rules stay as they were and the
    /// next tick tries again.
    /// - Returns: rules the kernel expired unused, and whether a rule changed (worth a save).
    private func syncKernel(held: [KernelForward.Key: KernelForwardState], readGeneration: UInt64,
                            admitted: [String: Set<IPAddress>], now: Int64,
                            s: inout State) -> (expired: Set<String>, changed: Bool) {
        guard let kernel else { return ([], false) }
        var expired = Set<String>()
        var changes: [KernelTable.Change] = []
        let original = s.pushed.list
        var next = original
        var base = s.kernelBase
        var traffic: [String: KernelTraffic] = [:]
        for index in next.indices where next[index].forwardingPath != .userspace {
            let rule = next[index]
            // Added after the table was read: not in `held` yet; next tick.
            if (s.kernelAddedIn[rule.id] ?? 0) > readGeneration {
                if let known = s.kernelTraffic[rule.id] { traffic[rule.id] = known }
                continue
            }
            let forwards = KernelRules.forwards(rule, publicAddress: s.settings.publicAddress)
            let states = forwards.compactMap { held[$0.key] }
            var counted = base[rule.id] ?? KernelTraffic()
            for state in states {
                counted.flows += state.flows
                counted.packets += state.packets
                counted.bytes += state.bytes
            }
            counted.offloadedClients = rule.offloaded?.count ?? 0
            let before = s.kernelTraffic[rule.id]
            let used = counted.flows > 0 || counted.packets > 0
            if rule.forwardingPath == .kernel {
                if rule.lastUsed == nil && !used && states.count < forwards.count {
                    expired.insert(rule.id)      // the kernel's expiry
                    continue
                }
                if used && (before == nil || counted.flows > before!.flows || counted.packets > before!.packets) {
                    next[index].lastUsed = now
                }
                // Used: its elements lose their expiry; missing ones come back.
                if next[index].lastUsed != nil {
                    for forward in forwards {
                        guard let state = held[forward.key] else {
                            changes.append(.add(forward, timeoutMilliseconds: nil))
                            continue
                        }
                        if state.timeoutMilliseconds > 0 {
                            changes += [.remove(forward), .add(forward, timeoutMilliseconds: nil)]
                            var kept = base[rule.id] ?? KernelTraffic()
                            kept.flows += state.flows
                            kept.packets += state.packets
                            kept.bytes += state.bytes
                            base[rule.id] = kept
                        }
                    }
                }
            } else {
                // offload: the clients the relay admitted take the kernel from now on.
                let known = Set((rule.offloaded ?? []).compactMap { IPAddress($0)?.unmapped })
                let fresh = (admitted[RulePolicy.idPrefix + rule.id] ?? []).filter { $0.isIPv4 && !known.contains($0) }
                if !fresh.isEmpty {
                    next[index].offloaded = (rule.offloaded ?? []) + fresh.map(\.description).sorted()
                    let added = KernelRules.forwards(next[index], publicAddress: s.settings.publicAddress)
                        .filter { forward in forward.client.map { fresh.contains($0) } ?? false }
                    changes += added.map { .add($0, timeoutMilliseconds: nil) }
                    counted.offloadedClients = next[index].offloaded?.count ?? 0
                }
                // An element somebody removed comes back.
                for forward in forwards where held[forward.key] == nil { changes.append(.add(forward, timeoutMilliseconds: nil)) }
            }
            traffic[rule.id] = counted
        }
        do throws(NetfilterError) {
            try kernel.apply(changes)
        } catch {
            if s.kernelError == nil { logger.error("control: kernel table not updated: \(error)") }
            s.kernelError = "kernel table not updated: \(error)"
            s.kernelTraffic = traffic
            return (expired, false)
        }
        let changed = next != original
        for rule in next where rule.offloaded != s.pushed[rule.id]?.offloaded {
            logger.info("control: rule \(rule.id): clients \(rule.offloaded ?? []) offloaded to the kernel path")
        }
        s.pushed = PushedRules(next)
        s.kernelBase = base.filter { key, _ in s.pushed.contains(key) }
        s.kernelAddedIn = s.kernelAddedIn.filter { _, generation in generation > readGeneration }
        s.kernelTraffic = traffic
        if s.kernelError != nil { logger.notice("control: the kernel table is in step again") }
        s.kernelError = nil
        return (expired, changed)
    }

    // MARK: Figures

    /// Live connections and UDP flows by engine rule id.
    public func sessionCounts() -> [String: Int] {
        var counts: [String: Int] = [:]
        for connection in engine.connections() { counts[connection.rule, default: 0] += 1 }
        for flow in engine.flows() { counts[flow.rule, default: 0] += 1 }
        return counts
    }

    /// `counts` of the engine's rule ids that are pushed rules, by the pushed rule's id.
    private static func pushedIDs(_ counts: [String: Int]) -> [String: Int] {
        var plain: [String: Int] = [:]
        plain.reserveCapacity(counts.count)
        for (id, count) in counts where id.hasPrefix(RulePolicy.idPrefix) {
            plain[String(id.dropFirst(RulePolicy.idPrefix.count))] = count
        }
        return plain
    }

    /// Every port a rule holds, with its protocol ("20001/tcp"), in port order (for `--status`).
    public func portsInUse() -> [String] {
        // Copies under the lock (O(1)), the O(rules) work outside it: a push
        // does not wait for this (--status and /metrics ask every second).
        // Numbers are gathered and sorted, and each text is made once.
        let (fixed, held, settings) = state.withLock { ($0.fixed, $0.pushed, $0.settings) }
        var keys = Set<Int>()   // port x 2, + 1 for UDP
        for rule in fixed + relayRules(held.unordered, settings, caching: false) {
            let port = Int(rule.listen.port)
            if rule.transport.contains(.tcp) { keys.insert(port * 2) }
            if rule.transport.contains(.udp) { keys.insert(port * 2 + 1) }
        }
        return keys.sorted().map { "\($0 / 2)/\($0 % 2 == 0 ? "tcp" : "udp")" }
    }

    // MARK: Inside the lock

    /// The relay rules of `pushed` (`RulePolicy.relayRule` of each, those that
    /// can be opened), made once per rule and public address.
    /// - Parameter caching: false outside the state lock: the cache is read
    ///   from a copy (copy-on-write), so the pass over every rule holds no
    ///   lock a push needs, and what is made is not kept (the rule may be
    ///   gone by then, and its entry would outlive it).
    private func relayRules(_ pushed: [RuleState], _ settings: ControlSettings, caching: Bool = true) -> [RelayRule] {
        func made(_ state: RuleState, _ cache: inout [String: (state: RuleState, address: IPAddress, rule: RelayRule?)]) -> RelayRule? {
            guard state.forwardingPath != .kernel else { return nil }
            if let known = cache[state.id], known.address == settings.publicAddress,
               known.state.push == state.push, known.state.port == state.port {
                return known.rule
            }
            let rule = RulePolicy.relayRule(state, settings: settings)
            if caching { cache[state.id] = (state, settings.publicAddress, rule) }
            return rule
        }
        if !caching {
            var copy = relayCache.withLock { $0 }
            return pushed.compactMap { made($0, &copy) }
        }
        // Entries go with their rules (`remove`, a failed put, restore).
        return relayCache.withLock { cache in pushed.compactMap { made($0, &cache) } }
    }

    /// The ports one pushed rule holds.
    private func portUses(of rule: RuleState, _ settings: ControlSettings) -> [PortAllocator.Use] {
        rule.forwardingPath == .kernel ? kernelUses([rule], settings) : Self.uses(of: relayRules([rule], settings), settings)
    }

    /// Rebuilds the port index of every pushed rule (restore, a new public address).
    private func reindexPorts(_ s: inout State) {
        s.pushedPorts = PortUses()
        for rule in s.pushed.list { s.pushedPorts.set(rule.id, portUses(of: rule, s.settings)) }
        Self.indexFixedPorts(&s)
    }

    /// Rebuilds the port index of the config's forwards and broker forwarding.
    private static func indexFixedPorts(_ s: inout State) {
        s.fixedPorts = PortUses(uses(of: s.fixed, s.settings))
    }

    /// The ports kernel rules hold (they have no listener to show them).
    private func kernelUses(_ pushed: [RuleState], _ settings: ControlSettings) -> [PortAllocator.Use] {
        pushed.filter { $0.forwardingPath == .kernel }.map { rule in
            var allow: [CIDR] = []
            if rule.push.method != .randomPort, let ip = rule.push.clientIP.flatMap(IPAddress.init)?.unmapped {
                allow = [CIDR(address: ip, prefixLength: ip.isIPv4 ? 32 : 128)]
            }
            let transport: Transport = switch rule.push.protocol {
            case .tcp: .tcp
            case .udp: .udp
            case .both: .both
            }
            return PortAllocator.Use(port: rule.port, transport: transport, allow: allow)
        }
    }

    /// The ports `relays` hold on the public address.
    private static func uses(of relays: [RelayRule], _ settings: ControlSettings) -> [PortAllocator.Use] {
        relays.filter { rule in
            // Rules on another specific address do not hold the public address's port.
            rule.listen.ip == settings.publicAddress || rule.listen.ip.isUnspecified || settings.publicAddress.isUnspecified
        }.map { PortAllocator.Use(port: Int($0.listen.port), transport: $0.transport, allow: $0.allow) }
    }

    /// Adds (or removes) relay rules one change at a time: the engine's cost
    /// is that of the rules changed, not of the rules held.
    private func applyToEngine(upserting: [RelayRule] = [], removing: [String] = [],
                               probedFree: Set<SocketAddress> = []) throws(ControlError) {
        do throws(RuleError) {
            try engine.change(upserting: upserting, removing: removing, probedFree: probedFree)
        } catch {
            switch error {
            case .listenFailed, .conflictingRules:
                throw ControlError(409, field: "port", "port: \(error)")
            case .duplicateID, .invalid:
                throw ControlError(400, "\(error)")
            }
        }
    }

    /// Removes rules: listeners close (their sessions go on), kernel
    /// elements go in one batch and their flows' conntrack entries with them.
    /// - Parameter waitDurable: false: the caller waits for the returned
    ///   append after releasing the lock (group commit).
    @discardableResult
    private func remove(_ ids: Set<String>, from s: inout State, waitDurable: Bool = true) throws(ControlError) -> RuleStore.Pending? {
        let leaving = ids.compactMap { s.pushed[$0] }
        let forwards = leaving.flatMap { KernelRules.forwards($0, publicAddress: s.settings.publicAddress) }
        let relayIDs = ids.map { RulePolicy.idPrefix + $0 }
        // Removing rules only closes listeners; it cannot fail to apply.
        try applyToEngine(removing: relayIDs)
        if let kernel, !forwards.isEmpty {
            do throws(NetfilterError) {
                try kernel.apply(forwards.map { .remove($0) })
            } catch {
                try? engine.change(upserting: relayRules(leaving, s.settings))
                throw error.controlError
            }
        }
        var pending: RuleStore.Pending?
        do throws(ControlError) {
            pending = try store.record(removing: Array(ids))
            if waitDurable, let written = pending {
                try store.makeDurable(written, sync: s.settings.rulesSync)
                pending = nil
            }
        } catch {
            s.storeError = error.message
            if let kernel, !forwards.isEmpty { try? kernel.apply(forwards.map { .add($0, timeoutMilliseconds: nil) }) }
            try? engine.change(upserting: relayRules(leaving, s.settings))
            throw error
        }
        s.storeError = nil
        s.pushed.remove(ids)
        relayCache.withLock { cache in for id in ids { cache[id] = nil } }
        for id in ids {
            s.pushedPorts.remove(id)
            s.kernelTraffic[id] = nil
            s.kernelBase[id] = nil
            s.kernelAddedIn[id] = nil
        }
        if let kernel {
            for forward in forwards {
                do throws(NetfilterError) {
                    let ended = try kernel.deleteConnections(of: forward)
                    if ended > 0 { logger.info("control: \(ended) kernel flow(s) of \(forward) ended") }
                } catch {
                    logger.error("control: the flows of \(forward) could not be ended: \(error)")
                }
            }
        }
        return pending
    }
}
