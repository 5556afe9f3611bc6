import SystemLayer

/// The engine's rules, indexed so that a change costs what it touches, not
/// what is held (issue 15): a gateway holding thousands of pushed rules
/// adds, changes and removes them one at a time, and a Security Gateway
/// adds and removes one UDP rule per client address on one listening
/// address. Pure (no sockets): `plan` checks a change and says which
/// listeners open and close, in O(rules changed); `commit` makes it the
/// state. Used under the engine's control lock.
struct RuleIndex {
    private(set) var byID: [String: RelayRule] = [:]
    /// Insertion order: the order among rules of one address with equal specificity.
    private var sequence: [String: UInt64] = [:]
    private var nextSequence: UInt64 = 0
    /// Rule ids per listening address (every transport).
    private var idsByListen: [SocketAddress: Set<String>] = [:]
    /// How many rules of each address carry TCP, and UDP.
    private var tcpCount: [SocketAddress: Int] = [:]
    private var udpCount: [SocketAddress: Int] = [:]
    /// Rule ids by (address, allow-set): two rules of one key sharing a
    /// transport would take the same clients.
    private var sameClients: [RuleError.ConflictKey: [String]] = [:]
    /// Listening addresses per port (a wildcard and a specific address
    /// cannot share one).
    private var addressesByPort: [UInt16: Set<SocketAddress>] = [:]

    var count: Int { byID.count }
    var addressCount: Int { idsByListen.count }

    /// Every rule, in insertion order.
    var rules: [RelayRule] {
        byID.values.sorted { sequence[$0.id]! < sequence[$1.id]! }
    }

    /// The rules of one address, in insertion order.
    func rules(at address: SocketAddress) -> [RelayRule] {
        (idsByListen[address] ?? []).sorted { sequence[$0]! < sequence[$1]! }.map { byID[$0]! }
    }

    /// What a change does: the addresses it touches and the listeners to
    /// open and close there.
    struct Plan {
        var upserts: [RelayRule] = []
        /// Ids removed (present before, absent after).
        var removed: [String] = []
        /// Ids replaced with other settings.
        var replaced: [String] = []
        var touched: Set<SocketAddress> = []
        var openTCP: [SocketAddress] = []
        var closeTCP: [SocketAddress] = []
        var openUDP: [SocketAddress] = []
        var closeUDP: [SocketAddress] = []
        /// A rule of each address to open (TCP, then UDP), for error messages.
        var owners: [SocketAddress: String] = [:]
        var udpOwners: [SocketAddress: String] = [:]
        var isEmpty: Bool { upserts.isEmpty && removed.isEmpty }
    }

    /// Checks adding or replacing `upserting` and removing the ids in
    /// `removing` (unknown ids are ignored) as `RuleError.validate` would
    /// check the whole resulting set, in O(rules changed).
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
        plan.replaced = plan.upserts.compactMap { byID[$0.id] != nil ? $0.id : nil }
        let leaving = Set(plan.removed).union(plan.replaced)

        // Transport counts of each touched address afterwards.
        var tcpAfter: [SocketAddress: Int] = [:]
        var udpAfter: [SocketAddress: Int] = [:]
        func count(_ rule: RelayRule, _ delta: Int) {
            plan.touched.insert(rule.listen)
            if rule.transport.contains(.tcp) { tcpAfter[rule.listen, default: tcpCount[rule.listen] ?? 0] += delta }
            if rule.transport.contains(.udp) { udpAfter[rule.listen, default: udpCount[rule.listen] ?? 0] += delta }
        }
        for id in leaving { count(byID[id]!, -1) }
        for rule in plan.upserts { count(rule, +1) }

        // The same clients on one address, against the rules staying and
        // the others of this change.
        var arriving: [RuleError.ConflictKey: [RelayRule]] = [:]
        for rule in plan.upserts {
            let key = RuleError.ConflictKey(listen: rule.listen, allow: Set(rule.allow))
            for id in sameClients[key] ?? [] where !leaving.contains(id) {
                if !byID[id]!.transport.isDisjoint(with: rule.transport) { throw .conflictingRules(id, rule.id, listen: rule.listen) }
            }
            if let other = arriving[key]?.first(where: { !$0.transport.isDisjoint(with: rule.transport) }) {
                throw .conflictingRules(other.id, rule.id, listen: rule.listen)
            }
            arriving[key, default: []].append(rule)
        }

        // A wildcard and a specific address of one port with a transport in
        // common, afterwards; only pairs with a touched address can be new.
        func transports(_ address: SocketAddress) -> Transport {
            var t = Transport()
            if (tcpAfter[address] ?? tcpCount[address] ?? 0) > 0 { t.insert(.tcp) }
            if (udpAfter[address] ?? udpCount[address] ?? 0) > 0 { t.insert(.udp) }
            return t
        }
        func rulesAfter(_ address: SocketAddress) -> [RelayRule] {
            rules(at: address).filter { !leaving.contains($0.id) } + plan.upserts.filter { $0.listen == address }
        }
        for address in plan.touched {
            var pairs: [(wildcard: SocketAddress, specific: SocketAddress)] = []
            if address.ip.isUnspecified {
                // The specific addresses of this port, held or arriving.
                for other in (addressesByPort[address.port] ?? []).union(plan.touched)
                where other.port == address.port && !other.ip.isUnspecified && other.wildcard == address {
                    pairs.append((address, other))
                }
            } else {
                pairs.append((address.wildcard, address))
            }
            for (wildcard, specific) in pairs where !transports(wildcard).isDisjoint(with: transports(specific)) {
                // Only now, on the error path, are the rules themselves looked at.
                if let (other, rule) = RuleError.wildcardConflict(wildcard: rulesAfter(wildcard), specific: rulesAfter(specific)) {
                    throw .conflictingRules(other.id, rule.id, listen: specific)
                }
            }
        }

        for address in plan.touched {
            let hadTCP = (tcpCount[address] ?? 0) > 0, hasTCP = (tcpAfter[address] ?? tcpCount[address] ?? 0) > 0
            let hadUDP = (udpCount[address] ?? 0) > 0, hasUDP = (udpAfter[address] ?? udpCount[address] ?? 0) > 0
            if hasTCP && !hadTCP { plan.openTCP.append(address) }
            if hadTCP && !hasTCP { plan.closeTCP.append(address) }
            if hasUDP && !hadUDP { plan.openUDP.append(address) }
            if hadUDP && !hasUDP { plan.closeUDP.append(address) }
        }
        for rule in plan.upserts {
            if rule.transport.contains(.tcp), plan.owners[rule.listen] == nil { plan.owners[rule.listen] = rule.id }
            if rule.transport.contains(.udp), plan.udpOwners[rule.listen] == nil { plan.udpOwners[rule.listen] = rule.id }
        }
        // In the order of their text, for errors that do not depend on hashing;
        // each address written once, not at every comparison.
        func ordered(_ addresses: [SocketAddress]) -> [SocketAddress] {
            addresses.count < 2 ? addresses : addresses.map { ($0.description, $0) }.sorted { $0.0 < $1.0 }.map(\.1)
        }
        plan.openTCP = ordered(plan.openTCP)
        plan.openUDP = ordered(plan.openUDP)
        plan.closeTCP = ordered(plan.closeTCP)
        plan.closeUDP = ordered(plan.closeUDP)
        return plan
    }

    /// Makes a checked plan the state, in O(rules changed).
    mutating func commit(_ plan: Plan) {
        let staying = Set(plan.upserts.map(\.id))
        for id in plan.removed + plan.upserts.map(\.id) {
            guard let old = byID.removeValue(forKey: id) else { continue }
            forget(old)
            if !staying.contains(id) { sequence[id] = nil }
        }
        for rule in plan.upserts {
            byID[rule.id] = rule
            if sequence[rule.id] == nil {
                sequence[rule.id] = nextSequence
                nextSequence += 1
            }
            idsByListen[rule.listen, default: []].insert(rule.id)
            addressesByPort[rule.listen.port, default: []].insert(rule.listen)
            if rule.transport.contains(.tcp) { tcpCount[rule.listen, default: 0] += 1 }
            if rule.transport.contains(.udp) { udpCount[rule.listen, default: 0] += 1 }
            sameClients[RuleError.ConflictKey(listen: rule.listen, allow: Set(rule.allow)), default: []].append(rule.id)
        }
    }

    private mutating func forget(_ rule: RelayRule) {
        let address = rule.listen
        idsByListen[address]?.remove(rule.id)
        if idsByListen[address]?.isEmpty == true {
            idsByListen[address] = nil
            addressesByPort[address.port]?.remove(address)
            if addressesByPort[address.port]?.isEmpty == true { addressesByPort[address.port] = nil }
        }
        if rule.transport.contains(.tcp) {
            tcpCount[address, default: 1] -= 1
            if tcpCount[address] == 0 { tcpCount[address] = nil }
        }
        if rule.transport.contains(.udp) {
            udpCount[address, default: 1] -= 1
            if udpCount[address] == 0 { udpCount[address] = nil }
        }
        let key = RuleError.ConflictKey(listen: address, allow: Set(rule.allow))
        sameClients[key]?.removeAll { $0 == rule.id }
        if sameClients[key]?.isEmpty == true { sameClients[key] = nil }
    }
}
