import ControlProtocol
import Foundation

/// Why a store call failed. Every case says what failed in words a user can act on;
/// the HTTP layer maps them to status codes (400, 404, 409, 409, 503).
public enum StoreError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A field is wrong (missing, too long, out of range, names a missing row).
    case invalid(FieldError)
    /// No row with that id: "no gateway with id 7".
    case notFound(String)
    /// The change would break a uniqueness rule: the field and a sentence.
    case conflict(field: String, message: String)
    /// The row is still referenced (or is the last admin) and cannot go.
    case inUse(String)
    /// The database cannot be reached, read or written.
    case unavailable(String)

    public var description: String {
        switch self {
        case .invalid(let error): error.description
        case .notFound(let message): message
        case .conflict(let field, let message): "\(field): \(message)"
        case .inUse(let message): message
        case .unavailable(let message): message
        }
    }
}

/// The schema migrations a database has, against those this build knows.
public struct SchemaStatus: Sendable, Equatable {
    /// Identifiers applied to the database, in order.
    public var applied: [String]
    /// Identifiers this build knows, in order.
    public var known: [String]

    public init(applied: [String], known: [String]) {
        self.applied = applied
        self.known = known
    }

    /// The last migration applied ("none" for an empty database).
    public var version: String { applied.last ?? "none" }
    /// Known migrations not applied yet (they run at the next `serve`).
    public var pending: [String] { known.filter { !applied.contains($0) } }
    /// Applied migrations this build does not know: the database is from a newer broker.
    public var unknown: [String] { applied.filter { !known.contains($0) } }
}

/// The result of a store's self-check.
public struct StoreHealth: Sendable, Equatable {
    /// Where the data lives (`sqlite:/var/lib/...`).
    public var location: String
    /// nil when healthy; otherwise what is wrong, for a person.
    public var problem: String?
    /// The schema, when it could be read.
    public var schema: SchemaStatus?

    public init(location: String, problem: String?, schema: SchemaStatus?) {
        self.location = location
        self.problem = problem
        self.schema = schema
    }

    public var isHealthy: Bool { problem == nil }

    /// The verdict on a schema that could be read: healthy only when it is
    /// exactly the one this build knows (both stores judge alike).
    public static func judging(_ schema: SchemaStatus, location: String) -> StoreHealth {
        if !schema.unknown.isEmpty {
            return StoreHealth(location: location, problem: "database schema has migrations this broker does not know: \(schema.unknown.joined(separator: ", "))", schema: schema)
        }
        if !schema.pending.isEmpty {
            return StoreHealth(location: location, problem: "database schema is not current: pending \(schema.pending.joined(separator: ", ")) (the next start of the broker applies them)", schema: schema)
        }
        return StoreHealth(location: location, problem: nil, schema: schema)
    }
}

/// A user and the stored hash of their password, for the login check only.
public struct Credentials: Sendable, Equatable {
    public var user: User
    public var passwordHash: String

    public init(user: User, passwordHash: String) {
        self.user = user
        self.passwordHash = passwordHash
    }
}

/// A live session and the user it belongs to.
public struct AuthenticatedSession: Sendable, Equatable {
    public var session: Session
    public var user: User

    public init(session: Session, user: User) {
        self.session = session
        self.user = user
    }
}

/// A rule a connect call is pushing to a gateway: the gateway may hold it
/// before the broker stores it (`BrokerStore.reserveRules`).
public struct PendingRule: Sendable, Equatable {
    public var id: String
    public var gatewayID: Int64

    public init(id: String, gatewayID: Int64) {
        self.id = id
        self.gatewayID = gatewayID
    }

    /// How long a reservation counts as known to a registration. A connect
    /// ends its reservations within seconds (its pushes time out far sooner);
    /// only a broker that died mid-connect leaves one behind, and a
    /// registration after this long drops that rule again.
    public static let lifetime: TimeInterval = 600
}

/// What a connect call reads before it pushes a rule (`BrokerStore.connectReading`).
public struct ConnectReading: Sendable {
    public var desktop: Desktop
    /// The gateways that could carry the connection, by id: the desktop's own,
    /// or every member of its cluster. Others are not read.
    public var gateways: [Gateway]
    /// The desktop's cluster, when it names one.
    public var cluster: GatewayCluster?
    /// Active rules per gateway, stored or being pushed (`reserveRules`), only
    /// where the choice uses them (a cluster balanced by `L` or `P`); empty
    /// otherwise. Gateways without any are absent.
    public var ruleCounts: [Int64: Int]
    /// The control keys of the enrolled gateways among `gateways`.
    public var controlKeys: [Int64: ControlKey]

    public init(desktop: Desktop, gateways: [Gateway], cluster: GatewayCluster?, ruleCounts: [Int64: Int],
                controlKeys: [Int64: ControlKey]) {
        self.desktop = desktop
        self.gateways = gateways
        self.cluster = cluster
        self.ruleCounts = ruleCounts
        self.controlKeys = controlKeys
    }
}

extension ConnectReading {
    /// Which gateway rows a connect for `desktop` reads, by `id` or by
    /// `load_balancer_id`: its own gateway, or its cluster's members. The
    /// other is -1, which matches no row.
    public static func candidates(of desktop: Desktop) -> (gatewayID: Int64, clusterID: Int64) {
        if let own = desktop.gatewayID { return (own, -1) }
        return (-1, desktop.loadBalancerID ?? -1)
    }

    /// Whether the choice uses rule counts: a desktop placed by a cluster
    /// that balances by them (`L`, `P`).
    public static func countsRules(desktop: Desktop, cluster: GatewayCluster?) -> Bool {
        desktop.gatewayID == nil && cluster.map { $0.loadBalanceVia != .everyGateway } == true
    }

    /// `candidates(of:)` as an SQL condition on a desktop row and a gateway
    /// row (for a store that reads a connect in one statement).
    public static func candidateCondition(desktop d: String, gateway g: String) -> String {
        "(\(d).gateway_id IS NOT NULL AND \(g).id = \(d).gateway_id) OR (\(d).gateway_id IS NULL AND \(g).load_balancer_id = \(d).load_balancer_id)"
    }

    /// `countsRules(desktop:cluster:)` as an SQL condition on a desktop row
    /// and its cluster's row (NULL when it has none).
    public static func countsRulesCondition(desktop d: String, cluster c: String) -> String {
        "\(d).gateway_id IS NULL AND \(c).id IS NOT NULL AND \(c).load_balance_via <> '\(LoadBalanceMethod.everyGateway.rawValue)'"
    }
}

/// What a disconnect reads before it deletes rules (`BrokerStore.disconnectReading`).
public struct DisconnectReading: Sendable {
    /// One rule of the connect call, where it lives and the gateway's key.
    public struct Placed: Sendable {
        public var rule: GatewayRule
        public var gateway: Gateway
        /// nil when the gateway is no longer enrolled.
        public var controlKey: ControlKey?

        public init(rule: GatewayRule, gateway: Gateway, controlKey: ControlKey?) {
            self.rule = rule
            self.gateway = gateway
            self.controlKey = controlKey
        }
    }

    /// The rule asked for.
    public var rule: GatewayRule
    /// Every rule of its connect call (one per gateway it was pushed to), first rule first.
    public var rules: [Placed]

    public init(rule: GatewayRule, rules: [Placed]) {
        self.rule = rule
        self.rules = rules
    }
}

/// Everything the broker keeps: one interface, so an external PostgreSQL store
/// can stand beside the embedded SQLite one (`SQLiteBrokerStore`).
///
/// Contract for every implementation:
/// - a write either happens whole or not at all: a call that throws changed nothing;
/// - `create*` and `update*` validate every field (`StoreError.invalid`) and every
///   reference, and check uniqueness (`.conflict`) inside the same transaction as the write;
/// - `delete*` refuses a row that something still references (`.inUse`);
/// - names and logins are unique without regard to case;
/// - a database that cannot be reached is `.unavailable`, never a crash.
public protocol BrokerStore: Sendable {
    /// Where the data lives, for logs and `--info` (never holds a password).
    var location: String { get }

    /// The migrations applied and known.
    func schema() async throws(StoreError) -> SchemaStatus
    /// Checks that the database can be reached and read now.
    func health() async -> StoreHealth

    // MARK: Gateways
    func gateways() async throws(StoreError) -> [Gateway]
    func gateway(id: Int64) async throws(StoreError) -> Gateway
    func createGateway(_ changes: GatewayChanges, now: Date) async throws(StoreError) -> Gateway
    func updateGateway(id: Int64, _ changes: GatewayChanges, now: Date) async throws(StoreError) -> Gateway
    func deleteGateway(id: Int64) async throws(StoreError)
    /// Records what the control plane learned about a gateway (heartbeats, version).
    func recordGatewayState(id: Int64, online: Bool, version: String?, heartbeat: Date?) async throws(StoreError)
    /// Stores `key` as the gateway's control key (replacing any earlier one) and its fingerprint.
    func enrollGateway(id: Int64, key: ControlKey, now: Date) async throws(StoreError)
    /// The gateway's control key; nil when there is no such gateway or it is not enrolled.
    func controlKey(gatewayID: Int64) async throws(StoreError) -> ControlKey?
    /// Records a registration (version, control URL, port range), marks the
    /// gateway online with a heartbeat at `now`, and returns the ids among
    /// `registration.ruleIDs` the broker still has for this gateway (`keep`):
    /// its stored rules and the ones reserved for it within
    /// `PendingRule.lifetime` before `now`, read in one snapshot.
    func registerGateway(id: Int64, _ registration: GatewayRegistration, now: Date) async throws(StoreError) -> [String]
    /// Records a heartbeat at `now` with the gateway's load, and marks it online.
    func recordHeartbeat(id: Int64, load: Double, sessions: Int, now: Date) async throws(StoreError)
    /// Marks offline every online gateway whose last heartbeat is before `cutoff`
    /// (or that has none); returns their ids.
    @discardableResult
    func markGatewaysOffline(heartbeatBefore cutoff: Date) async throws(StoreError) -> [Int64]

    // MARK: Rules pushed to gateways
    /// Every rule, or a gateway's.
    func rules(gatewayID: Int64?) async throws(StoreError) -> [GatewayRule]
    func rule(id: String) async throws(StoreError) -> GatewayRule
    /// The rules of one connect call (one per gateway it was pushed to), first rule first.
    func rules(connectionID: String) async throws(StoreError) -> [GatewayRule]
    /// The number of rules per gateway (gateways without rules are absent).
    func ruleCounts() async throws(StoreError) -> [Int64: Int]
    /// Stores the rules of one connect call, all or none, and ends their
    /// reservations (`reserveRules`) in the same transaction.
    func createRules(_ rules: [GatewayRule]) async throws(StoreError)
    /// Marks rules as being pushed, before the push: a gateway that holds one
    /// and registers before the broker stores it must be told to keep it
    /// (a registration's `keep` lists reserved rules as known). Every broker
    /// sharing the database sees the reservation. `createRules` ends it; a
    /// push that failed ends it with `releaseRules`.
    func reserveRules(_ rules: [PendingRule], now: Date) async throws(StoreError)
    /// Ends reservations whose push failed or was taken back (ids without one are ignored).
    func releaseRules(ids: [String]) async throws(StoreError)
    /// Records the port a gateway opened for a rule pushed again.
    func updateRulePort(id: String, port: Int) async throws(StoreError)
    /// Removes a rule; `.notFound` when there is none with that id.
    func deleteRule(id: String) async throws(StoreError)
    /// Removes every rule of a connect call; `.notFound` when there is none.
    func deleteRules(connectionID: String) async throws(StoreError)

    /// What a connect call for `desktopID` needs, read in one snapshot
    /// (issue 15: one store call per connect instead of four or five).
    /// `.notFound` when the desktop, or the cluster it names, does not exist.
    func connectReading(desktopID: Int64) async throws(StoreError) -> ConnectReading
    /// What a disconnect of the connect call that `ruleID` belongs to needs, read
    /// in one snapshot; `.notFound` when there is no rule with that id.
    func disconnectReading(ruleID: String) async throws(StoreError) -> DisconnectReading

    // MARK: Gateway clusters
    func gatewayClusters() async throws(StoreError) -> [GatewayCluster]
    func gatewayCluster(id: Int64) async throws(StoreError) -> GatewayCluster
    func createGatewayCluster(_ changes: GatewayClusterChanges, now: Date) async throws(StoreError) -> GatewayCluster
    func updateGatewayCluster(id: Int64, _ changes: GatewayClusterChanges, now: Date) async throws(StoreError) -> GatewayCluster
    func deleteGatewayCluster(id: Int64) async throws(StoreError)

    // MARK: Desktops
    func desktops() async throws(StoreError) -> [Desktop]
    func desktop(id: Int64) async throws(StoreError) -> Desktop
    func createDesktop(_ changes: DesktopChanges, now: Date) async throws(StoreError) -> Desktop
    func updateDesktop(id: Int64, _ changes: DesktopChanges, now: Date) async throws(StoreError) -> Desktop
    func deleteDesktop(id: Int64) async throws(StoreError)

    // MARK: Users
    func users() async throws(StoreError) -> [User]
    func user(id: Int64) async throws(StoreError) -> User
    func userCount() async throws(StoreError) -> Int
    /// Creates a user; `changes.passwordHash` is required.
    func createUser(_ changes: UserChanges, now: Date) async throws(StoreError) -> User
    /// Updates a user; a new password hash ends the user's other sessions.
    /// Refuses (`.inUse`) to demote or disable the last enabled admin.
    func updateUser(id: Int64, _ changes: UserChanges, now: Date) async throws(StoreError) -> User
    /// Deletes a user and their sessions; refuses the last enabled admin.
    func deleteUser(id: Int64) async throws(StoreError)
    /// The user with this login (any case) and their password hash, or nil.
    func credentials(login: String) async throws(StoreError) -> Credentials?

    // MARK: Sessions
    func createSession(_ session: Session) async throws(StoreError)
    /// The session with this token hash if it has not expired at `now` and its user is enabled.
    func session(tokenHash: String, now: Date) async throws(StoreError) -> AuthenticatedSession?
    func deleteSession(tokenHash: String) async throws(StoreError)
    /// Removes sessions that expired before `now`; returns how many.
    @discardableResult
    func deleteExpiredSessions(now: Date) async throws(StoreError) -> Int
}
