import Foundation

/// A new value for a field that may be empty: set it, or clear it.
public enum NullableChange<Value: Sendable & Equatable>: Sendable, Equatable {
    case clear
    case set(Value)

    var value: Value? {
        switch self {
        case .clear: nil
        case .set(let value): value
        }
    }
}

/// The fields a create or an update of a gateway sets; nil leaves a field as it is.
/// The read-only fields (`online`, `version`, ...) are not here: only the control
/// plane changes them, through `BrokerStore.recordGatewayState`.
public struct GatewayChanges: Sendable, Equatable {
    public var name: String?
    public var address: String?
    public var addressPrivate: String?
    public var loadBalancerID: NullableChange<Int64>?
    public var useSourceIP: SourceIPMode?
    public var forwardTo: String?
    public var signature: String?
    public var notes: String?
    public var forwardingPath: GatewayForwarding?

    public init(name: String? = nil, address: String? = nil, addressPrivate: String? = nil,
                loadBalancerID: NullableChange<Int64>? = nil, useSourceIP: SourceIPMode? = nil,
                forwardTo: String? = nil, signature: String? = nil, notes: String? = nil,
                forwardingPath: GatewayForwarding? = nil) {
        self.forwardingPath = forwardingPath
        self.name = name
        self.address = address
        self.addressPrivate = addressPrivate
        self.loadBalancerID = loadBalancerID
        self.useSourceIP = useSourceIP
        self.forwardTo = forwardTo
        self.signature = signature
        self.notes = notes
    }

    /// `gateway` with these changes.
    public func applied(to gateway: Gateway) -> Gateway {
        var result = gateway
        if let name { result.name = name }
        if let address { result.address = address }
        if let addressPrivate { result.addressPrivate = addressPrivate }
        if let loadBalancerID { result.loadBalancerID = loadBalancerID.value }
        if let useSourceIP { result.useSourceIP = useSourceIP }
        if let forwardTo { result.forwardTo = forwardTo }
        if let signature { result.signature = signature }
        if let notes { result.notes = notes }
        if let forwardingPath { result.forwardingPath = forwardingPath }
        return result
    }

    /// Checks that a create names the required fields.
    public func requireForCreate() throws(FieldError) {
        if name == nil { throw FieldError("name", "is required (1 to 100 characters)") }
        if address == nil { throw FieldError("address", "is required (an IP address or a DNS name)") }
    }
}

/// The fields a create or an update of a gateway cluster sets; nil leaves a field as it is.
public struct GatewayClusterChanges: Sendable, Equatable {
    public var name: String?
    public var address: String?
    public var loadBalanceVia: LoadBalanceMethod?
    public var useSourceIP: SourceIPMode?
    public var notes: String?

    public init(name: String? = nil, address: String? = nil, loadBalanceVia: LoadBalanceMethod? = nil,
                useSourceIP: SourceIPMode? = nil, notes: String? = nil) {
        self.name = name
        self.address = address
        self.loadBalanceVia = loadBalanceVia
        self.useSourceIP = useSourceIP
        self.notes = notes
    }

    public func applied(to cluster: GatewayCluster) -> GatewayCluster {
        var result = cluster
        if let name { result.name = name }
        if let address { result.address = address }
        if let loadBalanceVia { result.loadBalanceVia = loadBalanceVia }
        if let useSourceIP { result.useSourceIP = useSourceIP }
        if let notes { result.notes = notes }
        return result
    }

    public func requireForCreate() throws(FieldError) {
        if name == nil { throw FieldError("name", "is required (1 to 100 characters)") }
        if loadBalanceVia == nil { throw FieldError("load_balance_via", "is required (E, P or L)") }
    }
}

/// The fields a create or an update of a desktop sets; nil leaves a field as it is.
public struct DesktopChanges: Sendable, Equatable {
    public var name: String?
    public var address: String?
    public var protocols: [DesktopProtocol]?
    public var gatewayID: NullableChange<Int64>?
    public var loadBalancerID: NullableChange<Int64>?
    public var notes: String?
    /// The entitled users (replaces the list); [] opens the desktop to everyone.
    public var users: [Int64]?

    public init(name: String? = nil, address: String? = nil, protocols: [DesktopProtocol]? = nil,
                gatewayID: NullableChange<Int64>? = nil, loadBalancerID: NullableChange<Int64>? = nil,
                notes: String? = nil, users: [Int64]? = nil) {
        self.name = name
        self.address = address
        self.protocols = protocols
        self.gatewayID = gatewayID
        self.loadBalancerID = loadBalancerID
        self.notes = notes
        self.users = users
    }

    public func applied(to desktop: Desktop) -> Desktop {
        var result = desktop
        if let name { result.name = name }
        if let address { result.address = address }
        if let protocols { result.protocols = protocols }
        if let gatewayID { result.gatewayID = gatewayID.value }
        if let loadBalancerID { result.loadBalancerID = loadBalancerID.value }
        if let notes { result.notes = notes }
        if let users { result.users = Array(Set(users)).sorted() }
        return result
    }

    public func requireForCreate() throws(FieldError) {
        if name == nil { throw FieldError("name", "is required (1 to 100 characters)") }
        if address == nil { throw FieldError("address", "is required (an IP address or a DNS name)") }
        if protocols == nil { throw FieldError("protocols", "is required: at least one protocol with its port") }
    }
}

/// The fields a create or an update of a user sets; nil leaves a field as it is.
/// The password arrives here already hashed (`PasswordHasher`), never in clear.
public struct UserChanges: Sendable, Equatable {
    public var login: String?
    public var passwordHash: String?
    public var displayName: String?
    public var role: UserRole?
    public var enabled: Bool?

    public init(login: String? = nil, passwordHash: String? = nil, displayName: String? = nil,
                role: UserRole? = nil, enabled: Bool? = nil) {
        self.login = login
        self.passwordHash = passwordHash
        self.displayName = displayName
        self.role = role
        self.enabled = enabled
    }

    public func applied(to user: User) -> User {
        var result = user
        if let login { result.login = login }
        if let displayName { result.displayName = displayName }
        if let role { result.role = role }
        if let enabled { result.enabled = enabled }
        return result
    }

    public func requireForCreate() throws(FieldError) {
        if login == nil { throw FieldError("login", "is required (1 to 64 characters)") }
        if passwordHash == nil { throw FieldError("password", "is required (3 to 100 characters)") }
    }
}
