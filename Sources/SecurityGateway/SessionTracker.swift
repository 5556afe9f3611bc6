import Relay
import Synchronization
import SystemLayer

/// The live TCP sessions of a Security Gateway and the UDP path each opens:
/// while a client IP has a session to an agent, its datagrams go to that
/// agent (same port number as the TCP) from one fixed source port:
/// `AgentSourcePort` for the agent's first session, the next free port of
/// `CollaborationSourcePorts` for each further one when collaboration is on.
///
/// Touched once when a session starts and once when it ends (from the relay
/// loops); `udpRules` is what the relay must carry for the live sessions.
public final class SessionTracker: Sendable {
    /// One started session, handed back to `end`.
    public final class Ticket: Sendable {
        public let client: IPAddress
        public let agent: SocketAddress
        public let sessionID: String
        /// True when this session holds (a share of) its client's UDP binding.
        let holdsUDP: Bool

        init(client: IPAddress, agent: SocketAddress, sessionID: String, holdsUDP: Bool) {
            self.client = client
            self.agent = agent
            self.sessionID = sessionID
            self.holdsUDP = holdsUDP
        }
    }

    /// A client's UDP path: its agent, the source port toward it, and how
    /// many of its TCP sessions to that agent keep it alive.
    public struct Binding: Sendable, Equatable {
        public let client: IPAddress
        public let agent: SocketAddress
        public let sourcePort: UInt16
        public var sessions: Int
    }

    private struct State {
        var bindings: [IPAddress: Binding] = [:]
        /// The source ports in use toward each agent (so a new binding finds
        /// its port without scanning every binding).
        var portsByAgent: [SocketAddress: Set<UInt16>] = [:]
        /// Each binding's relay rule, made once when the binding starts.
        var rules: [IPAddress: RelayRule] = [:]
        var active = 0
        var activeBySession: [String: Int] = [:]
        /// Live sessions admitted without a UDP path of their own: their
        /// client address already has one toward another agent (users
        /// behind one NAT address). Their datagrams follow that path.
        var withoutUDP = 0
    }

    public let agentSourcePort: UInt16
    public let collaborationPorts: ClosedRange<UInt16>?
    private let state = Mutex(State())
    /// Called (on the thread that started or ended a session) when the UDP bindings changed.
    private let onChange: @Sendable () -> Void

    /// Where the UDP rules listen (the gateway's ListenAddress).
    public let listen: SocketAddress

    /// - Parameter collaborationPorts: nil when EnableCollaboration is off.
    /// - Parameter listen: the address the bindings' UDP rules listen on.
    public init(agentSourcePort: UInt16, collaborationPorts: ClosedRange<UInt16>?,
                listen: SocketAddress = SocketAddress(ip: .v4(0), port: 4172), onChange: @escaping @Sendable () -> Void = {}) {
        self.agentSourcePort = agentSourcePort
        self.collaborationPorts = collaborationPorts
        self.listen = listen
        self.onChange = onChange
    }

    /// Starts a session of `client` to `agent`.
    /// - Returns: the ticket to end it with, or why it cannot start
    ///   (`agentBusy`: the agent has another client's session and no
    ///   collaboration port is free, or collaboration is off).
    public func start(client: IPAddress, agent: SocketAddress, sessionID: String) -> Result<Ticket, SessionRefusal> {
        let (result, changed) = state.withLock { s -> (Result<Ticket, SessionRefusal>, Bool) in
            if var binding = s.bindings[client] {
                // Same client again (a reconnect, a second channel): it shares
                // its UDP path when the agent is the same; a session to
                // another agent gets TCP only (one UDP path per client IP).
                let same = binding.agent == agent
                if same {
                    binding.sessions += 1
                    s.bindings[client] = binding
                } else {
                    s.withoutUDP += 1
                }
                s.active += 1
                s.activeBySession[sessionID, default: 0] += 1
                return (.success(Ticket(client: client, agent: agent, sessionID: sessionID, holdsUDP: same)), false)
            }
            let taken = s.portsByAgent[agent] ?? []
            let port: UInt16
            if !taken.contains(agentSourcePort) {
                port = agentSourcePort
            } else if let range = collaborationPorts, let free = range.first(where: { !taken.contains($0) }) {
                port = free
            } else {
                return (.failure(.agentBusy), false)
            }
            s.bindings[client] = Binding(client: client, agent: agent, sourcePort: port, sessions: 1)
            s.portsByAgent[agent, default: []].insert(port)
            s.rules[client] = Self.rule(client: client, agent: agent, port: port, listen: listen)
            s.active += 1
            s.activeBySession[sessionID, default: 0] += 1
            return (.success(Ticket(client: client, agent: agent, sessionID: sessionID, holdsUDP: true)), true)
        }
        if changed { onChange() }
        return result
    }

    /// Ends a session; the client's UDP path closes with its last session to that agent.
    public func end(_ ticket: Ticket) {
        let changed = state.withLock { s -> Bool in
            s.active -= 1
            if let n = s.activeBySession[ticket.sessionID] {
                s.activeBySession[ticket.sessionID] = n > 1 ? n - 1 : nil
            }
            if !ticket.holdsUDP { s.withoutUDP -= 1 }
            guard ticket.holdsUDP, var binding = s.bindings[ticket.client], binding.agent == ticket.agent else { return false }
            binding.sessions -= 1
            if binding.sessions > 0 {
                s.bindings[ticket.client] = binding
                return false
            }
            s.bindings[ticket.client] = nil
            s.rules[ticket.client] = nil
            s.portsByAgent[binding.agent]?.remove(binding.sourcePort)
            if s.portsByAgent[binding.agent]?.isEmpty == true { s.portsByAgent[binding.agent] = nil }
            return true
        }
        if changed { onChange() }
    }

    /// Live sessions.
    public var active: Int { state.withLock { $0.active } }

    /// Live connections of a session id.
    public func active(sessionID: String) -> Int { state.withLock { $0.activeBySession[sessionID] ?? 0 } }

    /// The UDP paths of the live sessions, by client.
    public var bindings: [Binding] {
        state.withLock { Array($0.bindings.values) }.sorted { $0.client.description < $1.client.description }
    }

    /// How many clients have a UDP binding.
    public var bindingCount: Int { state.withLock { $0.bindings.count } }

    /// Live sessions without a UDP path of their own (see `State.withoutUDP`).
    public var sessionsWithoutUDP: Int { state.withLock { $0.withoutUDP } }

    /// The relay's UDP rules for the live sessions, on `listen`: one per
    /// client IP (allow that address only), toward its agent, from its port.
    /// In no particular order (they admit distinct clients). O(bindings),
    /// with each rule made once when its binding started.
    public func udpRules() -> [RelayRule] {
        state.withLock { Array($0.rules.values) }
    }

    static func rule(client: IPAddress, agent: SocketAddress, port: UInt16, listen: SocketAddress) -> RelayRule {
        RelayRule(id: "sg-udp-\(client)", listen: listen,
                  allow: [CIDR(address: client, prefixLength: client.isIPv4 ? 32 : 128)],
                  target: agent, transport: .udp, sourcePorts: port...port)
    }
}
