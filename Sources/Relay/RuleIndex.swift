import SystemLayer

/// The engine's rules, indexed so that a change costs what it touches, not
/// what is held (issue 15): a gateway holding thousands of pushed rules
/// adds, changes and removes them one at a time. Pure (no sockets): `plan`
/// checks a change and says which listeners open and close; `commit` makes
/// it the state. Used under the engine's control lock.
struct RuleIndex {
    private(set) var byID: [String: RelayRule] = [:]
    /// Insertion order: the order among rules of one address with equal specificity.
    private var sequence: [String: UInt64] = [:]
    private var nextSequence: UInt64 = 0
    /// Rule ids per listening address (every transport), in insertion order.
    private(set) var idsByListen: [SocketAddress: [String]] = [:]
    /// Listening addresses per port (a wildcard and a specific address
    /// cannot share one).
    private var addressesByPort: [UInt16: Set<SocketAddress>] = [:]

    var count: Int { byID.count }
    var addressCount: Int { idsByListen.count }

    /// Every rule, in insertion order.
    var rules: [RelayRule] {
        byID.values.sorted { sequence[$0.id]! < sequence[$1.id]! }
    }

    func rules(at address: SocketAddress) -> [RelayRule] {
        (idsByListen[address] ?? []).map { byID[$0]! }
    }

    /// What a change does: the rules of each address it touches afterwards
    /// (insertion order, the new ones last), and the listeners to open and close.
    struct Plan {
        var upserts: [RelayRule] = []
        /// Ids removed (present before, absent after).
        var removed: [String] = []
        var after: [SocketAddress: [RelayRule]] = [:]
        var openTCP: [SocketAddress] = []
        var closeTCP: [SocketAddress] = []
        var openUDP: [SocketAddress] = []
        var closeUDP: [SocketAddress] = []
        /// The first rule of each address to open, for error messages.
        var owners: [SocketAddress: String] = [:]
        var isEmpty: Bool { upserts.isEmpty && removed.isEmpty }
    }

    /// Checks adding or replacing `upserting` and removing the ids in
    /// `removing` (unknown ids are ignored), as `RuleError.validate` would
    /// check the whole resulting set, looking only at the addresses touched.
    /// - Throws: `RuleError` naming the rule; nothing is changed.
    func plan(upserting: [RelayRule], removing: [String]) throws(RuleError) -> Plan {
        var plan = Plan()
        var upsertIDs = Set<String>()
        for rule in upserting {
            guard upsertIDs.insert(rule.id).inserted else { throw .duplicateID(rule.id) }
            try RuleError.checkAlone(rule)
        }
        // An unchanged rule is no change.
        plan.upserts = upserting.filter { byID[$0.id] != $0 }
        plan.removed = removing.filter { byID[$0] != nil && !upsertIDs.contains($0) }
        let leaving = Set(plan.removed).union(plan.upserts.map(\.id))
        var touched = Set<SocketAddress>()
        for id in leaving { if let old = byID[id] { touched.insert(old.listen) } }
        for rule in plan.upserts { touched.insert(rule.listen) }
        var arriving: [SocketAddress: [RelayRule]] = [:]
        for rule in plan.upserts { arriving[rule.listen, default: []].append(rule) }
        var touchedByPort: [UInt16: Set<SocketAddress>] = [:]
        for address in touched {
            var rules = (idsByListen[address] ?? []).filter { !leaving.contains($0) }.map { byID[$0]! }
            rules += arriving[address] ?? []
            plan.after[address] = rules
            if let (a, b) = RuleError.sameClientsConflict(rules) { throw .conflictingRules(a.id, b.id, listen: address) }
            touchedByPort[address.port, default: []].insert(address)
        }
        // Wildcard against specific addresses of the same port, after the change.
        for (port, touchedHere) in touchedByPort {
            let addresses = (addressesByPort[port] ?? []).union(touchedHere)
            let current = { (address: SocketAddress) -> [RelayRule] in plan.after[address] ?? self.rules(at: address) }
            for address in addresses where !address.ip.isUnspecified {
                let wildcard = address.wildcard
                guard addresses.contains(wildcard), touched.contains(address) || touched.contains(wildcard) else { continue }
                if let (other, rule) = RuleError.wildcardConflict(wildcard: current(wildcard), specific: current(address)) {
                    throw .conflictingRules(other.id, rule.id, listen: address)
                }
            }
        }
        for (address, rules) in plan.after {
            let before = self.rules(at: address)
            let hadTCP = before.contains { $0.transport.contains(.tcp) }
            let hasTCP = rules.contains { $0.transport.contains(.tcp) }
            let hadUDP = before.contains { $0.transport.contains(.udp) }
            let hasUDP = rules.contains { $0.transport.contains(.udp) }
            if hasTCP && !hadTCP { plan.openTCP.append(address) }
            if hadTCP && !hasTCP { plan.closeTCP.append(address) }
            if hasUDP && !hadUDP { plan.openUDP.append(address) }
            if hadUDP && !hasUDP { plan.closeUDP.append(address) }
            if let first = rules.first { plan.owners[address] = first.id }
        }
        let order = { (a: SocketAddress, b: SocketAddress) in a.description < b.description }
        plan.openTCP.sort(by: order)
        plan.openUDP.sort(by: order)
        return plan
    }

    /// Makes a checked plan the state.
    mutating func commit(_ plan: Plan) {
        let staying = Set(plan.upserts.map(\.id))
        for id in plan.removed + plan.upserts.map(\.id) {
            guard let old = byID.removeValue(forKey: id) else { continue }
            idsByListen[old.listen]?.removeAll { $0 == id }
            if idsByListen[old.listen]?.isEmpty == true {
                idsByListen[old.listen] = nil
                addressesByPort[old.listen.port]?.remove(old.listen)
                if addressesByPort[old.listen.port]?.isEmpty == true { addressesByPort[old.listen.port] = nil }
            }
            if !staying.contains(id) { sequence[id] = nil }
        }
        for rule in plan.upserts {
            byID[rule.id] = rule
            if sequence[rule.id] == nil {
                sequence[rule.id] = nextSequence
                nextSequence += 1
            }
            idsByListen[rule.listen, default: []].append(rule.id)
            addressesByPort[rule.listen.port, default: []].insert(rule.listen)
        }
        // A replaced rule keeps its place among its address's rules.
        for address in plan.after.keys {
            idsByListen[address]?.sort { sequence[$0]! < sequence[$1]! }
        }
    }
}
