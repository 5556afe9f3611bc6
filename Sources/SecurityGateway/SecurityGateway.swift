import Dispatch
import FoundationEssentials
import CoreMetrics
import Logging
import Relay
import ServiceSupport
import SessionGrants
import Synchronization
import SystemLayer

/// The PCoIP Security Gateway's data path, wired: the relay carries TCP 4172
/// with an SNI inspector (ClientHello → prepared grant → agent) and, per live
/// session, a UDP rule from the client's address to its agent from a fixed
/// source port. The control endpoint (`SecurityGatewayControl`) and the
/// executable sit on top of this.
public final class SecurityGateway: Sendable {
    /// What a reload may change: the config in force and its verifier.
    private let live: Mutex<(config: SecurityGatewayConfig, verifier: GrantVerifier)>
    public var config: SecurityGatewayConfig { live.withLock { $0.config } }
    public var verifier: GrantVerifier { live.withLock { $0.verifier } }
    public let engine: RelayEngine
    public let grants: PreparedGrants
    public let sessions: SessionTracker
    private let sync: RuleSync
    private let logger: Logger

    /// The TCP rule's id, and the one UDP rule's: it admits any sender and
    /// is routed by the session tracker, which gives each new flow its
    /// client's path (agent and source port); a sender without a session
    /// has no route, and its datagrams are dropped and counted
    /// (`not_allowed`). A session starting or ending changes no relay rule.
    public static let tcpRuleID = "sg-tcp"
    public static let udpRuleID = "sg-udp"

    /// Starts the relay loops; nothing listens before `start()`.
    /// - Throws: `Errno` when the loops cannot be created.
    public init(config: SecurityGatewayConfig, verifier: GrantVerifier, grants: PreparedGrants,
                relaySettings: RelaySettings? = nil, logger: Logger = Logger(label: "security-gateway")) throws(Errno) {
        live = Mutex((config, verifier))
        self.grants = grants
        self.logger = logger
        var settings = relaySettings ?? RelaySettings()
        settings.maxConnections = max(settings.maxConnections, config.maxConnections)
        engine = try RelayEngine(settings: settings, logger: logger)
        let sync = RuleSync(engine: engine, logger: logger)
        self.sync = sync
        sessions = SessionTracker(agentSourcePort: config.agentSourcePort,
                                  collaborationPorts: config.enableCollaboration ? config.collaborationSourcePorts : nil,
                                  listen: config.listen,
                                  onPathEnded: { client, agent in sync.closeFlows(client: client, agent: agent) })
        let tcp = Self.tcpRule(config, grants: grants, sessions: sessions)
        sync.configure(base: [tcp, sessions.udpRule(id: Self.udpRuleID)])
    }

    /// The inspect-first TCP rule on `ListenAddress` (ClientHello → SNI → grant → agent).
    static func tcpRule(_ config: SecurityGatewayConfig, grants: PreparedGrants, sessions: SessionTracker) -> RelayRule {
        let inspector = SNIInspector(maxBytes: config.clientHelloMaxBytes, timeoutNanoseconds: config.clientHelloTimeoutNanoseconds,
                                     grants: grants, sessions: sessions)
        var tcp = RelayRule(id: tcpRuleID, listen: config.listen, target: SocketAddress(ip: .v4(0), port: 0),
                            maxConnections: config.maxConnections)
        tcp.inspector = RuleInspector(name: "sni-grant", inspector: inspector)
        return tcp
    }

    /// Applies a re-read config (SIGHUP) without dropping a session: the
    /// grant verifier (certificate, gateway group), MaxConnections and the
    /// ClientHello limits (new connections), collaboration (new paths).
    /// Established connections keep the rule they were accepted under.
    /// `ListenAddress`, `ControlListen` and `AgentSourcePort` need a restart:
    /// a change to them is reported and not applied.
    /// - Returns: what was applied, and what waits for a restart.
    /// - Throws: `RuleError` when the new rule cannot be applied (the old one stays).
    @discardableResult
    public func reload(config new: SecurityGatewayConfig, verifier: GrantVerifier) throws(RuleError) -> (applied: [String], needsRestart: [String]) {
        let old = config
        var needsRestart: [String] = []
        var effective = new
        if new.listen != old.listen { needsRestart.append("ListenAddress"); effective.listen = old.listen }
        if new.controlListen != old.controlListen { needsRestart.append("ControlListen"); effective.controlListen = old.controlListen }
        if new.agentSourcePort != old.agentSourcePort { needsRestart.append("AgentSourcePort"); effective.agentSourcePort = old.agentSourcePort }
        if new.maxConnections > engine.settings.maxConnections {
            needsRestart.append("MaxConnections above \(engine.settings.maxConnections)")
            effective.maxConnections = engine.settings.maxConnections
        }
        if effective.enableCollaboration, effective.collaborationSourcePorts.contains(effective.agentSourcePort) {
            throw RuleError.invalid(rule: Self.tcpRuleID, reason: "CollaborationSourcePorts must not contain AgentSourcePort")
        }
        try sync.replaceBase(tcp: Self.tcpRule(effective, grants: grants, sessions: sessions))
        sessions.setCollaborationPorts(effective.enableCollaboration ? effective.collaborationSourcePorts : nil)
        live.withLock { $0 = (effective, verifier) }
        var applied: [String] = []
        if new.gatewayGroup != old.gatewayGroup { applied.append("GatewayGroup \(new.gatewayGroup)") }
        if new.jwtVerifyingCertificate != old.jwtVerifyingCertificate { applied.append("JwtVerifyingCert") }
        if effective.maxConnections != old.maxConnections { applied.append("MaxConnections \(effective.maxConnections)") }
        if effective.enableCollaboration != old.enableCollaboration || effective.collaborationSourcePorts != old.collaborationSourcePorts {
            applied.append("collaboration \(effective.enableCollaboration ? "on" : "off")")
        }
        if effective.clientHelloTimeoutNanoseconds != old.clientHelloTimeoutNanoseconds || effective.clientHelloMaxBytes != old.clientHelloMaxBytes {
            applied.append("ClientHello limits")
        }
        logger.notice("config reloaded: \(applied.isEmpty ? "nothing changed" : applied.joined(separator: ", "))\(needsRestart.isEmpty ? "" : "; needs a restart: \(needsRestart.joined(separator: ", "))")")
        return (applied, needsRestart)
    }

    /// Opens TCP and UDP on `ListenAddress`.
    /// - Throws: `RuleError` (e.g. the port is taken); nothing is opened then.
    public func start() throws(RuleError) {
        try sync.applyNow()
        let config = self.config
        logger.info("security gateway on \(config.listen) (group \(config.gatewayGroup), MaxConnections \(config.maxConnections))")
    }

    /// Stops listening and closes every connection.
    public func shutdown() {
        sync.stop()
        engine.shutdown()
        grants.flush()
    }

    /// Why the gateway is not healthy, or nil.
    public var problem: String? {
        if let error = sync.lastError { return error }
        if let error = grants.storeProblem { return "prepared grants: \(error)" }
        if !engine.rules.contains(where: { $0.id == Self.tcpRuleID }) { return "not listening on \(config.listen)" }
        return nil
    }

    /// Waits until the relay's UDP rules match the live sessions (tests, shutdown).
    public func settle() { sync.waitIdle() }

    // MARK: Preparing sessions

    /// What preparing a grant came to: an HTTP status and a JSON object.
    public struct PrepareAnswer: Sendable, Equatable {
        public let status: Int
        public let body: [String: String]
        /// The outcome as a metric label (prepared, already_prepared, replayed, expired, ...).
        public var result: String = "other"
    }

    /// A grant refusal as a metric label.
    static func label(_ error: GrantError) -> String {
        switch error {
        case .malformed: "malformed"
        case .invalidClaim: "invalid_claim"
        case .replayed: "replayed"
        case .algorithmNotAllowed: "algorithm_not_allowed"
        case .badSignature: "bad_signature"
        case .expired: "expired"
        case .notYetValid: "not_yet_valid"
        case .issuedInFuture: "issued_in_future"
        case .wrongAudience: "wrong_audience"
        default: "other"
        }
    }

    /// Verifies `token` (signature, algorithm, time, audience) and prepares it.
    /// - Returns: 201 prepared, 200 already prepared, 400 malformed, 401 not
    ///   admissible (with the reason), 409 a used single-use grant, 503 full.
    ///   The answer never holds the token.
    ///   Blocks (the journal's fdatasync): call it where blocking is allowed
    ///   (the control endpoint's own threads).
    public func prepare(token: String) -> PrepareAnswer {
        prepare(tokens: [token])[0]
    }

    /// Prepares many grants (a batch of `POST /v1/sessions`): each checked
    /// and answered as `prepare` would, the journal made durable once.
    public func prepare(tokens: [String]) -> [PrepareAnswer] {
        var answers = [PrepareAnswer?](repeating: nil, count: tokens.count)
        var admitted: [(index: Int, grant: SessionGrant, token: String)] = []
        for (index, token) in tokens.enumerated() {
            switch checkGrant(token: token) {
            case .success(let grant): admitted.append((index, grant, token))
            case .failure(let refusal): answers[index] = refusal.answer
            }
        }
        let stored = grants.prepare(many: admitted.map { ($0.grant, $0.token) })
        for (item, result) in zip(admitted, stored) { answers[item.index] = answer(item.grant, result) }
        let done = answers.map { $0! }
        for answer in done {
            MetricHandles.counter("sg_grants_prepare_total", [("status", String(answer.status)), ("result", answer.result)]).increment()
        }
        return done
    }

    /// A grant that verifies and names a numeric agent, or the refusal.
    private func checkGrant(token: String) -> Result<SessionGrant, PrepareRefusal> {
        let grant: SessionGrant
        do throws(GrantError) {
            grant = try verifier.check(token, recordUse: false)
        } catch {
            let status: Int
            switch error {
            case .malformed, .invalidClaim: status = 400
            case .replayed: status = 409
            case .algorithmNotAllowed, .badSignature, .expired, .notYetValid, .issuedInFuture, .wrongAudience: status = 401
            default: status = 500
            }
            logger.notice("prepare refused: \(error)", metadata: ["reason": "\(error)"])
            return .failure(PrepareRefusal(PrepareAnswer(status: status, body: ["error": error.description, "field": "grant"], result: Self.label(error))))
        }
        guard SocketAddress(grant.agent) != nil else {
            return .failure(PrepareRefusal(PrepareAnswer(status: 400, body: ["error": "grant: agent \"\(grant.agent)\" is not a numeric HOST:PORT", "field": "grant.agent"], result: "bad_agent")))
        }
        return .success(grant)
    }

    /// A refused grant's answer, as an error for `Result`.
    private struct PrepareRefusal: Error {
        let answer: PrepareAnswer
        init(_ answer: PrepareAnswer) { self.answer = answer }
    }

    /// The answer to a grant's prepare, from what the store did with it.
    private func answer(_ grant: SessionGrant, _ stored: PreparedGrants.PrepareResult) -> PrepareAnswer {
        let answer = ["session_id": grant.sessionID, "server_name": grant.serverName,
                      "expires": String(Int64(grant.expires.timeIntervalSince1970))]
        switch stored {
        case .added:
            logger.info("session \(grant.sessionID) prepared for \(grant.serverName)",
                        metadata: ["session": "\(grant.sessionID)", "target": "\(grant.agent)"])
            return PrepareAnswer(status: 201, body: answer, result: "prepared")
        case .alreadyPrepared:
            return PrepareAnswer(status: 200, body: answer, result: "already_prepared")
        case .alreadyUsed:
            return PrepareAnswer(status: 409, body: ["error": GrantError.replayed.description, "field": "grant"], result: "replayed")
        case .full:
            return PrepareAnswer(status: 503, body: ["error": "prepared grants: the store is full (\(grants.capacity))"], result: "store_full")
        case .notStored(let why):
            logger.error("prepare: \(why)", metadata: ["session": "\(grant.sessionID)", "reason": "\(why)"])
            return PrepareAnswer(status: 503, body: ["error": "prepared grants: \(why)"], result: "not_stored")
        }
    }

    /// Revokes a session's prepared grants. - Returns: how many went.
    public func revoke(sessionID: String) -> Revocation {
        let n = grants.revoke(sessionID: sessionID)
        // Live connections of the session end too (their UDP binding with
        // them): a revoked session must not go on until the client leaves.
        let closed = engine.closeInspected { inspection in
            (inspection as? SNIInspection)?.sessionID == sessionID
        }
        if n > 0 || closed > 0 {
            logger.info("session \(sessionID) revoked (\(n) prepared grant(s), \(closed) live connection(s) closed)")
        }
        return Revocation(grants: n, connections: closed)
    }

    /// What a revocation removed.
    public struct Revocation: Sendable, Equatable {
        /// Prepared grants removed.
        public var grants: Int
        /// Live connections of the session reset.
        public var connections: Int
    }

    // MARK: Counters

    /// The figures of `GET /v1/status`.
    public struct Status: Sendable, Equatable, Codable {
        public var activeSessions: Int
        public var activeConnections: Int
        public var preparedGrants: Int
        public var udpBindings: Int
        public var refusals: [String: Int]
        public var bytesClientToAgent: Int
        public var bytesAgentToClient: Int
        public var udpDatagramsToAgent: Int
        public var udpDatagramsToClient: Int
        public var udpDropped: [String: Int]

        enum CodingKeys: String, CodingKey {
            case activeSessions = "active_sessions", activeConnections = "active_connections"
            case preparedGrants = "prepared_grants", udpBindings = "udp_bindings", refusals
            case bytesClientToAgent = "bytes_client_to_agent", bytesAgentToClient = "bytes_agent_to_client"
            case udpDatagramsToAgent = "udp_datagrams_to_agent", udpDatagramsToClient = "udp_datagrams_to_client"
            case udpDropped = "udp_dropped"
        }
    }

    /// The Security Gateway's figures for `GET /metrics`, read at scrape time
    /// (the relay's own families, then sessions and grants). Waits for the
    /// relay loops: call it off Swift's cooperative threads.
    public func writeMetrics(into text: inout PrometheusText) {
        let relay = RelayMetrics.write(engine, into: &text)
        text.single("sg_sessions_active", .gauge, help: "PCoIP session connections open now.", sessions.active)
        text.single("sg_grants_used_total", .counter, help: "Connections admitted by a prepared grant (SNI matched, agent reached for).", sessions.started)
        text.single("sg_grants_prepared", .gauge, help: "Prepared grants held now.", grants.count)
        text.single("sg_udp_bindings", .gauge, help: "UDP paths from clients to agents.", sessions.bindingCount)
        text.family("sg_grants_refused_total", .counter, help: "Connections refused at the gateway, by reason (no_grant, no_sni, limit, ...).")
        for reason in SessionRefusal.allCases where reason != .limit {
            text.sample("sg_grants_refused_total", [("reason", reason.rawValue)], relay.inspectionRefusals[reason.rawValue] ?? 0)
        }
        text.sample("sg_grants_refused_total", [("reason", SessionRefusal.limit.rawValue)],
                    relay.refused[.listenerLimit, default: 0] + relay.refused[.globalLimit, default: 0] + (relay.inspectionRefusals[SessionRefusal.limit.rawValue] ?? 0))
    }

    public func status() -> Status {
        let relay = engine.stats()
        var refusals: [String: Int] = [:]
        for reason in SessionRefusal.allCases { refusals[reason.rawValue] = relay.inspectionRefusals[reason.rawValue] ?? 0 }
        refusals[SessionRefusal.limit.rawValue] = relay.refused[.listenerLimit, default: 0] + relay.refused[.globalLimit, default: 0]
        for (reason, n) in relay.inspectionRefusals where refusals[reason] == nil { refusals[reason] = n }
        var status = Status(activeSessions: sessions.active, activeConnections: relay.active, preparedGrants: grants.count,
                            udpBindings: sessions.bindingCount, refusals: refusals,
                            bytesClientToAgent: relay.bytesClientToTarget, bytesAgentToClient: relay.bytesTargetToClient,
                            udpDatagramsToAgent: 0, udpDatagramsToClient: 0, udpDropped: [:])
        for (_, udp) in engine.datagramStats() {
            status.udpDatagramsToAgent += udp.datagramsToTarget
            status.udpDatagramsToClient += udp.datagramsToClient
            status.bytesClientToAgent += udp.bytesToTarget
            status.bytesAgentToClient += udp.bytesToClient
            for (reason, n) in udp.drops { status.udpDropped[reason.rawValue, default: 0] += n }
        }
        return status
    }
}

/// Keeps the relay's rules equal to the base rules (the inspected TCP rule
/// and the one routed UDP rule), and ends the UDP flows of paths that
/// ended. Sessions end on the relay loops, which must not wait for the
/// engine (a command runs on every loop, their own included), so the flows
/// are closed on a serial queue, coalesced: each run closes the flows of
/// every path that ended since the last one in one look at the flows.
final class RuleSync: Sendable {
    private struct State {
        var base: [RelayRule] = []
        var lastError: String?
        var stopped = false
    }

    private let engine: RelayEngine
    private let logger: Logger
    private let state = Mutex(State())
    private let queue = DispatchQueue(label: "security-gateway.rules")
    /// Paths ended whose flows are to be closed by the next run (nil: no run is scheduled).
    private let endedPaths = Mutex<Set<EndedPath>?>(nil)

    private struct EndedPath: Hashable {
        let client: IPAddress
        let agent: SocketAddress
    }

    init(engine: RelayEngine, logger: Logger) {
        self.engine = engine
        self.logger = logger
    }

    func configure(base: [RelayRule]) {
        state.withLock { $0.base = base }
    }

    var lastError: String? { state.withLock { $0.lastError } }

    /// Replaces the TCP rule of the base (a reload) and applies at once.
    /// - Throws: `RuleError`; the previous base stays then.
    func replaceBase(tcp: RelayRule) throws(RuleError) {
        let previous = state.withLock { s -> [RelayRule] in
            let previous = s.base
            s.base = s.base.map { $0.id == tcp.id ? tcp : $0 }
            return previous
        }
        do throws(RuleError) {
            try applyNow()
        } catch {
            state.withLock { $0.base = previous }
            try? applyNow()
            throw error
        }
    }

    /// The base rules, as a whole set (start, reload).
    func applyNow() throws(RuleError) {
        let (base, stopped) = state.withLock { ($0.base, $0.stopped) }
        guard !stopped else { return }
        let rules = base
        do throws(RuleError) {
            try engine.apply(rules, logLevel: .debug)
            state.withLock { $0.lastError = nil }
        } catch {
            state.withLock { $0.lastError = error.description }
            throw error
        }
    }

    /// Closes, off the relay loops, the UDP flows from `client` toward
    /// `agent` (their path ended). Paths ending while a run is pending join
    /// it: one look at the flows for all of them.
    func closeFlows(client: IPAddress, agent: SocketAddress) {
        let schedule = endedPaths.withLock { pending -> Bool in
            guard pending == nil else {
                pending!.insert(EndedPath(client: client, agent: agent))
                return false
            }
            pending = [EndedPath(client: client, agent: agent)]
            return true
        }
        guard schedule else { return }
        queue.async { [self] in
            let ended = endedPaths.withLock { pending in defer { pending = nil }; return pending ?? [] }
            guard !state.withLock({ $0.stopped }), !ended.isEmpty else { return }
            engine.closeFlows { ended.contains(EndedPath(client: $0.client.ip.unmapped, agent: $0.target)) }
        }
    }

    func waitIdle() { queue.sync {} }

    func stop() {
        state.withLock { $0.stopped = true }
        queue.sync {}
    }
}
