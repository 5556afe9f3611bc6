import SystemLayer

/// Which protocols a rule relays on its port number.
public struct Transport: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let tcp = Transport(rawValue: 1)
    public static let udp = Transport(rawValue: 2)
    public static let both: Transport = [.tcp, .udp]

    public var description: String {
        switch self {
        case .tcp: "tcp"
        case .udp: "udp"
        case .both: "tcp+udp"
        default: "none"
        }
    }
}

/// One port-forward: connections (TCP) or flows (UDP) arriving on `listen`
/// from a client inside `allow` are relayed to `target`.
///
/// A value type whose fields live in one shared, immutable box: every
/// connection and flow holds its rule, so a copy costs a reference (8 bytes)
/// rather than the ~270 bytes of the fields (issue 15: 5,000 Security
/// Gateway sessions each held two copies). Setting a field makes a new box.
public struct RelayRule: Hashable, Sendable, CustomStringConvertible {
    @usableFromInline
    struct Fields: Hashable, Sendable {
        var id: String
        var listen: SocketAddress
        @usableFromInline var allow: [CIDR]
        var target: SocketAddress
        var idleTimeoutNanoseconds: UInt64?
        var maxConnections: Int?
        var transport: Transport
        var udpIdleTimeoutNanoseconds: UInt64
        var maxFlows: Int?
        var sourcePorts: ClosedRange<UInt16>?
        var preamble: ConnectionPreamble?
        var inspector: RuleInspector?
        var router: RuleRouter?
    }

    @usableFromInline
    final class Box: Sendable {
        @usableFromInline let fields: Fields
        init(_ fields: Fields) { self.fields = fields }
    }

    @usableFromInline
    private(set) var box: Box

    /// Sets one field: a new box, so copies made before keep theirs.
    private mutating func change<T>(_ field: WritableKeyPath<Fields, T>, to value: T) {
        var fields = box.fields
        fields[keyPath: field] = value
        box = Box(fields)
    }

    /// A name unique within a rule set (the config section name, or the broker's rule id).
    public var id: String { get { box.fields.id } set { change(\.id, to: newValue) } }
    public var listen: SocketAddress { get { box.fields.listen } set { change(\.listen, to: newValue) } }
    /// Allowed clients; empty means anyone.
    public var allow: [CIDR] { get { box.fields.allow } set { change(\.allow, to: newValue) } }
    public var target: SocketAddress { get { box.fields.target } set { change(\.target, to: newValue) } }
    /// Close a connection after this many nanoseconds with no byte either
    /// way. Nil (the default) means never: remote-desktop sessions are quiet
    /// for hours and liveness comes from TCP keepalive instead.
    public var idleTimeoutNanoseconds: UInt64? { get { box.fields.idleTimeoutNanoseconds } set { change(\.idleTimeoutNanoseconds, to: newValue) } }
    /// The connection limit of this rule's listener (nil: the engine's default).
    public var maxConnections: Int? { get { box.fields.maxConnections } set { change(\.maxConnections, to: newValue) } }
    /// TCP, UDP or both on the same port number.
    public var transport: Transport { get { box.fields.transport } set { change(\.transport, to: newValue) } }
    /// A UDP flow with no datagram either way for this long is removed.
    public var udpIdleTimeoutNanoseconds: UInt64 { get { box.fields.udpIdleTimeoutNanoseconds } set { change(\.udpIdleTimeoutNanoseconds, to: newValue) } }
    /// The flow limit of this rule's UDP listener (nil: the engine's default).
    public var maxFlows: Int? { get { box.fields.maxFlows } set { change(\.maxFlows, to: newValue) } }
    /// UDP flows leave from one of these source ports (e.g. 55000, as the
    /// PCoIP Security Gateway does) instead of an ephemeral one. Flows to the
    /// same target share a port only when they cannot be told apart by the
    /// target's address, so each (port, target) pair serves one flow.
    public var sourcePorts: ClosedRange<UInt16>? { get { box.fields.sourcePorts } set { change(\.sourcePorts, to: newValue) } }
    /// Bytes written to the upstream socket right after its connect
    /// succeeds and before any client byte (e.g. a PROXY protocol v2 header).
    /// TCP only.
    public var preamble: ConnectionPreamble? { get { box.fields.preamble } set { change(\.preamble, to: newValue) } }
    /// Inspect first: the target is chosen per connection by this inspector
    /// from the client's first bytes (which are then written upstream before
    /// any other client byte), and `target` is not used. TCP only.
    public var inspector: RuleInspector? { get { box.fields.inspector } set { change(\.inspector, to: newValue) } }
    /// Routed UDP: each new flow's target and source port come from this
    /// router (e.g. the Security Gateway choosing among the sessions of one
    /// client address); `target` and `sourcePorts` are then only what the
    /// router falls back on. UDP only.
    public var router: RuleRouter? { get { box.fields.router } set { change(\.router, to: newValue) } }

    public init(id: String, listen: SocketAddress, allow: [CIDR] = [], target: SocketAddress,
                idleTimeoutNanoseconds: UInt64? = nil, maxConnections: Int? = nil,
                transport: Transport = .tcp, udpIdleTimeoutNanoseconds: UInt64 = 120_000_000_000,
                maxFlows: Int? = nil, sourcePorts: ClosedRange<UInt16>? = nil) {
        box = Box(Fields(id: id, listen: listen, allow: allow, target: target,
                         idleTimeoutNanoseconds: idleTimeoutNanoseconds, maxConnections: maxConnections,
                         transport: transport, udpIdleTimeoutNanoseconds: udpIdleTimeoutNanoseconds,
                         maxFlows: maxFlows, sourcePorts: sourcePorts))
    }

    public static func == (a: RelayRule, b: RelayRule) -> Bool { a.box === b.box || a.box.fields == b.box.fields }
    public func hash(into hasher: inout Hasher) { hasher.combine(box.fields) }

    /// True when `client` may use this rule.
    @inlinable
    public func admits(_ client: IPAddress) -> Bool {
        let allow = box.fields.allow
        if allow.isEmpty { return true }
        for prefix in allow where prefix.contains(client) { return true }
        return false
    }

    /// The longest allowed prefix: more specific rules are tried first.
    var specificity: Int { allow.isEmpty ? -1 : allow.map(\.prefixLength).max() ?? -1 }

    /// Checks a rule list the way `RelayEngine.apply` will, without opening anything.
    /// - Throws: `RuleError` naming the rule.
    public static func check(_ rules: [RelayRule]) throws(RuleError) {
        try RuleError.validate(rules)
    }

    public var description: String {
        let who = allow.isEmpty ? "anyone" : allow.map(\.description).joined(separator: ",")
        let proto = transport == .tcp ? "" : " \(transport)"
        let ports = sourcePorts.map { " from source port \($0.lowerBound == $0.upperBound ? "\($0.lowerBound)" : "\($0.lowerBound)-\($0.upperBound)")" } ?? ""
        let extra = preamble.map { " with \($0.name)" } ?? ""
        let destination = inspector.map { "inspected by \($0.name)" } ?? "\(target)"
        return "\(id):\(proto) \(listen) -> \(destination)\(ports)\(extra) (from \(who))"
    }
}

/// What a rule writes upstream before relaying: made per connection from the
/// client's address and the local address it connected to. Two preambles are
/// the same when their names are (the name also shows in logs, so it must
/// hold no secret).
public struct ConnectionPreamble: Hashable, Sendable {
    public let name: String
    public let make: @Sendable (_ client: SocketAddress, _ local: SocketAddress) -> [UInt8]

    public init(name: String, make: @escaping @Sendable (_ client: SocketAddress, _ local: SocketAddress) -> [UInt8]) {
        self.name = name
        self.make = make
    }

    public static func == (a: ConnectionPreamble, b: ConnectionPreamble) -> Bool { a.name == b.name }
    public func hash(into hasher: inout Hasher) { hasher.combine(name) }
}

/// The rules that share one listening address, most specific allow-list first,
/// with the admission gate that counts the listener's connections.
///
/// Rules whose allow-list holds single hosts only (a /32 or /128 each, as
/// the Security Gateway's one rule per client) are also indexed by host, so
/// matching a client costs a hash lookup plus a scan of the other rules, not
/// a scan of thousands of host rules: a datagram from an unknown sender must
/// not cost O(rules).
public struct ListenerRules: Sendable {
    public let address: SocketAddress
    public let rules: [RelayRule]
    public let gate: AdmissionGate
    /// Positions in `rules` of the host-only rules allowing each host, ascending.
    private let hostRules: [IPAddress: [Int]]
    /// Positions in `rules` of every other rule, ascending.
    private let otherRules: [Int]
    /// Positions in `rules` by rule id.
    private let positions: [String: Int]

    /// - Parameter rules: already in matching order (most specific first).
    init(address: SocketAddress, rules: [RelayRule], gate: AdmissionGate) {
        self.address = address
        self.rules = rules
        self.gate = gate
        var hosts: [IPAddress: [Int]] = [:]
        var others: [Int] = []
        var positions: [String: Int] = [:]
        positions.reserveCapacity(rules.count)
        for (position, rule) in rules.enumerated() {
            positions[rule.id] = position
            if !rule.allow.isEmpty && rule.allow.allSatisfy(\.isSingleHost) {
                // A host prefix admits exactly the client whose unmapped address is its address.
                for host in Set(rule.allow.map(\.address)) { hosts[host, default: []].append(position) }
            } else {
                others.append(position)
            }
        }
        hostRules = hosts
        otherRules = others
        self.positions = positions
    }

    /// The rules of one address in matching order: most specific first,
    /// then in the order given.
    static func ordered(address: SocketAddress, rules group: [RelayRule], gate: AdmissionGate) -> ListenerRules {
        // Each rule's specificity is computed once, not per comparison.
        let keyed = group.enumerated().map { (specificity: $0.element.specificity, offset: $0.offset) }
        let order = keyed.sorted { a, b in a.specificity != b.specificity ? a.specificity > b.specificity : a.offset < b.offset }
        return ListenerRules(address: address, rules: order.map { group[$0.offset] }, gate: gate)
    }

    /// The first rule (in matching order) that admits `client`, or nil.
    public func match(_ client: IPAddress) -> RelayRule? {
        matchPosition(client).map { rules[$0] }
    }

    /// The position in `rules` of the rule that admits `client`, or nil.
    public func matchPosition(_ client: IPAddress) -> Int? {
        var best = hostRules.isEmpty ? Int.max : hostRules[client.unmapped]?.first ?? Int.max
        for position in otherRules {
            if position > best { break }
            if rules[position].admits(client) {
                best = position
                break
            }
        }
        return best == Int.max ? nil : best
    }

    /// True when this listener carries exactly `rule` (same id and settings).
    public func contains(_ rule: RelayRule) -> Bool {
        guard let position = positions[rule.id] else { return false }
        return rules[position] == rule
    }
}

/// Why a rule set was refused. Nothing is changed when one is thrown.
public enum RuleError: Error, Equatable, Sendable, CustomStringConvertible {
    case duplicateID(String)
    case conflictingRules(String, String, listen: SocketAddress)
    case listenFailed(rule: String, address: SocketAddress, SystemCallError)
    case invalid(rule: String, reason: String)

    public var description: String {
        switch self {
        case .duplicateID(let id):
            "rule \"\(id)\" is defined twice"
        case .conflictingRules(let a, let b, let listen):
            "rules \"\(a)\" and \"\(b)\" both listen on \(listen) for the same clients"
        case .listenFailed(let rule, let address, let error):
            if error.errno == .addressInUse {
                "rule \"\(rule)\": cannot listen on \(address): address already in use (another process holds the port)"
            } else {
                "rule \"\(rule)\": cannot listen on \(address): \(error)"
            }
        case .invalid(let rule, let reason):
            "rule \"\(rule)\": \(reason)"
        }
    }

    /// Checks a list of rules for conflicts that would make matching ambiguous.
    public static func validate(_ rules: [RelayRule]) throws(RuleError) {
        var seen: [String: RelayRule] = [:]
        var byListen: [SocketAddress: [RelayRule]] = [:]
        var sameClients: [ConflictKey: [RelayRule]] = [:]
        for rule in rules {
            if seen[rule.id] != nil { throw .duplicateID(rule.id) }
            seen[rule.id] = rule
            try checkAlone(rule)
            // Two rules conflict when they listen on one address for the same
            // clients with a transport in common: found by hashing the pair
            // (address, allow-set), so a list of n rules is checked in O(n).
            let key = ConflictKey(listen: rule.listen, allow: Set(rule.allow))
            if let other = sameClients[key, default: []].first(where: { !$0.transport.isDisjoint(with: rule.transport) }) {
                throw .conflictingRules(other.id, rule.id, listen: rule.listen)
            }
            sameClients[key, default: []].append(rule)
            byListen[rule.listen, default: []].append(rule)
        }
        // A wildcard and a specific address on the same port cannot both be bound.
        for (address, group) in byListen where !address.ip.isUnspecified {
            guard let wildcardRules = byListen[address.wildcard] else { continue }
            if let (other, rule) = wildcardConflict(wildcard: wildcardRules, specific: group) {
                throw .conflictingRules(other.id, rule.id, listen: address)
            }
        }
    }

    /// The first (wildcard rule, specific rule) pair with a transport in common.
    static func wildcardConflict(wildcard: [RelayRule], specific: [RelayRule]) -> (RelayRule, RelayRule)? {
        let wildcardTransports = wildcard.reduce(Transport()) { $0.union($1.transport) }
        for rule in specific where !wildcardTransports.isDisjoint(with: rule.transport) {
            return (wildcard.first { !$0.transport.isDisjoint(with: rule.transport) }!, rule)
        }
        return nil
    }

    /// The checks one rule passes on its own (ports, limits, transports).
    static func checkAlone(_ rule: RelayRule) throws(RuleError) {
        if rule.listen.port == 0 { throw RuleError.invalid(rule: rule.id, reason: "listen port must not be 0") }
        if rule.router != nil && rule.transport != .udp {
            throw .invalid(rule: rule.id, reason: "a datagram router applies to udp forwards only")
        }
        if rule.inspector != nil && rule.transport != .tcp {
            throw .invalid(rule: rule.id, reason: "an inspector (inspect first) applies to tcp forwards only")
        }
        if rule.target.port == 0 && rule.inspector == nil { throw .invalid(rule: rule.id, reason: "target port must not be 0") }
        if let limit = rule.maxConnections, limit < 1 {
            throw .invalid(rule: rule.id, reason: "max_connections must be at least 1")
        }
        if let limit = rule.maxFlows, limit < 1 {
            throw .invalid(rule: rule.id, reason: "max_flows must be at least 1")
        }
        if rule.transport.isEmpty { throw .invalid(rule: rule.id, reason: "protocol must be tcp, udp or both") }
        if rule.preamble != nil && rule.transport != .tcp {
            throw .invalid(rule: rule.id, reason: "a preamble (PROXY header) applies to tcp forwards only")
        }
        if let ports = rule.sourcePorts {
            guard rule.transport.contains(.udp) else {
                throw .invalid(rule: rule.id, reason: "source_ports applies to udp forwards only")
            }
            if ports.lowerBound == 0 { throw .invalid(rule: rule.id, reason: "source_ports must be 1-65535") }
        }
        if rule.transport.contains(.udp) && rule.udpIdleTimeoutNanoseconds == 0 {
            throw .invalid(rule: rule.id, reason: "udp_idle_timeout must be more than 0")
        }
    }

    struct ConflictKey: Hashable {
        let listen: SocketAddress
        let allow: Set<CIDR>
    }
}

extension SocketAddress {
    /// The wildcard address of this one's family, on its port.
    var wildcard: SocketAddress { SocketAddress(ip: ip.isIPv4 ? .v4(0) : .v6(0, 0), port: port) }
}

extension CIDR {
    /// True when the prefix holds one address (a /32, or a /128): it admits
    /// exactly the client whose unmapped address equals `address`.
    var isSingleHost: Bool { prefixLength >= (address.isIPv4 ? 32 : 128) }
}
