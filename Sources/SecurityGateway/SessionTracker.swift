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
/// address): the relay carries one UDP rule (`udpRule`), admitting any
/// sender and routed by this tracker, which gives each new UDP flow (client
/// address and port) the most recently started path of its address that
/// has no flow yet, or else the most recent path, and no route to an
/// address without a path. A flow keeps its path until it closes.
///
/// Touched once when a session starts and once when it ends (from the relay
/// loops), and when a UDP flow opens or closes: O(1) each, and no relay
/// rule changes (issue 15: a reconnect storm of thousands of sessions costs
/// the relay nothing but the flows it closes).
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
        var flows = PortSet()
    }

    /// A set of ports that almost always holds none or one (a path's flows,
    /// the source ports toward one agent): that one is kept inline, so a
    /// session allocates no hash table for it (issue 15: 5,000 sessions each
    /// held two, about 200 bytes).
    struct PortSet: Sendable {
        private var first: UInt16?
        private var others: Set<UInt16> = []

        var isEmpty: Bool { first == nil }

        func contains(_ port: UInt16) -> Bool { first == port || (!others.isEmpty && others.contains(port)) }

        mutating func insert(_ port: UInt16) {
            if first == nil { first = port } else if first != port { others.insert(port) }
        }

        mutating func remove(_ port: UInt16) {
            if first == port { first = others.popFirst() } else if !others.isEmpty { others.remove(port) }
        }
    }

    private struct State {
        /// Each client address's paths, oldest first.
        var paths: [IPAddress: [Path]] = [:]
        var pathCount = 0
        /// The source ports in use toward each agent (so a new path finds
        /// its port without scanning every path).
        var portsByAgent: [SocketAddress: PortSet] = [:]
        var sequence: UInt64 = 0
        var active = 0
        /// Connections admitted by a prepared grant since start (for `/metrics`).
        var started = 0
        var activeBySession: [String: Int] = [:]
        /// nil when EnableCollaboration is off; a reload may change it.
        var collaborationPorts: ClosedRange<UInt16>?
    }

    public let agentSourcePort: UInt16
    /// The ports a second session to a busy agent may take (nil: collaboration is off).
    public var collaborationPorts: ClosedRange<UInt16>? { state.withLock { $0.collaborationPorts } }

    /// Turns collaboration on (with its ports) or off for new paths; live paths keep theirs.
    public func setCollaborationPorts(_ ports: ClosedRange<UInt16>?) {
        state.withLock { $0.collaborationPorts = ports }
    }
    private let state = Mutex(State())
    /// Called (on the thread that ended a session) when a path with flows
    /// ended: the flows toward `agent` from that address must be closed.
    private let onPathEnded: @Sendable (_ client: IPAddress, _ agent: SocketAddress) -> Void

    /// Where the UDP rule listens (the gateway's ListenAddress).
    public let listen: SocketAddress

    /// The name of the router on the UDP rule of this tracker.
    static let routerName = "sg-sessions"

    /// - Parameter collaborationPorts: nil when EnableCollaboration is off.
    /// - Parameter listen: the address the UDP rule listens on.
    public init(agentSourcePort: UInt16, collaborationPorts: ClosedRange<UInt16>?,
                listen: SocketAddress = SocketAddress(ip: .v4(0), port: 4172),
                onPathEnded: @escaping @Sendable (IPAddress, SocketAddress) -> Void = { _, _ in }) {
        self.agentSourcePort = agentSourcePort
        state.withLock { $0.collaborationPorts = collaborationPorts }
        self.listen = listen
        self.onPathEnded = onPathEnded
    }

    /// The relay's one UDP rule for every session, on `listen`: it admits
    /// any sender and takes each new flow's agent and source port from this
    /// tracker (no route, so dropped and counted, for an address without a
    /// session). Its `target` is never used (a route always names one).
    public func udpRule(id: String) -> RelayRule {
        let unused = SocketAddress(ip: listen.ip.isIPv4 ? .v4(0x7f00_0001) : .v6(0, 1), port: 9)
        var rule = RelayRule(id: id, listen: listen, target: unused, transport: .udp)
        rule.router = RuleRouter(name: Self.routerName, router: self)
        return rule
    }

    /// Starts a session of `client` to `agent`.
    /// - Returns: the ticket to end it with, or why it cannot start
    ///   (`agentBusy`: the agent has paths from other addresses and no
    ///   collaboration port is free, or collaboration is off).
    public func start(client: IPAddress, agent: SocketAddress, sessionID: String) -> Result<Ticket, SessionRefusal> {
        state.withLock { s -> Result<Ticket, SessionRefusal> in
            if let index = s.paths[client]?.firstIndex(where: { $0.binding.agent == agent }) {
                // Same address and agent (a reconnect, a second channel): the path is shared.
                s.paths[client]![index].binding.sessions += 1
                s.active += 1
                s.started += 1
                s.activeBySession[sessionID, default: 0] += 1
                return .success(Ticket(client: client, agent: agent, sessionID: sessionID))
            }
            let taken = s.portsByAgent[agent] ?? PortSet()
            let port: UInt16
            if !taken.contains(agentSourcePort) {
                port = agentSourcePort
            } else if let range = s.collaborationPorts, let free = range.first(where: { !taken.contains($0) }) {
                port = free
            } else {
                return .failure(.agentBusy)
            }
            s.sequence += 1
            s.paths[client, default: []].append(Path(binding: Binding(client: client, agent: agent, sourcePort: port, sessions: 1),
                                                     sequence: s.sequence))
            s.pathCount += 1
            s.portsByAgent[agent, default: PortSet()].insert(port)
            s.active += 1
            s.started += 1
            s.activeBySession[sessionID, default: 0] += 1
            return .success(Ticket(client: client, agent: agent, sessionID: sessionID))
        }
    }

    /// Ends a session; a path closes with its last session, and its flows
    /// with it (`onPathEnded`).
    public func end(_ ticket: Ticket) {
        let pathEnded = state.withLock { s -> Bool in
            s.active -= 1
            if let n = s.activeBySession[ticket.sessionID] {
                s.activeBySession[ticket.sessionID] = n > 1 ? n - 1 : nil
            }
            guard var list = s.paths[ticket.client],
                  let index = list.firstIndex(where: { $0.binding.agent == ticket.agent }) else { return false }
            list[index].binding.sessions -= 1
            if list[index].binding.sessions > 0 {
                s.paths[ticket.client] = list
                return false
            }
            let ended = list.remove(at: index)
            s.pathCount -= 1
            s.portsByAgent[ended.binding.agent]?.remove(ended.binding.sourcePort)
            if s.portsByAgent[ended.binding.agent]?.isEmpty == true { s.portsByAgent[ended.binding.agent] = nil }
            s.paths[ticket.client] = list.isEmpty ? nil : list
            return !ended.flows.isEmpty
        }
        if pathEnded { onPathEnded(ticket.client, ticket.agent) }
    }

    // MARK: Routing (DatagramRouter)

    /// The path of a new UDP flow from `client`: the newest path of its
    /// address without a flow, else the newest; nil when it has none.
    public func route(client: SocketAddress, rule: String) -> DatagramRoute? {
        let ip = client.ip.unmapped
        return state.withLock { s -> DatagramRoute? in
            guard let chosen = Self.choosePath(s.paths[ip] ?? []) else { return nil }
            // In place: the address's list is not copied for the change.
            s.paths[ip]![chosen].flows.insert(client.port)
            let binding = s.paths[ip]![chosen].binding
            return DatagramRoute(target: binding.agent, sourcePort: binding.sourcePort)
        }
    }

    /// The newest path without a flow, else the newest; nil for none.
    private static func choosePath(_ list: [Path]) -> Int? {
        guard !list.isEmpty else { return nil }
        guard list.count > 1 else { return 0 }
        var newestFree: Int?
        for (index, path) in list.enumerated() where path.flows.isEmpty {
            if newestFree.map({ list[$0].sequence < path.sequence }) ?? true { newestFree = index }
        }
        return newestFree ?? list.indices.max { list[$0].sequence < list[$1].sequence }!
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
}
