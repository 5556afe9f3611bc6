import BrokerCore
import ControlProtocol
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import NIOSSL
import Logging
import NIOCore
import ServiceLifecycle
import ServiceSupport
import Synchronization
import SystemLayer

/// Settings of the REST API.
public struct BrokerAPIConfiguration: Sendable {
    /// Request bodies larger than this are refused with 413.
    public var maxBodyBytes: Int
    /// How long a session lasts after login.
    public var sessionLifetime: TimeInterval
    public var passwordHasher: PasswordHasher
    /// Reported by `system/health`.
    public var version: String
    /// The folder whose filesystem's free space `system/health` reports (the database's).
    public var dataPath: String
    /// Seconds between a gateway's heartbeats (told to it at registration).
    public var heartbeatInterval: Int
    /// Seconds without a heartbeat after which a gateway is offline.
    public var offlineAfter: Int
    /// Seconds a pushed rule may stay unused after its creation before the gateway removes it.
    public var ruleUnusedExpiry: Int
    /// How long one call to a gateway's control API may take.
    public var gatewayCallTimeout: TimeInterval
    /// How long a new connection may take to show whether it starts with a
    /// PROXY header and, if so, to complete it; closed after that.
    public var proxyHeaderTimeout: TimeInterval

    public init(maxBodyBytes: Int = 1 << 20, sessionLifetime: TimeInterval = 8 * 3600,
                passwordHasher: PasswordHasher = PasswordHasher(), version: String, dataPath: String,
                heartbeatInterval: Int = 10, offlineAfter: Int = 30, ruleUnusedExpiry: Int = 300,
                gatewayCallTimeout: TimeInterval = 5, proxyHeaderTimeout: TimeInterval = 10) {
        self.maxBodyBytes = maxBodyBytes
        self.sessionLifetime = sessionLifetime
        self.passwordHasher = passwordHasher
        self.version = version
        self.dataPath = dataPath
        self.heartbeatInterval = heartbeatInterval
        self.offlineAfter = offlineAfter
        self.ruleUnusedExpiry = ruleUnusedExpiry
        self.gatewayCallTimeout = gatewayCallTimeout
        self.proxyHeaderTimeout = proxyHeaderTimeout
    }
}

/// The addresses the server listens on, filled in once it is bound.
public final class ListenerRegistry: Sendable {
    private let addresses = Mutex<[String]>([])

    public init() {}

    public func add(_ address: String) { addresses.withLock { $0.append(address) } }
    public var all: [String] { addresses.withLock { $0 } }
}

/// The broker's REST API: Leostream-compatible `session`, `gateways`,
/// `gateway-clusters` and `system/health`, and the product's own `desktops` and
/// `users`, each under `/v1` and `/rest/v1`.
public struct BrokerAPI: Sendable {
    public static let prefixes = ["v1", "rest/v1"]

    let store: any BrokerStore
    let configuration: BrokerAPIConfiguration
    let listeners: ListenerRegistry
    let clock: @Sendable () -> Date
    /// Nonces of gateway-to-broker requests seen within the freshness window: one per process.
    let replayGuard = ReplayGuard()
    let gatewayClient: GatewayControlClient

    public init(store: any BrokerStore, configuration: BrokerAPIConfiguration, listeners: ListenerRegistry = ListenerRegistry(),
                clock: @escaping @Sendable () -> Date = { Date() }) {
        self.store = store
        self.configuration = configuration
        self.listeners = listeners
        self.clock = clock
        gatewayClient = GatewayControlClient(timeout: .milliseconds(Int64(configuration.gatewayCallTimeout * 1000)))
    }

    /// The router with every route under both prefixes.
    public func router() -> Router<BrokerRequestContext> {
        let router = Router(context: BrokerRequestContext.self)
        router.add(middleware: RequestLogMiddleware())
        // Requests by route pattern, method and status (hb_requests_total,
        // http_server_request_duration_seconds) into swift-metrics.
        router.add(middleware: MetricsMiddleware())
        router.add(middleware: ErrorMiddleware())
        // Unauthenticated like /health elsewhere: counts by route and status only.
        router.get("metrics") { _, _ in
            let bytes = await ServiceMetrics.shared.scrape()
            return Response(status: .ok, headers: [.contentType: ServiceMetrics.contentType],
                            body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
        }
        for prefix in Self.prefixes {
            let api = router.group(RouterPath(prefix))
            api.post("session/login") { request, context in try await self.login(request, context) }
            let authenticated = api.group().add(middleware: BearerAuthentication(store: store, clock: clock))
            authenticated.post("session/logout") { _, context in try await self.logout(context) }
            authenticated.get("system/health") { _, context in try await self.health(context) }
            for resource in resources() {
                register(resource, on: authenticated)
            }
            addControlPlaneRoutes(api: api, authenticated: authenticated)
        }
        addPCoIPRoutes(router)
        return router
    }

    /// A Hummingbird application serving `router()` on `address`.
    /// - Parameter tls: when given, the listener speaks HTTPS (after any PROXY
    ///   v2 header, which a gateway's broker forwarding sends in clear first).
    public func application(address: BindAddress, logger: Logger, tls: TLSConfiguration? = nil,
                            services: [any Service] = [],
                            onServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in })
        -> some ApplicationProtocol
    {
        let listeners = self.listeners
        let store = self.store
        let clock = self.clock
        let headerTimeout = TimeAmount.nanoseconds(Int64(configuration.proxyHeaderTimeout * 1e9))
        // Broker forwarding: a gateway's PROXY v2 header, checked before HTTP sees a byte.
        let makeHandler = { @Sendable in
            ProxyHeaderHandler(keys: { id in (try? await store.controlKey(gatewayID: id)) ?? nil },
                               clock: clock, headerTimeout: headerTimeout, logger: logger)
        }
        let server = HTTPServerBuilder { responder in
            // An idle keep-alive connection is closed after 60 s (nginx's keepalive_timeout is 75 s).
            let http = HTTP1Channel(responder: responder, configuration: .init(idleTimeout: .seconds(60)))
            if let tls {
                // The PROXY header comes first in clear, then the TLS handshake, then HTTP.
                return try ProxyProtocolChannel(base: TLSChannel(http, tlsConfiguration: tls), makeHandler: makeHandler)
            }
            return ProxyProtocolChannel(base: http, makeHandler: makeHandler)
        }
        var app = Application(router: router(), server: server, configuration: .init(address: address, serverName: nil),
                           onServerRunning: { channel in
                               if let local = channel.localAddress, let ip = local.ipAddress, let port = local.port {
                                   listeners.add(ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)")
                               }
                               await onServerRunning(channel)
                           },
                           logger: logger)
        app.addServices(GatewayOfflineMonitor(store: store, offlineAfter: TimeInterval(configuration.offlineAfter),
                                              clock: clock, logger: logger))
        app.addServices(services)
        return app
    }

    // MARK: Sessions

    private static let loginFields: Set<String> = ["user_login", "password", "domain"]

    private func login(_ request: Request, _ context: BrokerRequestContext) async throws -> Response {
        var request = request
        let data = try await body(&request)
        let value: JSONValue
        let contentType = request.headers[.contentType]?.lowercased() ?? ""
        // `curl -d '{...}'` labels JSON as a form: a body that opens with `{` is JSON.
        let looksLikeJSON = data.first(where: { ![0x20, 0x09, 0x0A, 0x0D].contains($0) }) == UInt8(ascii: "{")
        if contentType.hasPrefix("application/x-www-form-urlencoded") && !looksLikeJSON {
            value = try Self.parseForm(data)
        } else {
            value = try JSONValue.parse(data)
        }
        let reader = try FieldReader(value, known: Self.loginFields, policy: .leostream)
        guard let login = try reader.string("user_login") else {
            throw APIError.badField("user_login", "is required")
        }
        guard let password = try reader.string("password") else {
            throw APIError.badField("password", "is required")
        }
        try validating { () throws(FieldError) in
            try Validate.name(login, field: "user_login", length: Limits.loginLength)
            try Validate.password(password)
        }
        if let domain = try reader.string("domain", nullAs: "") {
            // Local users only for now: the domain is checked and otherwise not used.
            try validating { () throws(FieldError) in try Validate.token(domain, field: "domain", max: Limits.domainMaxLength) }
        }

        let user: User
        switch try await checkPassword(login: login, password: password) {
        case .unknownLogin:
            context.logger.notice("login refused: unknown user_login")
            throw APIError.unauthorized("wrong user_login or password")
        case .wrongPassword(let who):
            context.logger.notice("login refused: wrong password for '\(who.login)'")
            throw APIError.unauthorized("wrong user_login or password")
        case .disabled(let who):
            throw APIError(.forbidden, "user '\(who.login)' is disabled and may not use the API")
        case .accepted(let who):
            user = who
        }
        let token = try await openSession(for: user, context)
        context.logger.info("login: '\(user.login)' (\(user.role.rawValue))\(context.loginGatewayID.map { " through gateway \($0)" } ?? "")")
        return .json(["sid": .string(token)])
    }

    private func logout(_ context: BrokerRequestContext) async throws -> Response {
        guard let authenticated = context.authenticated else {
            throw APIError.unauthorized("not logged in")
        }
        try await store.deleteSession(tokenHash: authenticated.session.tokenHash)
        context.logger.info("logout: '\(authenticated.user.login)'")
        return .json([:])
    }

    private static let decoyHash = Mutex<[UInt8: String]>([:])

    /// A hash to verify against when the login is unknown, made once per cost.
    /// What a login's password check came to.
    enum PasswordCheck {
        case accepted(User)
        case unknownLogin
        case wrongPassword(User)
        case disabled(User)
    }

    /// Checks `password` for `login` (bcrypt, off the async executor). An
    /// unknown login costs the time a wrong password would, so timing does
    /// not tell which logins exist. Shared by the REST login and the PCoIP
    /// broker protocol's authenticate.
    func checkPassword(login: String, password: String) async throws -> PasswordCheck {
        let hasher = configuration.passwordHasher
        guard let credentials = try await store.credentials(login: login) else {
            _ = await hasher.verified(password, against: await Self.decoy(hasher))
            return .unknownLogin
        }
        guard await hasher.verified(password, against: credentials.passwordHash) else { return .wrongPassword(credentials.user) }
        guard credentials.user.enabled else { return .disabled(credentials.user) }
        return .accepted(credentials.user)
    }

    /// A new session for `user` (expired ones are cleared first). - Returns: its token.
    func openSession(for user: User, _ context: BrokerRequestContext) async throws -> String {
        let now = clock()
        try await store.deleteExpiredSessions(now: now)
        let token = Secrets.token()
        try await store.createSession(Session(tokenHash: Secrets.sha256Hex(token), userID: user.id, created: now,
                                              expires: now.addingTimeInterval(configuration.sessionLifetime),
                                              clientAddress: context.clientAddress, loginGatewayID: context.loginGatewayID))
        return token
    }

    /// Made off the async executor, like every bcrypt.
    static func decoy(_ hasher: PasswordHasher) async -> String {
        if let hash = decoyHash.withLock({ $0[hasher.cost] }) { return hash }
        let hash = await hasher.hashed(Secrets.token())
        decoyHash.withLock { $0[hasher.cost] = hash }
        return hash
    }

    /// `a=1&b=2` with `+` and %-escapes, into a JSON object of strings.
    static func parseForm(_ data: Data) throws(APIError) -> JSONValue {
        guard let text = String(data: data, encoding: .utf8) else {
            throw APIError(.badRequest, "malformed form body: not UTF-8")
        }
        var object: [String: JSONValue] = [:]
        for pair in text.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let decode = { (part: Substring) -> String? in
                String(part).replacingOccurrences(of: "+", with: " ").removingPercentEncoding
            }
            guard let key = decode(parts[0]), let value = decode(parts.count > 1 ? parts[1] : "") else {
                throw APIError(.badRequest, "malformed form body: bad %-escape in '\(pair.prefix(40))'")
            }
            object[key] = .string(value)
        }
        return .object(object)
    }

    // MARK: Health

    private func health(_ context: BrokerRequestContext) async throws -> Response {
        let database = await store.health()
        var body: [String: JSONValue] = ["version": .string(configuration.version)]
        var problems: [String] = []

        var databaseJSON: [String: JSONValue] = [
            "status": .string(database.isHealthy ? "ok" : "unavailable"),
            "location": .string(database.location),
        ]
        if let schema = database.schema { databaseJSON["schema_version"] = .string(schema.version) }
        if let problem = database.problem {
            databaseJSON["problem"] = .string(problem)
            problems.append(problem)
        }
        body["database"] = .object(databaseJSON)

        body["listeners"] = .array(listeners.all.map { .object(["address": .string($0), "status": "listening"]) })

        if database.isHealthy, let gateways = try? await store.gateways() {
            let online = gateways.filter(\.online).count
            body["gateways"] = ["status": "ok", "registered": .int(Int64(gateways.count)),
                                "online": .int(Int64(online)), "offline": .int(Int64(gateways.count - online))]
        } else {
            body["gateways"] = ["status": "unknown"]
        }

        let dataPath = configuration.dataPath
        let host = await BlockingExecutor.shared.run { HostStatus.current(diskPath: dataPath) }
        var load: [String: JSONValue] = ["cpus": .int(Int64(host.cpus)),
                                         "memory_total_bytes": .int(Int64(clamping: host.memoryTotalBytes))]
        if let available = host.memoryAvailableBytes { load["memory_available_bytes"] = .int(Int64(clamping: available)) }
        if let average = host.loadAverage { load["load_average"] = .array(average.map { .double($0) }) }
        body["load"] = .object(load)
        if let disk = host.disk {
            body["disk"] = ["path": .string(disk.path), "free_bytes": .int(Int64(clamping: disk.freeBytes)),
                            "total_bytes": .int(Int64(clamping: disk.totalBytes)),
                            "status": .string(HostStatus.diskNearlyFull(disk) ? "nearly full" : "ok")]
        }
        let hostProblems = host.problems
        problems += hostProblems

        let status: String = !database.isHealthy ? "unavailable" : (hostProblems.isEmpty ? "ok" : "degraded")
        body["status"] = .string(status)
        if !problems.isEmpty { body["problems"] = .array(problems.map { .string($0) }) }
        if !database.isHealthy {
            context.logger.error("health: \(database.problem ?? "database unavailable")")
            // The error field too, as every 5xx carries one.
            body["error"] = .string(database.problem ?? "database unavailable")
            return .json(.object(body), status: .serviceUnavailable)
        }
        return .json(.object(body))
    }

    // MARK: Resources

    /// One collection and its five calls.
    struct Resource: Sendable {
        let path: String
        let noun: String
        let policy: FieldReader.Policy
        let known: Set<String>
        let readOnly: Set<String>
        let list: @Sendable () async throws -> [JSONValue]
        let get: @Sendable (Int64) async throws -> JSONValue
        let create: @Sendable (FieldReader, Date) async throws -> JSONValue
        let update: @Sendable (Int64, FieldReader, Date) async throws -> JSONValue
        let delete: @Sendable (Int64) async throws -> Void
    }

    private func resources() -> [Resource] {
        let store = self.store
        let hasher = configuration.passwordHasher
        let summary: @Sendable (Int64, String) -> JSONValue = { id, name in ["id": .int(id), "name": .string(name)] }
        return [
            Resource(path: "gateways", noun: "gateway", policy: .leostream,
                     known: Gateway.writableFields, readOnly: Gateway.readOnlyFields,
                     list: { try await store.gateways().map { summary($0.id, $0.name) } },
                     get: { try await store.gateway(id: $0).json },
                     create: { try await store.createGateway(Gateway.changes(from: $0), now: $1).json },
                     update: { try await store.updateGateway(id: $0, Gateway.changes(from: $1), now: $2).json },
                     delete: { try await store.deleteGateway(id: $0) }),
            Resource(path: "gateway-clusters", noun: "gateway cluster", policy: .leostream,
                     known: GatewayCluster.writableFields, readOnly: GatewayCluster.readOnlyFields,
                     list: { try await store.gatewayClusters().map { summary($0.id, $0.name) } },
                     get: { try await store.gatewayCluster(id: $0).json },
                     create: { try await store.createGatewayCluster(GatewayCluster.changes(from: $0), now: $1).json },
                     update: { try await store.updateGatewayCluster(id: $0, GatewayCluster.changes(from: $1), now: $2).json },
                     delete: { try await store.deleteGatewayCluster(id: $0) }),
            Resource(path: "desktops", noun: "desktop", policy: .strict,
                     known: Desktop.writableFields, readOnly: Desktop.readOnlyFields,
                     list: { try await store.desktops().map(\.json) },
                     get: { try await store.desktop(id: $0).json },
                     create: { try await store.createDesktop(Desktop.changes(from: $0), now: $1).json },
                     update: { try await store.updateDesktop(id: $0, Desktop.changes(from: $1), now: $2).json },
                     delete: { try await store.deleteDesktop(id: $0) }),
            Resource(path: "users", noun: "user", policy: .strict,
                     known: User.writableFields, readOnly: User.readOnlyFields,
                     list: { try await store.users().map(\.json) },
                     get: { try await store.user(id: $0).json },
                     create: { reader, now in
                         var (changes, password) = try User.changes(from: reader)
                         // Check the rest before spending a bcrypt on it.
                         try changes.requireForCreate(passwordGiven: password != nil)
                         if let password { changes.passwordHash = await hasher.hashed(password) }
                         return try await store.createUser(changes, now: now).json
                     },
                     update: { id, reader, now in
                         var (changes, password) = try User.changes(from: reader)
                         if let password { changes.passwordHash = await hasher.hashed(password) }
                         return try await store.updateUser(id: id, changes, now: now).json
                     },
                     delete: { try await store.deleteUser(id: $0) }),
        ]
    }

    private func register(_ resource: Resource, on group: RouterGroup<BrokerRequestContext>) {
        let collection = RouterPath(resource.path)
        let item = RouterPath("\(resource.path)/:id")
        group.get(collection) { _, context in
            _ = try context.requireAdmin()
            return Response.json(.array(try await resource.list()))
        }
        group.get(item) { _, context in
            _ = try context.requireAdmin()
            return Response.json(try await resource.get(try Self.id(context)))
        }
        group.post(collection) { request, context in
            _ = try context.requireAdmin()
            var request = request
            let reader = try FieldReader(try JSONValue.parse(try await self.body(&request)), known: resource.known,
                                         readOnly: resource.readOnly, policy: resource.policy)
            let stored = try await resource.create(reader, self.clock())
            context.logger.info("created \(resource.noun) \(Self.idText(stored))")
            return Response.json(Self.storedData(stored, reader), status: .created)
        }
        group.put(item) { request, context in
            _ = try context.requireAdmin()
            let id = try Self.id(context)
            var request = request
            let reader = try FieldReader(try JSONValue.parse(try await self.body(&request)), known: resource.known,
                                         readOnly: resource.readOnly, policy: resource.policy)
            let stored = try await resource.update(id, reader, self.clock())
            context.logger.info("updated \(resource.noun) \(id)")
            return Response.json(Self.storedData(stored, reader))
        }
        group.delete(item) { _, context in
            _ = try context.requireAdmin()
            let id = try Self.id(context)
            try await resource.delete(id)
            context.logger.info("deleted \(resource.noun) \(id)")
            return Response(status: .noContent)
        }
    }

    /// `{"stored_data": ..., "warnings": [...], "extra_fields": [...]}`, the lists only when not empty.
    private static func storedData(_ stored: JSONValue, _ reader: FieldReader) -> JSONValue {
        var body: [String: JSONValue] = ["stored_data": stored]
        if !reader.warnings.isEmpty { body["warnings"] = .array(reader.warnings.map { .string($0) }) }
        if !reader.extraFields.isEmpty { body["extra_fields"] = .array(reader.extraFields.map { .string($0) }) }
        return .object(body)
    }

    private static func idText(_ stored: JSONValue) -> String {
        if case .object(let object) = stored, case .int(let id)? = object["id"] { return "\(id)" }
        return "?"
    }

    /// The `:id` of the path: a positive integer, or 400.
    static func id(_ context: BrokerRequestContext) throws(APIError) -> Int64 {
        let text = context.parameters.get("id") ?? ""
        guard let id = Int64(text), id > 0 else {
            throw APIError.badField("id", "must be a positive integer, got \(Validate.quotedForAPI(text))")
        }
        return id
    }

    /// The request body, at most `maxBodyBytes`; 413 beyond.
    func body(_ request: inout Request) async throws(APIError) -> Data {
        let limit = configuration.maxBodyBytes
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > limit {
            throw APIError(.contentTooLarge, "request body of \(declared) bytes is larger than the limit of \(limit) bytes")
        }
        do {
            let buffer = try await request.collectBody(upTo: limit)
            return Data(buffer.readableBytesView)
        } catch is NIOTooManyBytesError {
            throw APIError(.contentTooLarge, "request body is larger than the limit of \(limit) bytes")
        } catch {
            throw APIError(.badRequest, "cannot read the request body: \(error)")
        }
    }
}

extension UserChanges {
    /// Like `requireForCreate`, before the password is hashed.
    func requireForCreate(passwordGiven: Bool) throws(APIError) {
        if login == nil { throw APIError.badField("login", "is required (1 to 64 characters)") }
        if !passwordGiven { throw APIError.badField("password", "is required (3 to 100 characters)") }
    }
}

extension Validate {
    /// `value` quoted and shortened for an error message.
    static func quotedForAPI(_ value: String) -> String {
        value.count > 40 ? "'\(value.prefix(40))…'" : "'\(value)'"
    }
}
