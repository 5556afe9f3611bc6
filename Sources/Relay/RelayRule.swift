import SystemLayer

/// One port-forward: connections accepted on `listen` from a client inside
/// `allow` are relayed to `target`.
public struct RelayRule: Hashable, Sendable, CustomStringConvertible {
    /// A name unique within a rule set (the config section name, or the broker's rule id).
    public var id: String
    public var listen: SocketAddress
    /// Allowed clients; empty means anyone.
    public var allow: [CIDR]
    public var target: SocketAddress
    /// Close a connection after this many nanoseconds with no byte either
    /// way. Nil (the default) means never: remote-desktop sessions are quiet
    /// for hours and liveness comes from TCP keepalive instead.
    public var idleTimeoutNanoseconds: UInt64?
    /// The connection limit of this rule's listener (nil: the engine's default).
    public var maxConnections: Int?

    public init(id: String, listen: SocketAddress, allow: [CIDR] = [], target: SocketAddress,
                idleTimeoutNanoseconds: UInt64? = nil, maxConnections: Int? = nil) {
        self.id = id
        self.listen = listen
        self.allow = allow
        self.target = target
        self.idleTimeoutNanoseconds = idleTimeoutNanoseconds
        self.maxConnections = maxConnections
    }

    /// True when `client` may use this rule.
    @inlinable
    public func admits(_ client: IPAddress) -> Bool {
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
        return "\(id): \(listen) -> \(target) (from \(who))"
    }
}

/// The rules that share one listening address, most specific allow-list first,
/// with the admission gate that counts the listener's connections.
public struct ListenerRules: Sendable {
    public let address: SocketAddress
    public let rules: [RelayRule]
    public let gate: AdmissionGate

    /// The first rule that admits `client`, or nil.
    @inlinable
    public func match(_ client: IPAddress) -> RelayRule? {
        for rule in rules where rule.admits(client) { return rule }
        return nil
    }
}

/// An immutable snapshot of every rule, published to the loops as a whole.
public struct RuleSet: Sendable {
    public let rules: [RelayRule]
    public let listeners: [SocketAddress: ListenerRules]

    init(rules: [RelayRule], gates: [SocketAddress: AdmissionGate]) {
        self.rules = rules
        var grouped: [SocketAddress: [RelayRule]] = [:]
        for rule in rules { grouped[rule.listen, default: []].append(rule) }
        var listeners: [SocketAddress: ListenerRules] = [:]
        for (address, group) in grouped {
            let sorted = group.enumerated().sorted { a, b in
                a.element.specificity != b.element.specificity ? a.element.specificity > b.element.specificity : a.offset < b.offset
            }.map(\.element)
            listeners[address] = ListenerRules(address: address, rules: sorted, gate: gates[address]!)
        }
        self.listeners = listeners
    }

    static let empty = RuleSet(rules: [], gates: [:])
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
        for rule in rules {
            if seen[rule.id] != nil { throw .duplicateID(rule.id) }
            seen[rule.id] = rule
            if rule.listen.port == 0 { throw .invalid(rule: rule.id, reason: "listen port must not be 0") }
            if rule.target.port == 0 { throw .invalid(rule: rule.id, reason: "target port must not be 0") }
            if let limit = rule.maxConnections, limit < 1 {
                throw .invalid(rule: rule.id, reason: "max_connections must be at least 1")
            }
            for other in byListen[rule.listen, default: []] where Set(other.allow) == Set(rule.allow) {
                throw .conflictingRules(other.id, rule.id, listen: rule.listen)
            }
            byListen[rule.listen, default: []].append(rule)
        }
        // A wildcard and a specific address on the same port cannot both be bound.
        for (address, group) in byListen where !address.ip.isUnspecified {
            let wildcard = SocketAddress(ip: address.ip.isIPv4 ? .v4(0) : .v6(0, 0), port: address.port)
            if let other = byListen[wildcard]?.first {
                throw .conflictingRules(other.id, group[0].id, listen: address)
            }
        }
    }
}
