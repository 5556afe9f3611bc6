import Foundation
import Logging
import NIOSSL
import ServiceSupport
import PCoIPBrokerProtocol
import SessionGrants
import Synchronization
import SystemLayer

/// The PCoIP Connection Manager: relays a client's broker-protocol messages
/// to the broker (one broker session per client session), and on a
/// successful allocation puts the session behind a Security Gateway: it
/// chooses a healthy gateway (fewest sessions first), signs a grant for the
/// agent, prepares it on that gateway and on its healthy siblings (so the
/// client can fail over with the same grant), and rewrites the answer's
/// target to the gateway, keeping `sni`, `session-id` and `connect-tag`.
///
/// Limits answer at once: beyond `MaxClientCommunications` requests in
/// progress, or `MaxSessionEstablishments` allocations in progress, the
/// client gets the protocol's failure answer, never a wait.
public final class ConnectionManager: Sendable {
    /// Everything a reload may change.
    struct Settings: Sendable {
        var config: ConnectionManagerConfig
        var broker: BrokerClient
        var signer: GrantSigner
        var communications: ConcurrencyLimit
        var establishments: ConcurrencyLimit
    }

    private let settings: Mutex<Settings>
    public let sessions: ClientSessions
    public let pool: GatewayPool
    let gateways: SecurityGatewayClient
    let logger: Logger
    let clock: @Sendable () -> Date
    private let counters = Counters()
    private let brokerProblem = Mutex<String?>("not checked yet")

    /// - Parameters:
    ///   - config: with paths resolved.
    ///   - signer: the grant signer loaded from `JwtSigningKey`.
    ///   - broker: the client for `BrokerUrl`.
    ///   - gatewayTLS: how the Security Gateways' control endpoints are reached (nil: plain HTTP).
    public init(config: ConnectionManagerConfig, signer: GrantSigner, broker: BrokerClient, gatewayTLS: TLSConfiguration?, logger: Logger,
                clock: @escaping @Sendable () -> Date = { Date() }) {
        settings = Mutex(Settings(config: config, broker: broker, signer: signer,
                                  communications: ConcurrencyLimit(limit: config.maxClientCommunications),
                                  establishments: ConcurrencyLimit(limit: config.maxSessionEstablishments)))
        sessions = ClientSessions(idleSeconds: Double(config.sessionIdleSeconds),
                                  makeToken: { ControlTokens.make() })
        pool = GatewayPool(config.securityGateways)
        gateways = SecurityGatewayClient(tls: gatewayTLS)
        self.logger = logger
        self.clock = clock
    }

    public var config: ConnectionManagerConfig { settings.withLock { $0.config } }

    /// Applies a reloaded config: limits, gateways, broker, grant key. Client
    /// sessions and sessions already behind a gateway are untouched.
    /// - Returns: the previous broker client (the caller shuts it down after in-flight calls end).
    public func reload(config: ConnectionManagerConfig, signer: GrantSigner, broker: BrokerClient) -> BrokerClient {
        pool.replace(with: config.securityGateways)
        return settings.withLock { s in
            let old = s.broker
            s.config = config
            s.broker = broker
            s.signer = signer
            if s.communications.limit != config.maxClientCommunications {
                s.communications = ConcurrencyLimit(limit: config.maxClientCommunications)
            }
            if s.establishments.limit != config.maxSessionEstablishments {
                s.establishments = ConcurrencyLimit(limit: config.maxSessionEstablishments)
            }
            return old
        }
    }

    // MARK: One request

    /// The answer to one `POST /pcoip-broker/xml`.
    public struct Answer: Sendable {
        public var bytes: [UInt8]
        /// Our session cookie's value (always set, so a client keeps it).
        public var sessionToken: String?
    }

    /// Handles one request body from `clientAddress`.
    public func handle(body: [UInt8], cookie: String?, clientLogID: String?, clientAddress: String) async -> Answer {
        let (communications, establishments) = settings.withLock { ($0.communications, $0.establishments) }
        let parsed = Result { () throws(BrokerProtocolError) in try BrokerRequest.parse(body) }
        guard communications.enter() else {
            logger.warning("client \(clientAddress): refused, \(communications.limit) client communications in progress (MaxClientCommunications)")
            let kind = try? parsed.get().kind
            return Answer(bytes: BrokerXML.serialize(BrokerAnswer.failure(
                for: kind, (.authFailedBusy, .listFailedBusy, .allocFailedBusy, .errorBusy),
                "the connection manager is busy (\(communications.limit) client communications in progress); try again")),
                sessionToken: nil)
        }
        defer { communications.leave() }
        let request: BrokerRequest
        switch parsed {
        case .success(let message): request = message
        case .failure(let error):
            counters.add(\.malformed)
            logger.notice("client \(clientAddress): malformed request: \(error)")
            return Answer(bytes: BrokerXML.serialize(BrokerAnswer.error(.errorMalformed, error.description)), sessionToken: nil)
        }
        let now = clock().timeIntervalSince1970
        let (session, _) = sessions.resolve(cookie: cookie, clientLogID: clientLogID, clientAddress: clientAddress, now: now)
        var establishing = false
        if case .allocateResource = request {
            guard establishments.enter() else {
                logger.warning("client \(clientAddress): allocation refused, \(establishments.limit) session establishments in progress (MaxSessionEstablishments)")
                return Answer(bytes: BrokerXML.serialize(BrokerAnswer.allocationFailure(
                    .allocFailedBusy, "\(establishments.limit) session establishments are in progress; try again")),
                    sessionToken: session.token)
            }
            establishing = true
        }
        defer { if establishing { establishments.leave() } }
        let document = await relay(request, body: body, session: session, clientAddress: clientAddress, clientLogID: clientLogID)
        if case .bye = request { sessions.remove(session.token) }
        return Answer(bytes: BrokerXML.serialize(document), sessionToken: session.token)
    }

    private func relay(_ request: BrokerRequest, body: [UInt8], session: ClientSessions.Session, clientAddress: String,
                       clientLogID: String?) async -> BrokerXML.Element {
        let kind = request.kind
        let brokerFailure = (BrokerResult.authFailedBroker, BrokerResult.listFailedBroker, BrokerResult.allocFailedBroker, BrokerResult.errorBroker)
        let broker = settings.withLock { $0.broker }
        // The client's own bytes go on (they may carry fields this package does not read).
        let reply: (body: [UInt8], cookie: String?)
        do throws(UpstreamFailure) {
            reply = try await broker.send(body, cookie: session.brokerCookie, clientAddress: clientAddress, clientLogID: clientLogID)
        } catch {
            counters.add(\.brokerFailures)
            brokerProblem.withLock { $0 = "Cannot communicate with broker: \(error)" }
            logger.error("client \(clientAddress): \(kind.rawValue): \(error)")
            return BrokerAnswer.failure(for: kind, brokerFailure, "Cannot communicate with broker")
        }
        brokerProblem.withLock { $0 = nil }
        var username: String?
        if case .authenticate(let auth) = request { username = auth.username }
        sessions.update(session.token, brokerCookie: reply.cookie, username: username)
        let answer: BrokerAnswerView
        do throws(BrokerProtocolError) {
            let root: BrokerXML.Element
            do throws(BrokerXML.ParseError) {
                root = try BrokerXML.parse(reply.body)
            } catch {
                throw .malformed(error.description)
            }
            answer = try BrokerAnswerView(root)
        } catch {
            counters.add(\.brokerFailures)
            logger.error("client \(clientAddress): \(kind.rawValue): the broker's answer is not valid: \(error)")
            return BrokerAnswer.failure(for: kind, brokerFailure, "the broker's answer is not valid")
        }
        switch request {
        case .authenticate:
            counters.add(answer.succeeded ? \.authenticated : \.authenticationsFailed)
            logger.info("client \(clientAddress): authenticate '\(username ?? "")': \(answer.resultID ?? "-")")
        case .allocateResource(let allocation) where answer.succeeded:
            return await establish(answer, allocation: allocation, session: session, clientAddress: clientAddress)
        default:
            break
        }
        return answer.root
    }

    /// After the broker allocated: the gateway, the grant, the prepare, the rewrite.
    private func establish(_ answer: BrokerAnswerView, allocation: BrokerRequest.Allocation, session: ClientSessions.Session,
                           clientAddress: String) async -> BrokerXML.Element {
        let fail = { (text: String) -> BrokerXML.Element in
            self.counters.add(\.establishmentsFailed)
            self.logger.error("client \(clientAddress): allocation of \(allocation.resourceID) failed: \(text)")
            return BrokerAnswer.allocationFailure(.allocFailedNoGateway, text)
        }
        let target: BrokerTarget
        do throws(BrokerProtocolError) {
            target = try answer.target()
        } catch {
            return fail("the broker's allocation has no usable target: \(error)")
        }
        guard let agent = await Self.agentAddress(target.ipAddress, port: target.port) else {
            return fail("the agent's address \(target.ipAddress) cannot be resolved")
        }
        let candidates = pool.choose()
        guard !candidates.isEmpty else {
            return fail("no healthy Security Gateway can carry the session; try again later")
        }
        let (config, signer) = settings.withLock { ($0.config, $0.signer) }
        let now = clock()
        let grant = SessionGrant(sessionID: target.sessionID.isEmpty ? UUID().uuidString : target.sessionID, agent: agent,
                                 serverName: target.sni, client: IPAddress(clientAddress) != nil ? clientAddress : nil,
                                 audience: config.gatewayGroup, issuedAt: now,
                                 expires: now.addingTimeInterval(TimeInterval(config.grantLifetimeSeconds)))
        let token: String
        do throws(GrantError) {
            token = try await signer.sign(grant)
        } catch {
            return fail("cannot sign the grant: \(error)")
        }
        // Every healthy gateway at once: the first in order that takes it
        // carries the session, the others are its failover siblings.
        let results = await withTaskGroup(of: (Int, String?).self) { group in
            for (index, gateway) in candidates.enumerated() {
                group.addTask { (index, await self.gateways.prepare(gateway, token: token)) }
            }
            var results = [String?](repeating: "not tried", count: candidates.count)
            for await (index, problem) in group { results[index] = problem }
            return results
        }
        var prepared: [SecurityGatewayAddress] = []
        for (gateway, problem) in zip(candidates, results) {
            if let problem {
                logger.warning("Security Gateway \(gateway): prepare failed: \(problem)")
                pool.markFailed(gateway.control.description, "prepare failed: \(problem)", now: now.timeIntervalSince1970)
            } else {
                prepared.append(gateway)
            }
        }
        guard let chosen = prepared.first else {
            return fail("no Security Gateway took the session (\(candidates.count) tried)")
        }
        pool.countSession(chosen.control.description)
        counters.add(\.established)
        logger.info("client \(clientAddress) ('\(session.username ?? "")'): session \(grant.sessionID) for \(target.sni) at \(agent) through \(chosen), \(prepared.count - 1) sibling(s)")
        return answer.redirected(to: chosen.publicAddress, port: chosen.publicPort,
                                 alternates: prepared.dropFirst().map { ($0.publicAddress, $0.publicPort) })
    }

    /// `ip:port` for the grant's agent; a name is resolved (off the cooperative threads).
    static func agentAddress(_ host: String, port: Int) async -> String? {
        if let ip = IPAddress(host) { return "\(SocketAddress(ip: ip, port: UInt16(port)))" }
        return await BlockingExecutor.shared.run {
            (try? SocketAddress.resolve(host: host, port: UInt16(port))).map { "\($0)" }
        }
    }

    // MARK: Health and status

    /// Checks every gateway and the broker once (the prober calls it every `HealthCheckInterval`).
    public func checkUpstreams() async {
        let now = clock().timeIntervalSince1970
        let members = pool.members
        await withTaskGroup(of: Void.self) { group in
            for member in members {
                group.addTask {
                    let health = await self.gateways.check(member.gateway, now: now)
                    self.pool.record(member.gateway.control.description, health)
                }
            }
            group.addTask {
                let problem = await self.settings.withLock { $0.broker }.probe()
                self.brokerProblem.withLock { $0 = problem.map { "Cannot communicate with broker: \($0)" } }
            }
        }
        sessions.sweep(now: now)
    }

    /// Nil when healthy, else the reason (`GET /health`).
    public var problem: String? {
        if let broker = brokerProblem.withLock({ $0 }) { return broker }
        if config.securityGatewayEnabled, let local = pool.local, !local.health.healthy {
            return "Security Gateway is enabled but does not respond"
        }
        if pool.choose().isEmpty { return "no Security Gateway is healthy" }
        return nil
    }

    /// `GET /v1/status` on the control listener.
    /// The Connection Manager's figures for `GET /metrics` (read at scrape time).
    public func writeMetrics(into text: inout PrometheusText) {
        let status = self.status()
        text.single("cm_client_sessions", .gauge, help: "PCoIP client sessions held (each with its own broker session).", status.clientSessions)
        text.family("cm_limit_in_use", .gauge, help: "Client communications and session establishments in progress.")
        text.sample("cm_limit_in_use", [("limit", "client_communications")], status.communicationsInProgress)
        text.sample("cm_limit_in_use", [("limit", "session_establishments")], status.establishmentsInProgress)
        text.family("cm_limit", .gauge, help: "MaxClientCommunications and MaxSessionEstablishments.")
        text.sample("cm_limit", [("limit", "client_communications")], status.maxClientCommunications)
        text.sample("cm_limit", [("limit", "session_establishments")], status.maxSessionEstablishments)
        text.single("cm_broker_up", .gauge, help: "1 when the broker answers, 0 otherwise.", status.brokerProblem == nil ? 1 : 0)
        text.family("cm_security_gateway_up", .gauge, help: "1 for a healthy Security Gateway, 0 otherwise.")
        for gateway in status.securityGateways { text.sample("cm_security_gateway_up", [("gateway", gateway.address)], gateway.healthy ? 1 : 0) }
        text.family("cm_security_gateway_sessions", .gauge, help: "Active sessions per Security Gateway (as it last reported).")
        for gateway in status.securityGateways { text.sample("cm_security_gateway_sessions", [("gateway", gateway.address)], gateway.activeSessions) }
        text.family("cm_events_total", .counter, help: "Connection Manager events (messages, allocations, refusals) by name.")
        for (name, count) in status.counters.sorted(by: { $0.key < $1.key }) { text.sample("cm_events_total", [("event", name)], count) }
    }

    public struct Status: Sendable, Encodable {
        public var broker: String
        public var brokerProblem: String?
        public var clientSessions: Int
        public var communicationsInProgress: Int
        public var establishmentsInProgress: Int
        public var maxClientCommunications: Int
        public var maxSessionEstablishments: Int
        public var securityGateways: [GatewayStatus]
        public var counters: [String: Int]

        public struct GatewayStatus: Sendable, Encodable {
            public var address: String
            public var control: String
            public var local: Bool
            public var healthy: Bool
            public var activeSessions: Int
            public var problem: String?

            enum CodingKeys: String, CodingKey {
                case address, control, local, healthy, problem
                case activeSessions = "active_sessions"
            }
        }

        enum CodingKeys: String, CodingKey {
            case broker, brokerProblem = "broker_problem", clientSessions = "client_sessions"
            case communicationsInProgress = "communications_in_progress", establishmentsInProgress = "establishments_in_progress"
            case maxClientCommunications = "max_client_communications", maxSessionEstablishments = "max_session_establishments"
            case securityGateways = "security_gateways", counters
        }
    }

    public func status() -> Status {
        let (config, communications, establishments) = settings.withLock { ($0.config, $0.communications, $0.establishments) }
        return Status(broker: config.brokerURL, brokerProblem: brokerProblem.withLock { $0 }, clientSessions: sessions.count,
                      communicationsInProgress: communications.inProgress, establishmentsInProgress: establishments.inProgress,
                      maxClientCommunications: communications.limit, maxSessionEstablishments: establishments.limit,
                      securityGateways: pool.members.map {
                          .init(address: "\($0.gateway.publicAddress):\($0.gateway.publicPort)", control: "\($0.gateway.control)",
                                local: $0.gateway.local, healthy: $0.health.healthy, activeSessions: $0.health.activeSessions,
                                problem: $0.health.problem)
                      },
                      counters: counters.snapshot(refusedCommunications: communications.refusals, refusedEstablishments: establishments.refusals))
    }

    public func shutdown() async {
        await settings.withLock { $0.broker }.shutdown()
        await gateways.shutdown()
    }
}

/// Event counters for `status` (never on a hot path of the relay).
final class Counters: Sendable {
    struct Values {
        var authenticated = 0
        var authenticationsFailed = 0
        var established = 0
        var establishmentsFailed = 0
        var malformed = 0
        var brokerFailures = 0
    }
    private let values = Mutex(Values())

    func add(_ key: WritableKeyPath<Values, Int>) { values.withLock { $0[keyPath: key] += 1 } }

    func snapshot(refusedCommunications: Int, refusedEstablishments: Int) -> [String: Int] {
        let v = values.withLock { $0 }
        return ["authenticated": v.authenticated, "authentications_failed": v.authenticationsFailed,
                "sessions_established": v.established, "establishments_failed": v.establishmentsFailed,
                "malformed_requests": v.malformed, "broker_failures": v.brokerFailures,
                "refused_communications": refusedCommunications, "refused_establishments": refusedEstablishments]
    }
}

/// Unguessable cookie values: 32 bytes from the system's CSPRNG, base64url.
enum ControlTokens {
    static func make() -> String {
        // Eight bytes per getrandom(2), not one.
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<4).flatMap { _ in withUnsafeBytes(of: generator.next() as UInt64) { Array($0) } }
        return Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }
}
