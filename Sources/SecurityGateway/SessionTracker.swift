import Relay
import Synchronization
import SystemLayer

/// The live TCP sessions of a Security Gateway and the UDP paths they open.
/// Each session of a client address to an agent opens (or shares) a path:
/// that agent, from one fixed source port (`AgentSourcePort` for the
/// agent's first path, the next free port of `CollaborationSourcePorts` for
/// each further one when collaboration is on).
///
/// One address may hold paths to several agents (users behind one NAT
/// address): the relay carries one UDP rule per client address, routed by
/// this tracker, which gives each new UDP flow (client address and port) the
/// most recently started path that has no flow yet, or else the most recent
/// path. A flow keeps its path until it closes.
///
/// Touched once when a session starts and once when it ends (from the relay
/// loops), and when a UDP flow opens or closes; `udpRules` is what the relay
/// must carry for the live sessions.
public final class SessionTracker: DatagramRouter, Sendable {
    /// One started session, handed back to `end`.
    public final class Ticket: Sendable {
        public let client: IPAddress
        public let agent: SocketAddress
        public let sessionID: String

        init(client: IPAddress, agent: SocketAddress, sessionID: String) {
            self.client = client
            self.agent = agent
            self.sessionID = sessionID
        }
    }

    /// A UDP path: a client address, its agent, the source port toward it,
    /// and how many TCP sessions keep it alive.
    public struct Binding: Sendable, Equatable {
        public let client: IPAddress
        public let agent: SocketAddress
        public let sourcePort: UInt16
        public var sessions: Int
    }

    private struct Path {
        var binding: Binding
        /// Start order, for choosing the newest path.
        let sequence: UInt64
        /// Client UDP ports whose flows use this path.
        var flows: Set<UInt16> = []
    }

    private struct State {
        /// Each client address's paths, oldest first.
        var paths: [IPAddress: [Path]] = [:]
        var pathCount = 0
        /// The source ports in use toward each agent (so a new path finds
        /// its port without scanning every path).
        var portsByAgent: [SocketAddress: Set<UInt16>] = [:]
        /// Each client address's relay rule, made once when its first path starts.
        var rules: [IPAddress: RelayRule] = [:]
        var sequence: UInt64 = 0
        var active = 0
        /// Connections admitted by a prepared grant since start (for `/metrics`).
        var started = 0
        var activeBySession: [String: Int] = [:]
        /// nil when EnableCollaboration is off; a reload may change it.
        var collaborationPorts: ClosedRange<UInt16>?
        /// Client addresses whose rule came or went since `takeRuleChanges`.
        var dirty: Set<IPAddress> = []
    }

    public let agentSourcePort: UInt16
    /// The ports a second session to a busy agent may take (nil: collaboration is off).
    public var collaborationPorts: ClosedRange<UInt16>? { state.withLock { $0.collaborationPorts } }

    /// Turns collaboration on (with its ports) or off for new paths; live paths keep theirs.
    public func setCollaborationPorts(_ ports: ClosedRange<UInt16>?) {
        state.withLock { $0.collaborationPorts = ports }
    }
    private let state = Mutex(State())
    /// Called (on the thread that started or ended a session) when the UDP rules changed.
    private let onChange: @Sendable () -> Void
    /// Called when a path ended while its client address keeps others: the
    /// flows toward `agent` from that address must be closed (the rule stays).
    private let onPathEnded: @Sendable (_ client: IPAddress, _ agent: SocketAddress) -> Void

    /// Where the UDP rules listen (the gateway's ListenAddress).
    public let listen: SocketAddress

    /// The name of the router on every UDP rule of this tracker.
    static let routerName = "sg-sessions"

    /// - Parameter collaborationPorts: nil when EnableCollaboration is off.
    /// - Parameter listen: the address the UDP rules listen on.
    public init(agentSourcePort: UInt16, collaborationPorts: ClosedRange<UInt16>?,
                listen: SocketAddress = SocketAddress(ip: .v4(0), port: 4172), onChange: @escaping @Sendable () -> Void = {},
                onPathEnded: @escaping @Sendable (IPAddress, SocketAddress) -> Void = { _, _ in }) {
        self.agentSourcePort = agentSourcePort
        state.withLock { $0.collaborationPorts = collaborationPorts }
        self.listen = listen
        self.onChange = onChange
        self.onPathEnded = onPathEnded
    }

    /// Starts a session of `client` to `agent`.
    /// - Returns: the ticket to end it with, or why it cannot start
    ///   (`agentBusy`: the agent has paths from other addresses and no
    ///   collaboration port is free, or collaboration is off).
    public func start(client: IPAddress, agent: SocketAddress, sessionID: String) -> Result<Ticket, SessionRefusal> {
        let (result, changed) = state.withLock { s -> (Result<Ticket, SessionRefusal>, Bool) in
            if let index = s.paths[client]?.firstIndex(where: { $0.binding.agent == agent }) {
                // Same address and agent (a reconnect, a second channel): the path is shared.
                s.paths[client]![index].binding.sessions += 1
                s.active += 1
                s.started += 1
                s.activeBySession[sessionID, default: 0] += 1
                return (.success(Ticket(client: client, agent: agent, sessionID: sessionID)), false)
            }
            let taken = s.portsByAgent[agent] ?? []
            let port: UInt16
            if !taken.contains(agentSourcePort) {
                port = agentSourcePort
            } else if let range = s.collaborationPorts, let free = range.first(where: { !taken.contains($0) }) {
                port = free
            } else {
                return (.failure(.agentBusy), false)
            }
            s.sequence += 1
            let first = s.paths[client] == nil
            s.paths[client, default: []].append(Path(binding: Binding(client: client, agent: agent, sourcePort: port, sessions: 1),
                                                     sequence: s.sequence))
            s.pathCount += 1
            s.portsByAgent[agent, default: []].insert(port)
            if first {
                s.rules[client] = rule(client: client, agent: agent, port: port)
                s.dirty.insert(client)
            }
            s.active += 1
            s.started += 1
            s.activeBySession[sessionID, default: 0] += 1
            return (.success(Ticket(client: client, agent: agent, sessionID: sessionID)), first)
        }
        if changed { onChange() }
        return result
    }

    /// Ends a session; a path closes with its last session (and the
    /// address's UDP rule with its last path).
    public func end(_ ticket: Ticket) {
        let (ruleChanged, pathEnded) = state.withLock { s -> (Bool, Bool) in
            s.active -= 1
            if let n = s.activeBySession[ticket.sessionID] {
                s.activeBySession[ticket.sessionID] = n > 1 ? n - 1 : nil
            }
            guard var list = s.paths[ticket.client],
                  let index = list.firstIndex(where: { $0.binding.agent == ticket.agent }) else { return (false, false) }
            list[index].binding.sessions -= 1
            if list[index].binding.sessions > 0 {
                s.paths[ticket.client] = list
                return (false, false)
            }
            let ended = list.remove(at: index)
            s.pathCount -= 1
            s.portsByAgent[ended.binding.agent]?.remove(ended.binding.sourcePort)
            if s.portsByAgent[ended.binding.agent]?.isEmpty == true { s.portsByAgent[ended.binding.agent] = nil }
            if list.isEmpty {
                // The rule goes, and its flows with it.
                s.paths[ticket.client] = nil
                s.rules[ticket.client] = nil
                s.dirty.insert(ticket.client)
                return (true, false)
            }
            s.paths[ticket.client] = list
            return (false, !ended.flows.isEmpty)
        }
        if ruleChanged { onChange() }
        if pathEnded { onPathEnded(ticket.client, ticket.agent) }
    }

    // MARK: Routing (DatagramRouter)

    /// The path of a new UDP flow from `client`: the newest path of its
    /// address without a flow, else the newest; nil when it has none.
    public func route(client: SocketAddress, rule: String) -> DatagramRoute? {
        let ip = client.ip.unmapped
        return state.withLock { s -> DatagramRoute? in
            guard var list = s.paths[ip], !list.isEmpty else { return nil }
            var chosen = list.count - 1
            if list.count > 1 {
                var newestFree: Int?
                for (index, path) in list.enumerated() where path.flows.isEmpty {
                    if newestFree.map({ list[$0].sequence < path.sequence }) ?? true { newestFree = index }
                }
                chosen = newestFree ?? list.indices.max { list[$0].sequence < list[$1].sequence }!
            }
            list[chosen].flows.insert(client.port)
            s.paths[ip] = list
            return DatagramRoute(target: list[chosen].binding.agent, sourcePort: list[chosen].binding.sourcePort)
        }
    }

    public func flowEnded(client: SocketAddress, route: DatagramRoute) {
        let ip = client.ip.unmapped
        state.withLock { s in
            guard let index = s.paths[ip]?.firstIndex(where: { $0.binding.agent == route.target }) else { return }
            s.paths[ip]![index].flows.remove(client.port)
        }
    }

    // MARK: Figures

    /// Live sessions.
    public var active: Int { state.withLock { $0.active } }
    /// Connections admitted by a prepared grant since start.
    public var started: Int { state.withLock { $0.started } }

    /// Live connections of a session id.
    public func active(sessionID: String) -> Int { state.withLock { $0.activeBySession[sessionID] ?? 0 } }

    /// The UDP paths of the live sessions, by client.
    public var bindings: [Binding] {
        state.withLock { $0.paths.values.flatMap { $0.map(\.binding) } }
            .sorted { ($0.client.description, $0.agent.description) < ($1.client.description, $1.agent.description) }
    }

    /// How many UDP paths are open.
    public var bindingCount: Int { state.withLock { $0.pathCount } }

    /// The relay's UDP rules for the live sessions, on `listen`: one per
    /// client address (allow that address only), routed by this tracker
    /// among the address's paths. In no particular order (they admit
    /// distinct clients). O(addresses), each rule made once.
    public func udpRules() -> [RelayRule] {
        state.withLock { Array($0.rules.values) }
    }

    /// The UDP rules to add and the rule ids to remove since the last call
    /// (a client whose rule came and went in between is one removal of an
    /// id the relay may not hold, which it ignores): how the relay follows
    /// the sessions one rule at a time.
    /// - Returns: also the client addresses taken, for `markUnapplied`.
    public func takeRuleChanges() -> (upserting: [RelayRule], removing: [String], clients: [IPAddress]) {
        state.withLock { s in
            var upserting: [RelayRule] = []
            var removing: [String] = []
            for client in s.dirty {
                if let rule = s.rules[client] { upserting.append(rule) } else { removing.append(Self.ruleID(client)) }
            }
            let clients = Array(s.dirty)
            s.dirty.removeAll(keepingCapacity: true)
            return (upserting, removing, clients)
        }
    }

    /// Marks clients whose rule changes did not reach the relay, for the next call.
    public func markUnapplied(_ clients: [IPAddress]) {
        state.withLock { s in for client in clients { s.dirty.insert(client) } }
    }

    static func ruleID(_ client: IPAddress) -> String { "sg-udp-\(client)" }

    private func rule(client: IPAddress, agent: SocketAddress, port: UInt16) -> RelayRule {
        var rule = RelayRule(id: Self.ruleID(client), listen: listen,
                             allow: [CIDR(address: client, prefixLength: client.isIPv4 ? 32 : 128)],
                             target: agent, transport: .udp, sourcePorts: port...port)
        rule.router = RuleRouter(name: Self.routerName, router: self)
        return rule
    }
}
