import Relay
import SessionGrants
import SystemLayer
import TLSInspect

/// Why the Security Gateway turned a client away on TCP 4172. The raw
/// values are the counter labels (`GET /v1/status`, logs).
public enum SessionRefusal: String, CaseIterable, Sendable, Error {
    /// The first bytes are not a TLS handshake record carrying a ClientHello.
    case notTLS = "not_tls"
    /// The ClientHello is malformed.
    case malformed = "malformed"
    /// The client closed before its ClientHello was complete.
    case truncated = "truncated"
    /// No complete ClientHello within ClientHelloTimeout.
    case timeout = "timeout"
    /// The ClientHello is larger than ClientHelloMaxBytes.
    case tooLarge = "too_large"
    /// The ClientHello carries no server_name.
    case noSNI = "no_sni"
    /// The server_name is not a valid host name (or is oversized).
    case badSNI = "bad_sni"
    /// No prepared grant for this SNI and client.
    case noGrant = "no_grant"
    /// The grant's agent is not a numeric `HOST:PORT`.
    case badAgent = "bad_agent"
    /// The agent already has a session and collaboration is off, or every
    /// collaboration source port toward it is taken.
    case agentBusy = "agent_busy"
    /// MaxConnections reached (counted by the relay at accept).
    case limit = "limit"
}

/// The pure decision of one TCP 4172 connection: ClientHello → SNI →
/// prepared grant → the agent. No socket here: the relay feeds bytes in and
/// carries the decision out, so this is tested with plain byte arrays.
public final class SNIInspection: Inspection {
    /// Nil once decided: this object lives as long as the session (to end
    /// it), so it keeps only the decision and the ticket.
    private var reader: ClientHelloReader?
    private var fed = 0
    /// The decision once made; later bytes do not change it.
    private var settled: InspectionDecision?
    private let client: SocketAddress
    private let grants: PreparedGrants
    private let sessions: SessionTracker
    /// The session this connection started (after `.connect`).
    public private(set) var ticket: SessionTracker.Ticket?
    /// The session id of the grant that admitted the connection (nil before, and once ended).
    public var sessionID: String? { ticket?.sessionID }

    public init(client: SocketAddress, maxBytes: Int, grants: PreparedGrants, sessions: SessionTracker) {
        self.client = client
        self.grants = grants
        self.sessions = sessions
        reader = ClientHelloReader(maxBytes: maxBytes)
    }

    public func feed(_ all: [UInt8]) -> InspectionDecision {
        // Taken out while fed, so that its buffer is not copied on write.
        guard settled == nil, var reader = reader.take() else { return settled ?? .needMore }
        let outcome = reader.feed(all[fed...])
        fed = all.count
        let decision: InspectionDecision
        switch outcome {
        case .needMore:
            self.reader = reader
            return .needMore
        case .rejected(let error):
            decision = .refuse(Self.reason(error).rawValue)
        case .complete(let hello):
            decision = decide(hello)
        }
        // Decided: the relay replays its own copy of the bytes, and this
        // object lives as long as the session (to end it), so the reader's
        // buffer (2 KiB reserved) goes now, not at the session's end.
        settled = decision
        return decision
    }

    private func decide(_ hello: ClientHello) -> InspectionDecision {
        guard let name = hello.serverName, !name.isEmpty else { return .refuse(SessionRefusal.noSNI.rawValue) }
        let ip = client.ip.unmapped
        guard let entry = grants.lookup(serverName: name, client: "\(ip)") else {
            return .refuse(SessionRefusal.noGrant.rawValue)
        }
        guard let agent = entry.agentAddress else { return .refuse(SessionRefusal.badAgent.rawValue) }
        switch sessions.start(client: ip, agent: agent, sessionID: entry.grant.sessionID) {
        case .success(let ticket):
            self.ticket = ticket
            return .connect(agent)
        case .failure(let refusal):
            return .refuse(refusal.rawValue)
        }
    }

    public func endOfStream() -> InspectionDecision { .refuse(SessionRefusal.truncated.rawValue) }

    public func timedOut() -> InspectionDecision { .refuse(SessionRefusal.timeout.rawValue) }

    public func sessionEnded() {
        if let ticket { sessions.end(ticket) }
        ticket = nil
    }

    static func reason(_ error: ClientHelloError) -> SessionRefusal {
        switch error {
        case .notTLS, .badRecord, .notClientHello: .notTLS
        case .malformed: .malformed
        case .badServerName: .badSNI
        case .tooLarge: .tooLarge
        }
    }
}

/// The inspector of the Security Gateway's TCP rule.
public struct SNIInspector: ConnectionInspector {
    public let maxBytes: Int
    public let timeoutNanoseconds: UInt64
    public let grants: PreparedGrants
    public let sessions: SessionTracker

    public init(maxBytes: Int, timeoutNanoseconds: UInt64, grants: PreparedGrants, sessions: SessionTracker) {
        self.maxBytes = maxBytes
        self.timeoutNanoseconds = timeoutNanoseconds
        self.grants = grants
        self.sessions = sessions
    }

    public func makeInspection(client: SocketAddress) -> any Inspection {
        SNIInspection(client: client, maxBytes: maxBytes, grants: grants, sessions: sessions)
    }
}
