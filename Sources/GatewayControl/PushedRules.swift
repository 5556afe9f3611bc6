import ControlProtocol

/// The pushed rules by id, in the order they were created (issue 15): a
/// push, a lookup or a delete costs O(1) whatever the number of rules held;
/// only the ordered list (`GET /control/v1/rules`, the periodic tick, a
/// whole-set save) costs O(n log n).
struct PushedRules: Sendable {
    private var entries: [String: (sequence: Int, rule: RuleState)] = [:]
    private var nextSequence = 0

    init(_ list: [RuleState] = []) {
        entries.reserveCapacity(list.count)
        for rule in list { self[rule.id] = rule }
    }

    var count: Int { entries.count }
    var isEmpty: Bool { entries.isEmpty }

    /// Every rule, in creation order.
    var list: [RuleState] {
        // Sorts (sequence, index) pairs, then copies each rule once: sorting
        // the entries themselves moved whole rules (a large struct, its
        // strings retained at each move), which with 2,000 rules was most
        // of the maintenance thread's CPU (twice a second, issue 15).
        var order: [(sequence: Int, index: [String: (sequence: Int, rule: RuleState)].Index)] = []
        order.reserveCapacity(entries.count)
        var index = entries.startIndex
        while index != entries.endIndex {
            order.append((entries[index].value.sequence, index))
            entries.formIndex(after: &index)
        }
        order.sort { $0.sequence < $1.sequence }
        return order.map { entries[$0.index].value.rule }
    }

    /// Every rule, in no particular order (cheaper than `list`).
    var unordered: [RuleState] { entries.values.map(\.rule) }

    func contains(_ id: String) -> Bool { entries[id] != nil }

    /// A rule by id. Setting a known id keeps its place; a new one goes last; nil removes.
    subscript(id: String) -> RuleState? {
        get { entries[id]?.rule }
        set {
            guard let newValue else { entries[id] = nil; return }
            if let known = entries[id] {
                entries[id] = (known.sequence, newValue)
            } else {
                entries[id] = (nextSequence, newValue)
                nextSequence += 1
            }
        }
    }

    /// Changes every rule in place (order kept), in no particular order.
    mutating func updateEach(_ body: (inout RuleState) -> Void) {
        for index in entries.values.indices { body(&entries.values[index].rule) }
    }

    /// The rules `isIncluded` keeps, in no particular order.
    func filter(_ isIncluded: (RuleState) -> Bool) -> [RuleState] {
        entries.values.lazy.map(\.rule).filter(isIncluded)
    }

    /// Removes `ids`. - Returns: the rules that were there.
    @discardableResult
    mutating func remove(_ ids: Set<String>) -> [RuleState] {
        ids.compactMap { id in entries.removeValue(forKey: id)?.rule }
    }
}

/// The ports rules hold, by port, kept up to date one rule at a time so
/// that choosing a port costs the ports tried, not the rules held.
struct PortUses: Sendable {
    private var byPort: [Int: [(owner: String, use: PortAllocator.Use)]] = [:]
    private var byOwner: [String: [PortAllocator.Use]] = [:]

    init() {}

    /// Each of `uses` held by an owner of its own (rules that are never
    /// changed one at a time: the config's forwards).
    init(_ uses: [PortAllocator.Use]) {
        for (index, use) in uses.enumerated() { set(String(index), [use]) }
    }

    var owners: Int { byOwner.count }

    /// Replaces what `owner` holds (an empty list: nothing).
    mutating func set(_ owner: String, _ uses: [PortAllocator.Use]) {
        remove(owner)
        guard !uses.isEmpty else { return }
        byOwner[owner] = uses
        for use in uses { byPort[use.port, default: []].append((owner, use)) }
    }

    mutating func remove(_ owner: String) {
        guard let uses = byOwner.removeValue(forKey: owner) else { return }
        for port in Set(uses.map(\.port)) {
            byPort[port]?.removeAll { $0.owner == owner }
            if byPort[port]?.isEmpty == true { byPort[port] = nil }
        }
    }

    /// Who holds `port` (any transport).
    func holders(_ port: Int) -> [PortAllocator.Use] {
        byPort[port]?.map(\.use) ?? []
    }
}
