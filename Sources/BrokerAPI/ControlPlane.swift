import BrokerCore
import CertificateFiles
import ControlProtocol
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

// The gateway control plane on the broker's side (docs/CONTROL-PROTOCOL.md):
// enrollment, the signed gateway-agent calls (register, heartbeat), and the
// product's connect/disconnect calls that push rules to gateways.

extension BrokerAPI {
    static let registerFields: Set<String> = ["gateway_id", "version", "control_url", "port_range", "rules", "control_certificate"]
    static let heartbeatFields: Set<String> = ["gateway_id", "sessions", "rules", "load"]
    static let connectFields: Set<String> = ["desktop_id", "protocol", "client_ip"]

    func addControlPlaneRoutes(api: RouterGroup<BrokerRequestContext>, authenticated: RouterGroup<BrokerRequestContext>) {
        authenticated.post("gateways/:id/enrollment") { _, context in try await self.enroll(context) }
        api.post("gateway-agent/register") { request, context in try await self.register(request, context) }
        api.post("gateway-agent/heartbeat") { request, context in try await self.heartbeat(request, context) }
        authenticated.post("connect") { request, context in try await self.connect(request, context) }
        authenticated.delete("connect/:rule_id") { _, context in try await self.disconnect(context) }
    }

    // MARK: Enrollment

    /// `POST /v1/gateways/{id}/enrollment`: a new control key, shown this once.
    private func enroll(_ context: BrokerRequestContext) async throws -> Response {
        _ = try context.requireAdmin()
        let id = try Self.id(context)
        let key = ControlKey.generate()
        try await store.enrollGateway(id: id, key: key, now: clock())
        context.logger.notice("enrolled gateway \(id): new control key, fingerprint \(Secrets.fingerprint(key))")
        var response = Response.json(["gateway_id": .int(id), "control_key": .string(key.text)], status: .created)
        response.headers[.cacheControl] = "no-store"
        return response
    }

    // MARK: Gateway agent

    /// Checks the `LEO-HMAC-SHA256` Authorization of a gateway-to-broker call.
    /// - Returns: the gateway id it was signed for.
    /// - Throws: `APIError` 401 with the `ControlAuthError` description.
    private func authenticateGateway(_ request: Request, body: [UInt8]) async throws -> Int64 {
        guard let header = request.headers[.authorization] else { throw Self.controlUnauthorized(.missing) }
        let authorization: ControlAuthorization
        do throws(ControlAuthError) {
            authorization = try ControlAuthorization(header: header)
        } catch {
            throw Self.controlUnauthorized(error)
        }
        guard let key = try await store.controlKey(gatewayID: Int64(authorization.gatewayID)) else {
            throw Self.controlUnauthorized(.unknownGateway(authorization.gatewayID))
        }
        let signer = ControlSigner(gatewayID: authorization.gatewayID, key: key)
        do throws(ControlAuthError) {
            try signer.verify(authorization, direction: .gatewayToBroker, method: request.method.rawValue,
                              path: request.uri.path, body: body, replay: replayGuard,
                              now: Int64(clock().timeIntervalSince1970))
        } catch {
            throw Self.controlUnauthorized(error)
        }
        return Int64(authorization.gatewayID)
    }

    private static func controlUnauthorized(_ error: ControlAuthError) -> APIError {
        APIError(.unauthorized, error.description, headers: [.wwwAuthenticate: ControlAuthorization.scheme])
    }

    /// Strict decoding of a control message: 400 naming the field.
    private static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8], allowed: Set<String>) throws(APIError) -> T {
        do {
            return try ControlJSON.decodeStrict(type, from: bytes, allowed: allowed)
        } catch {
            throw APIError(.badRequest, error.description, field: error.field)
        }
    }

    private static func requireSameGateway(_ bodyID: Int, _ signed: Int64) throws(APIError) {
        guard Int64(bodyID) == signed else {
            throw APIError.badField("gateway_id", "is \(bodyID) but the request is signed for gateway \(signed)")
        }
    }

    /// `POST /v1/gateway-agent/register`.
    private func register(_ request: Request, _ context: BrokerRequestContext) async throws -> Response {
        var request = request
        let body = [UInt8](try await self.body(&request))
        let gatewayID = try await authenticateGateway(request, body: body)
        let message = try Self.decode(RegisterRequest.self, body, allowed: Self.registerFields)
        try Self.requireSameGateway(message.gatewayID, gatewayID)
        if let pem = message.controlCertificate {
            // The certificate the broker will trust for this gateway's pushes: HP's checks.
            do throws(CertificateFiles.Problem) {
                try CertificateFiles.checkCACertificate(Array(pem.utf8), file: "control_certificate")
            } catch {
                throw APIError.badField("control_certificate", error.message)
            }
        }
        let registration = GatewayRegistration(version: message.version, controlURL: message.controlURL,
                                               portRange: message.portRange, ruleIDs: message.rules.map(\.id),
                                               controlCertificate: message.controlCertificate)
        try validating { () throws(FieldError) in try registration.validate() }
        let keep = try await store.registerGateway(id: gatewayID, registration, now: clock())
        context.logger.notice("gateway \(gatewayID) registered: version \(message.version), control \(message.controlURL), ports \(message.portRange.first)-\(message.portRange.last), keeps \(keep.count) of \(message.rules.count) rule(s)")
        try await repushMissingRules(gatewayID: gatewayID, reported: Set(message.rules.map(\.id)), logger: context.logger)
        try await joinEveryGatewayConnections(gatewayID: gatewayID, logger: context.logger)
        let answer = RegisterResponse(heartbeatIntervalSeconds: configuration.heartbeatInterval,
                                      offlineAfterSeconds: configuration.offlineAfter, keep: keep)
        return Self.controlJSON(ControlJSON.encode(answer))
    }

    /// Pushes again, in the background, the rules the broker holds for a
    /// gateway that its registration did not list (a gateway that lost its
    /// state). The gateway only drops rules it listed and `keep` lacks, so a
    /// push racing the registration's answer stays.
    private func repushMissingRules(gatewayID: Int64, reported: Set<String>, logger: Logger) async throws {
        let missing = try await store.rules(gatewayID: gatewayID).filter { !reported.contains($0.id) }
        guard !missing.isEmpty, let key = try await store.controlKey(gatewayID: gatewayID) else { return }
        let gateway = try await store.gateway(id: gatewayID)
        let client = gatewayClient
        let store = self.store
        logger.notice("gateway \(gatewayID) lacks \(missing.count) rule(s) the broker holds: pushing them again")
        Task {
            for rule in missing {
                do {
                    // The client was told rule.port: ask for it again (methods 0
                    // and 2 may name a port of the range), else take a new one.
                    var samePort = rule.push
                    if samePort.port == nil { samePort.port = rule.port }
                    let port: Int
                    do throws(GatewayCallError) {
                        port = try await client.put(ruleID: rule.id, push: samePort, gateway: gateway, key: key)
                    } catch {
                        guard case .refused(_, let status, _) = error, samePort != rule.push, status == 409 || status == 400 else {
                            throw error
                        }
                        port = try await client.put(ruleID: rule.id, push: rule.push, gateway: gateway, key: key)
                    }
                    if port != rule.port {
                        try? await store.updateRulePort(id: rule.id, port: port)
                        logger.warning("rule \(rule.id) on gateway \(gatewayID) came back on port \(port) instead of \(rule.port)")
                    }
                } catch {
                    logger.warning("pushing rule \(rule.id) again: \(error)")
                }
            }
        }
    }

    /// A gateway of an `E` cluster that registers (it was offline, or it is
    /// new) gets, in the background, the cluster's live connections it does
    /// not carry, on their port: behind the load balancer any gateway of
    /// the cluster must carry every connection. A port it cannot give is
    /// logged and skipped (the connection stays on the other gateways).
    private func joinEveryGatewayConnections(gatewayID: Int64, logger: Logger) async throws {
        let gateway = try await store.gateway(id: gatewayID)
        guard let clusterID = gateway.loadBalancerID,
              let cluster = try? await store.gatewayCluster(id: clusterID), cluster.loadBalanceVia == .everyGateway,
              let key = try await store.controlKey(gatewayID: gatewayID) else { return }
        let members = Set(try await store.gateways().filter { $0.loadBalancerID == clusterID }.map(\.id))
        let connections = Dictionary(grouping: try await store.rules(gatewayID: nil).filter { members.contains($0.gatewayID) },
                                     by: \.connectionID)
        let missing = connections.values
            .filter { rules in !rules.contains { $0.gatewayID == gatewayID } }
            .compactMap { rules in rules.first { $0.id == $0.connectionID } ?? rules.first }
            .sorted { $0.created < $1.created }
        guard !missing.isEmpty else { return }
        logger.notice("gateway \(gatewayID) joins \(missing.count) connection(s) of E cluster \(clusterID)")
        let client = gatewayClient
        let store = self.store
        let clock = self.clock
        Task {
            for model in missing {
                var push = model.push
                if push.port == nil { push.port = model.port }
                let ruleID = GatewayRule.newID()
                do {
                    // Reserved as a connect's are: a registration while it is pushed keeps it.
                    try await store.reserveRules([PendingRule(id: ruleID, gatewayID: gatewayID)], now: clock())
                    let port = try await client.put(ruleID: ruleID, push: push, gateway: gateway, key: key)
                    try await store.createRules([GatewayRule(id: ruleID, gatewayID: gatewayID, desktopID: model.desktopID,
                                                             userID: model.userID, protocolName: model.protocolName, push: push,
                                                             port: port, created: clock(), connectionID: model.connectionID)])
                } catch {
                    try? await client.delete(ruleID: ruleID, gateway: gateway, key: key)
                    try? await store.releaseRules(ids: [ruleID])
                    logger.warning("gateway \(gatewayID) cannot join connection \(model.connectionID) on port \(model.port): \(error)")
                }
            }
        }
    }

    /// `POST /v1/gateway-agent/heartbeat`.
    private func heartbeat(_ request: Request, _ context: BrokerRequestContext) async throws -> Response {
        var request = request
        let body = [UInt8](try await self.body(&request))
        let gatewayID = try await authenticateGateway(request, body: body)
        let message = try Self.decode(Heartbeat.self, body, allowed: Self.heartbeatFields)
        try Self.requireSameGateway(message.gatewayID, gatewayID)
        if message.sessions < 0 { throw APIError.badField("sessions", "must be 0 or more, got \(message.sessions)") }
        if message.rules < 0 { throw APIError.badField("rules", "must be 0 or more, got \(message.rules)") }
        if !message.load.isFinite || message.load < 0 {
            throw APIError.badField("load", "must be a finite number of 0 or more, got \(message.load)")
        }
        let wasOnline = (try? await store.gateway(id: gatewayID).online) ?? false
        try await store.recordHeartbeat(id: gatewayID, load: message.load, sessions: message.sessions, now: clock())
        if !wasOnline { context.logger.notice("gateway \(gatewayID) is online again (heartbeat)") }
        return Response(status: .noContent)
    }

    private static func controlJSON(_ bytes: [UInt8], status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    // MARK: Connect

    /// `POST /v1/connect` `{"desktop_id", "protocol", "client_ip"?}`: chooses the
    /// gateway, pushes the rule, stores it, and answers where to connect.
    private func connect(_ request: Request, _ context: BrokerRequestContext) async throws -> Response {
        guard let session = context.authenticated else { throw APIError.unauthorized("not logged in") }
        let user = session.user
        var request = request
        let reader = try FieldReader(try JSONValue.parse(try await body(&request)), known: Self.connectFields, policy: .strict)
        guard let desktopID = try reader.int("desktop_id") else {
            throw APIError.badField("desktop_id", "is required (the id of a desktop)")
        }
        guard desktopID > 0 else { throw APIError.badField("desktop_id", "must be a positive id, got \(desktopID)") }
        guard let protocolName = try reader.string("protocol") else {
            throw APIError.badField("protocol", "is required (the name of one of the desktop's protocols, such as rdp)")
        }
        var clientIP = context.clientAddress
        if let given = try reader.string("client_ip") {
            try validating { () throws(FieldError) in try Validate.ipAddress(given, field: "client_ip") }
            clientIP = given
        }

        // One store read for the desktop, the gateways that could carry it and their keys (issue 15).
        let reading = try await readingForConnect(Int64(desktopID))
        let desktop = reading.desktop
        guard desktop.entitles(user) || user.role == .admin else {
            throw APIError(.forbidden, "desktop_id: user '\(user.login)' is not entitled to desktop \(desktop.id) ('\(desktop.name)')",
                           field: "desktop_id")
        }
        guard let offered = desktop.protocols.first(where: { $0.name.lowercased() == protocolName.lowercased() }) else {
            throw APIError.badField("protocol", "desktop \(desktop.id) ('\(desktop.name)') offers \(desktop.protocols.map(\.name).joined(separator: ", ")), not \(Validate.quotedForAPI(protocolName))")
        }

        let now = clock()
        let choice = try Self.choose(desktop: desktop, gateways: reading.gateways, cluster: reading.cluster, ruleCounts: reading.ruleCounts,
                                     loginGatewayID: session.session.loginGatewayID, now: now,
                                     offlineAfter: TimeInterval(configuration.offlineAfter))
        let method = RoutingMethod(rawValue: choice.method.rawValue) ?? .randomPort
        if method != .randomPort {
            guard (try? Validate.ipAddress(clientIP, field: "client_ip")) != nil else {
                throw APIError.badField("client_ip", "is required: gateway \(choice.gateway.id) opens ports only to the client's address (use_src_ip \(method.rawValue)) and the client's address is unknown")
            }
        }
        let push = RulePush(protocol: Self.ruleProtocol(offered.transport), method: method,
                            target: Self.target(desktop.address, offered.port),
                            clientIP: method == .randomPort ? nil : clientIP,
                            port: method == .protocolPortClientOnly ? offered.port : nil,
                            unusedExpirySeconds: configuration.ruleUnusedExpiry)
        var keys: [ControlKey] = []
        for gateway in choice.all {
            guard let key = reading.controlKeys[gateway.id] else {
                throw APIError(.serviceUnavailable, "gateway \(GatewayControlClient.name(gateway)) is not enrolled")
            }
            keys.append(key)
        }
        let placed = try await place(push, on: choice, keys: keys, now: now, logger: context.logger)
        let connectionID = placed[0].ruleID
        let rules = placed.map { placement in
            GatewayRule(id: placement.ruleID, gatewayID: placement.gateway.id, desktopID: desktop.id, userID: user.id,
                        protocolName: offered.name, push: placement.push, port: placement.port, created: now,
                        connectionID: connectionID)
        }
        do {
            try await store.createRules(rules)
        } catch {
            // Keep the gateways and the table in step: take the rules back.
            await takeBack(placed)
            await release(placed.map(\.ruleID), logger: context.logger)
            throw error
        }
        let port = placed[0].port
        let through = placed.map { "\($0.gateway.id)" }.joined(separator: ", ")
        context.logger.info("connect: desktop \(desktop.id) (\(offered.name)) through gateway(s) \(through) port \(port), method \(method.rawValue), rule \(connectionID)")
        var answer: [String: JSONValue] = [
            "rule_id": .string(connectionID),
            "gateway": ["id": .int(choice.gateway.id), "name": .string(choice.gateway.name)],
            "address": .string(choice.address),
            "port": .int(Int64(port)),
            "protocol": .string(offered.name),
        ]
        if !choice.others.isEmpty {
            answer["gateways"] = .array(choice.all.map { .object(["id": .int($0.id), "name": .string($0.name)]) })
        }
        return .json(.object(answer))
    }

    /// One rule pushed to one gateway.
    private struct Placement: Sendable {
        var gateway: Gateway
        var key: ControlKey
        var ruleID: String
        var push: RulePush
        var port: Int
    }

    /// Pushes the rule to the chosen gateway, then (cluster mode `E`) to every
    /// other one at once (issue 15: the call takes the slowest gateway's time,
    /// not the sum) with the port the first chose. A gateway that refuses that
    /// port (taken there) makes the broker take every push back and start
    /// again, at most three times; any other failure takes them back and
    /// answers 502 naming the first gateway (in the cluster's order) that
    /// failed. All or nothing.
    ///
    /// Each attempt's rules are reserved in the store before they are pushed
    /// (`reserveRules`): a gateway that registers between holding a rule and
    /// the broker storing it is told to keep it. The caller's `createRules`
    /// ends the reservations of the placements returned; a failed attempt's
    /// are ended here.
    private func place(_ push: RulePush, on choice: GatewayChoice, keys: [ControlKey], now: Date,
                       logger: Logger) async throws -> [Placement] {
        let attempts = choice.others.isEmpty ? 1 : 3
        let client = gatewayClient
        for attempt in 1...attempts {
            var shared = push
            let ids = choice.all.map { _ in GatewayRule.newID() }
            try await store.reserveRules(zip(ids, choice.all).map { PendingRule(id: $0, gatewayID: $1.id) }, now: now)
            let first: Placement
            switch await Self.push(shared, ruleID: ids[0], to: choice.all[0], key: keys[0], client: client) {
            case .success(let placement): first = placement
            case .failure(let error):
                await release(ids, logger: logger)
                logger.warning("connect: \(error)")
                throw APIError(.badGateway, error.description)
            }
            if shared.method != .protocolPortClientOnly { shared.port = first.port }
            let rest = Array(zip(zip(choice.all.dropFirst(), keys.dropFirst()), ids.dropFirst()))
            let results = await withTaskGroup(of: (Int, Result<Placement, GatewayCallError>).self) { group in
                for (index, ((gateway, key), ruleID)) in rest.enumerated() {
                    let sharedPush = shared
                    group.addTask { (index, await Self.push(sharedPush, ruleID: ruleID, to: gateway, key: key, client: client)) }
                }
                var collected = [Result<Placement, GatewayCallError>?](repeating: nil, count: rest.count)
                for await (index, result) in group { collected[index] = result }
                return collected.compactMap { $0 }
            }
            var placed = [first]
            var failure: GatewayCallError?
            for result in results {
                switch result {
                case .success(let placement): placed.append(placement)
                case .failure(let error): if failure == nil { failure = error }
                }
            }
            guard let failure else { return placed }
            await takeBack(placed)
            await release(ids, logger: logger)
            if case .refused(_, 409, _) = failure, attempt < attempts {
                logger.notice("connect: \(failure); trying another port on every gateway")
                continue
            }
            logger.warning("connect: \(failure)")
            throw APIError(.badGateway, failure.description)
        }
        throw APIError(.badGateway, "no port of the range was free on every gateway of the cluster after \(attempts) attempts")
    }

    /// One push; each gateway's record says which path its rules take (nil: the gateway's default).
    private static func push(_ shared: RulePush, ruleID: String, to gateway: Gateway, key: ControlKey,
                             client: GatewayControlClient) async -> Result<Placement, GatewayCallError> {
        var own = shared
        own.forwardingPath = ForwardingPath(rawValue: gateway.forwardingPath.rawValue)
        do {
            let port = try await client.put(ruleID: ruleID, push: own, gateway: gateway, key: key)
            return .success(Placement(gateway: gateway, key: key, ruleID: ruleID, push: own, port: port))
        } catch {
            return .failure(error)
        }
    }

    /// Deletes pushed rules again, on every gateway at once (best effort: a
    /// gateway that keeps one drops it at its next registration, as the
    /// broker no longer lists it).
    private func takeBack(_ placed: [Placement]) async {
        let client = gatewayClient
        await withTaskGroup(of: Void.self) { group in
            for placement in placed {
                group.addTask { try? await client.delete(ruleID: placement.ruleID, gateway: placement.gateway, key: placement.key) }
            }
        }
    }

    /// Ends the reservations of rules whose push failed or was taken back. A
    /// reservation left behind only lets a registration keep a rule that
    /// `takeBack` could not delete, until `PendingRule.lifetime` ends it.
    private func release(_ ids: [String], logger: Logger) async {
        do {
            try await store.releaseRules(ids: ids)
        } catch {
            logger.warning("connect: could not end the reservation of rule(s) \(ids.joined(separator: ", ")): \(error)")
        }
    }

    /// `DELETE /v1/connect/{rule_id}`: removes the rule on its gateway, then here.
    /// A gateway that is offline is not asked: it drops the rule when it
    /// registers again (it is missing from `keep`).
    private func disconnect(_ context: BrokerRequestContext) async throws -> Response {
        let user = try context.requireUser()
        let ruleID = context.parameters.get("rule_id") ?? ""
        guard (1...64).contains(ruleID.utf8.count), ruleID.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else {
            throw APIError.badField("rule_id", "must be the rule_id a connect call answered (lower-case hex), got \(Validate.quotedForAPI(ruleID))")
        }
        // The rule, every rule of its connect call (one per gateway of an E
        // cluster), their gateways and keys: one store read (issue 15).
        let reading = try await store.disconnectReading(ruleID: ruleID)
        let rule = reading.rule
        guard rule.userID == user.id || user.role == .admin else {
            throw APIError(.forbidden, "rule \(ruleID) belongs to another user")
        }
        let rules = reading.rules.map(\.rule)
        let now = clock()
        var deletes: [(rule: GatewayRule, gateway: Gateway, key: ControlKey)] = []
        for placed in reading.rules {
            if placed.gateway.isLive(now: now, offlineAfter: TimeInterval(configuration.offlineAfter)), let key = placed.controlKey {
                deletes.append((placed.rule, placed.gateway, key))
            }
        }
        // Every gateway at once (issue 15); the first failure in the cluster's order is the answer.
        let client = gatewayClient
        let failures = await withTaskGroup(of: (Int, GatewayCallError?).self) { group in
            for (index, entry) in deletes.enumerated() {
                group.addTask {
                    do throws(GatewayCallError) {
                        try await client.delete(ruleID: entry.rule.id, gateway: entry.gateway, key: entry.key)
                        return (index, nil)
                    } catch {
                        return (index, error)
                    }
                }
            }
            var found: [(Int, GatewayCallError)] = []
            for await (index, error) in group { if let error { found.append((index, error)) } }
            return found.sorted { $0.0 < $1.0 }
        }
        if let (index, error) = failures.first {
            context.logger.warning("disconnect rule \(deletes[index].rule.id): \(error)")
            throw APIError(.badGateway, error.description)
        }
        try await store.deleteRules(connectionID: rule.connectionID)
        context.logger.info("disconnect: rule \(rule.connectionID) on gateway(s) \(rules.map { "\($0.gatewayID)" }.joined(separator: ", "))")
        return Response(status: .noContent)
    }

    private static func ruleProtocol(_ transport: Transport) -> RuleProtocol {
        switch transport {
        case .tcp: .tcp
        case .udp: .udp
        case .both: .both
        }
    }

    /// What a connect call reads; 404 naming `desktop_id` when there is no such desktop.
    private func readingForConnect(_ id: Int64) async throws -> ConnectReading {
        do {
            return try await store.connectReading(desktopID: id)
        } catch {
            if case .notFound(let message) = error { throw APIError(.notFound, "desktop_id: \(message)", field: "desktop_id") }
            throw error
        }
    }

    /// `GatewayChooser.choose`, its errors as 409 (no route) and 503 (none online).
    private static func choose(desktop: Desktop, gateways: [Gateway], cluster: GatewayCluster?, ruleCounts: [Int64: Int],
                               loginGatewayID: Int64?, now: Date, offlineAfter: TimeInterval) throws(APIError) -> GatewayChoice {
        do {
            return try GatewayChooser.choose(desktop: desktop, gateways: gateways, cluster: cluster, ruleCounts: ruleCounts,
                                             loginGatewayID: loginGatewayID, now: now, offlineAfter: offlineAfter)
        } catch {
            switch error {
            case .noRoute(let message): throw APIError(.conflict, message)
            case .noneOnline(let message): throw APIError(.serviceUnavailable, message)
            }
        }
    }

    /// `HOST:PORT`, with an IPv6 address in brackets.
    private static func target(_ host: String, _ port: Int) -> String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}

