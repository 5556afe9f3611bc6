import ControlProtocol
import Foundation

/// One row of a query, as both stores read it: the embedded SQLite store
/// (GRDB's `Row`) and the PostgreSQL one. The mapping from rows to the
/// domain types and the error texts live here once, so the two stores
/// answer alike to the letter (the store tests run on both).
public protocol StoreRecord {
    func int64(_ column: String) throws -> Int64
    func optionalInt64(_ column: String) throws -> Int64?
    func int(_ column: String) throws -> Int
    func optionalInt(_ column: String) throws -> Int?
    func string(_ column: String) throws -> String
    func optionalString(_ column: String) throws -> String?
    func bool(_ column: String) throws -> Bool
    func date(_ column: String) throws -> Date
    func optionalDate(_ column: String) throws -> Date?
    func optionalDouble(_ column: String) throws -> Double?
}

/// The columns each store selects and the domain values built from them.
public enum StoreRecords {
    public static let gatewayColumns = """
        id, name, address, address_private, load_balancer_id, use_src_ip, forward_to, signature, notes,
        online, version, last_heartbeat, key_fingerprint, control_url, port_first, port_last, load, active_sessions,
        forwarding_path, control_certificate, created, updated
        """
    public static let clusterColumns = "id, name, address, load_balance_via, use_src_ip, notes, created, updated"
    public static let desktopColumns = "id, name, address, gateway_id, load_balancer_id, notes, created, updated"
    public static let userColumns = "id, login, display_name, role, enabled, created, updated"
    public static let ruleColumns = "id, gateway_id, desktop_id, user_id, protocol_name, push, port, created, connection_id"

    public static func gateway(_ row: some StoreRecord) throws -> Gateway {
        let first = try row.optionalInt("port_first")
        let last = try row.optionalInt("port_last")
        let range = first.flatMap { first in last.map { PortRange(first: first, last: $0) } }
        var gateway = Gateway(id: try row.int64("id"), name: try row.string("name"), address: try row.string("address"),
                              addressPrivate: try row.string("address_private"),
                              loadBalancerID: try row.optionalInt64("load_balancer_id"),
                              useSourceIP: SourceIPMode(rawValue: try row.int("use_src_ip")) ?? .randomPortOpen,
                              forwardTo: try row.string("forward_to"), signature: try row.string("signature"),
                              notes: try row.string("notes"), online: try row.bool("online"), version: try row.string("version"),
                              lastHeartbeat: try row.optionalDate("last_heartbeat"),
                              keyFingerprint: try row.optionalString("key_fingerprint"), controlURL: try row.string("control_url"),
                              portRange: range, load: try row.optionalDouble("load"),
                              activeSessions: try row.optionalInt("active_sessions"),
                              created: try row.date("created"), updated: try row.date("updated"))
        gateway.forwardingPath = GatewayForwarding(rawValue: try row.string("forwarding_path")) ?? .gatewayDefault
        gateway.controlCertificate = try row.optionalString("control_certificate")
        return gateway
    }

    public static func cluster(_ row: some StoreRecord) throws -> GatewayCluster {
        GatewayCluster(id: try row.int64("id"), name: try row.string("name"), address: try row.string("address"),
                       loadBalanceVia: LoadBalanceMethod(rawValue: try row.string("load_balance_via")) ?? .everyGateway,
                       useSourceIP: SourceIPMode(rawValue: try row.int("use_src_ip")) ?? .randomPortOpen,
                       notes: try row.string("notes"), created: try row.date("created"), updated: try row.date("updated"))
    }

    public static func desktop(_ row: some StoreRecord, protocols: [DesktopProtocol], users: [Int64]) throws -> Desktop {
        Desktop(id: try row.int64("id"), name: try row.string("name"), address: try row.string("address"), protocols: protocols,
                gatewayID: try row.optionalInt64("gateway_id"), loadBalancerID: try row.optionalInt64("load_balancer_id"),
                notes: try row.string("notes"), users: users, created: try row.date("created"), updated: try row.date("updated"))
    }

    public static func desktopProtocol(_ row: some StoreRecord) throws -> DesktopProtocol {
        DesktopProtocol(name: try row.string("name"), port: try row.int("port"),
                        transport: Transport(rawValue: try row.string("transport")) ?? .tcp)
    }

    public static func user(_ row: some StoreRecord) throws -> User {
        User(id: try row.int64("id"), login: try row.string("login"), displayName: try row.string("display_name"),
             role: UserRole(rawValue: try row.string("role")) ?? .user, enabled: try row.bool("enabled"),
             created: try row.date("created"), updated: try row.date("updated"))
    }

    /// A session joined with its user (`session_created` for the session's own creation time).
    public static func authenticatedSession(_ row: some StoreRecord) throws -> AuthenticatedSession {
        let session = Session(tokenHash: try row.string("token_hash"), userID: try row.int64("user_id"),
                              created: try row.date("session_created"), expires: try row.date("expires"),
                              clientAddress: try row.string("client_address"),
                              loginGatewayID: try row.optionalInt64("login_gateway_id"))
        return AuthenticatedSession(session: session, user: try user(row))
    }

    public static func rule(_ row: some StoreRecord) throws -> GatewayRule {
        let text = try row.string("push")
        let push = try JSONDecoder().decode(RulePush.self, from: Data(text.utf8))
        return GatewayRule(id: try row.string("id"), gatewayID: try row.int64("gateway_id"),
                           desktopID: try row.optionalInt64("desktop_id"), userID: try row.optionalInt64("user_id"),
                           protocolName: try row.string("protocol_name"), push: push, port: try row.int("port"),
                           created: try row.date("created"), connectionID: try row.optionalString("connection_id"))
    }

    /// The rule's push as stored (JSON text).
    public static func pushText(_ rule: GatewayRule) -> String {
        String(decoding: ControlJSON.encodePush(rule.push), as: UTF8.self)
    }
}

/// The sentences both stores answer with, so they answer alike.
public enum StoreMessages {
    public static func noGateway(_ id: Int64) -> StoreError { .notFound("no gateway with id \(id)") }
    public static func noCluster(_ id: Int64) -> StoreError { .notFound("no gateway cluster with id \(id)") }
    public static func noDesktop(_ id: Int64) -> StoreError { .notFound("no desktop with id \(id)") }
    public static func noUser(_ id: Int64) -> StoreError { .notFound("no user with id \(id)") }
    public static func noRule(_ id: String) -> StoreError { .notFound("no connection rule with id \(Validate.quoted(id))") }
    public static func noConnection(_ id: String) -> StoreError { .notFound("no connection with rule_id \(Validate.quoted(id))") }

    public static func missingReference(field: String, what: String, id: Int64) -> StoreError {
        .invalid(FieldError(field, "no \(what) with id \(id)"))
    }

    public static func duplicate(column: String, what: String, value: String, existing: Int64) -> StoreError {
        .conflict(field: column, message: "\(what) \(Validate.quoted(value)) already exists (id \(existing))")
    }

    public static func gatewayInUse(_ id: Int64, desktops: Int, rules: Int) -> StoreError? {
        if desktops > 0 { return .inUse("gateway \(id) is in use: \(desktops) desktop(s) name it in gateway_id") }
        if rules > 0 { return .inUse("gateway \(id) is in use: it carries \(rules) connection rule(s) (DELETE /v1/connect/{rule_id} first)") }
        return nil
    }

    public static func clusterInUse(_ id: Int64, gateways: Int, desktops: Int) -> StoreError? {
        guard gateways + desktops > 0 else { return nil }
        return .inUse("gateway cluster \(id) is in use: \(gateways) gateway(s) and \(desktops) desktop(s) name it in load_balancer_id")
    }

    public static func desktopInUse(_ id: Int64, rules: Int) -> StoreError? {
        guard rules > 0 else { return nil }
        return .inUse("desktop \(id) is in use: \(rules) connection rule(s) lead to it (DELETE /v1/connect/{rule_id} first)")
    }

    public static func lastAdminChange(_ id: Int64) -> StoreError {
        .inUse("user \(id) is the last enabled admin: its role and enabled cannot change until another admin exists")
    }

    public static func lastAdminDelete(_ id: Int64) -> StoreError {
        .inUse("user \(id) is the last enabled admin and cannot be deleted")
    }

    /// A stored control key read back; a damaged one is the database's problem, named.
    public static func controlKey(_ text: String?, gatewayID: Int64, location: String) throws(StoreError) -> ControlKey? {
        guard let text else { return nil }
        do {
            return try ControlKey(text: text)
        } catch {
            throw StoreError.unavailable("database \(location): the control key of gateway \(gatewayID) is damaged (\(error)); enroll the gateway again")
        }
    }

    /// Runs a validation and turns its `FieldError` into `StoreError.invalid`.
    public static func check(_ body: () throws(FieldError) -> Void) throws(StoreError) {
        do { try body() } catch { throw StoreError.invalid(error) }
    }

    /// The ids among `reported` the broker still has for the gateway, first occurrence order.
    public static func keptRules(reported: [String], known: Set<String>) -> [String] {
        var keep: [String] = []
        var listed = Set<String>()
        for ruleID in reported where known.contains(ruleID) && listed.insert(ruleID).inserted {
            keep.append(ruleID)
        }
        return keep
    }

    /// Whether a user's change takes the last enabled admin away.
    public static func removesAdmin(before: User, after: User?) -> Bool {
        let was = before.role == .admin && before.enabled
        guard let after else { return was }
        return was && !(after.role == .admin && after.enabled)
    }
}
