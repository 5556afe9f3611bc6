import ControlProtocol
import Foundation

/// How a gateway (or a cluster) opens a display port for a connection
/// (DESIGN.md, "Broker core"). The raw values are the Leostream API's.
public enum SourceIPMode: Int, Sendable, CaseIterable, Codable {
    /// A random port from the gateway's range; anyone may connect to it.
    case randomPortOpen = 0
    /// The protocol's own port (3389 for RDP, ...), open only to the client's IP.
    case protocolPortClientOnly = 1
    /// A random port from the range, open only to the client's IP.
    case randomPortClientOnly = 2
}

/// How a gateway carries the rules this broker pushes to it
/// (`forwarding_path`): the gateway's own default, or one path for every rule.
public enum GatewayForwarding: String, Sendable, CaseIterable, Codable {
    /// The gateway's config decides (`forwarding` there).
    case gatewayDefault = ""
    case userspace
    case kernel
    case offload
}

/// Where a cluster puts a connection's rule. The raw values are the Leostream API's.
public enum LoadBalanceMethod: String, Sendable, CaseIterable, Codable {
    /// On every gateway of the cluster (they sit behind an external load balancer).
    case everyGateway = "E"
    /// On the gateway the user logged in through.
    case loginGateway = "P"
    /// On the gateway with the fewest active connections.
    case leastConnections = "L"
}

/// A display gateway the broker can push port-forward rules to.
public struct Gateway: Sendable, Equatable {
    public var id: Int64
    /// 1-100 characters, unique (case-insensitively).
    public var name: String
    /// The public IP address or DNS name clients connect to; unique.
    public var address: String
    /// The address the broker uses to reach the gateway ("" when none).
    public var addressPrivate: String
    /// The gateway cluster, if any.
    public var loadBalancerID: Int64?
    public var useSourceIP: SourceIPMode
    /// The broker address the gateway forwards login traffic to ("" when none).
    public var forwardTo: String
    /// The identifier the gateway presents when forwarding ("" when none).
    public var signature: String
    public var notes: String
    // Kept by the control plane, read-only through the API.
    public var online: Bool
    public var version: String
    public var lastHeartbeat: Date?
    /// `Secrets.fingerprint` of the control key the gateway was enrolled with
    /// (nil until enrolled). The key itself never leaves the store except
    /// through `BrokerStore.controlKey(gatewayID:)`.
    public var keyFingerprint: String?
    /// Where the broker reaches the gateway's control API, as it registered ("" until then).
    public var controlURL: String
    /// The display port range the gateway registered with.
    public var portRange: PortRange?
    /// The load of its last heartbeat (one-minute load average per CPU).
    public var load: Double?
    /// Live sessions of its last heartbeat.
    public var activeSessions: Int?
    /// The path its pushed rules take (`forwarding_path`).
    public var forwardingPath: GatewayForwarding = .gatewayDefault
    /// The PEM certificate its https control endpoint registered: the only
    /// one the broker accepts from it (nil for a plain-HTTP endpoint).
    public var controlCertificate: String?
    public var created: Date
    public var updated: Date

    public init(id: Int64, name: String, address: String, addressPrivate: String, loadBalancerID: Int64?,
                useSourceIP: SourceIPMode, forwardTo: String, signature: String, notes: String, online: Bool,
                version: String, lastHeartbeat: Date?, keyFingerprint: String?, controlURL: String = "",
                portRange: PortRange? = nil, load: Double? = nil, activeSessions: Int? = nil,
                created: Date, updated: Date) {
        self.id = id
        self.name = name
        self.address = address
        self.addressPrivate = addressPrivate
        self.loadBalancerID = loadBalancerID
        self.useSourceIP = useSourceIP
        self.forwardTo = forwardTo
        self.signature = signature
        self.notes = notes
        self.online = online
        self.version = version
        self.lastHeartbeat = lastHeartbeat
        self.keyFingerprint = keyFingerprint
        self.controlURL = controlURL
        self.portRange = portRange
        self.load = load
        self.activeSessions = activeSessions
        self.created = created
        self.updated = updated
    }

    /// Whether an administrator has enrolled it (it has a control key).
    public var enrolled: Bool { keyFingerprint != nil }

    /// Online and heard from within `offlineAfter` seconds of `now`: what the
    /// broker goes by when it chooses a gateway, even before the sweep that
    /// marks silent gateways offline has run.
    public func isLive(now: Date, offlineAfter: TimeInterval) -> Bool {
        guard online, let lastHeartbeat else { return false }
        return now.timeIntervalSince(lastHeartbeat) <= offlineAfter
    }

    /// A gateway with every field empty or at its default, the base a create starts from.
    public static func blank(now: Date) -> Gateway {
        Gateway(id: 0, name: "", address: "", addressPrivate: "", loadBalancerID: nil,
                useSourceIP: .randomPortOpen, forwardTo: "", signature: "", notes: "",
                online: false, version: "", lastHeartbeat: nil, keyFingerprint: nil,
                created: now, updated: now)
    }
}

/// What a gateway tells the broker when it registers.
public struct GatewayRegistration: Sendable, Equatable {
    public var version: String
    public var controlURL: String
    public var portRange: PortRange
    /// The ids of the rules the gateway holds.
    public var ruleIDs: [String]
    /// The PEM certificate of an https control endpoint (pinned for pushes).
    public var controlCertificate: String?

    public init(version: String, controlURL: String, portRange: PortRange, ruleIDs: [String], controlCertificate: String? = nil) {
        self.version = version
        self.controlURL = controlURL
        self.portRange = portRange
        self.ruleIDs = ruleIDs
        self.controlCertificate = controlCertificate
    }

    /// Checks the fields a gateway sent, naming the one that is wrong.
    public func validate() throws(FieldError) {
        try Validate.length(version, field: "version", 1...64)
        try Validate.noControlCharacters(version, field: "version")
        try Validate.controlURL(controlURL)
        if controlURL.lowercased().hasPrefix("https://") {
            guard let certificate = controlCertificate, certificate.contains("-----BEGIN CERTIFICATE-----") else {
                throw FieldError("control_certificate", "is required with an https:// control_url: the PEM certificate the broker pins for its pushes")
            }
            try Validate.length(certificate, field: "control_certificate", 1...16384)
        } else if controlCertificate != nil {
            throw FieldError("control_certificate", "is only for an https:// control_url")
        }
        try Validate.range(portRange.first, field: "port_range.first", 1...65535)
        try Validate.range(portRange.last, field: "port_range.last", 1...65535)
        if portRange.first > portRange.last {
            throw FieldError("port_range", "first (\(portRange.first)) must not be above last (\(portRange.last))")
        }
    }
}

/// A port-forward rule the broker pushed to a gateway for one connection.
public struct GatewayRule: Sendable, Equatable {
    /// The id the broker chose (32 lower-case hex digits); the gateway keeps it.
    public var id: String
    public var gatewayID: Int64
    public var desktopID: Int64?
    public var userID: Int64?
    /// The desktop protocol's name (`rdp`, ...).
    public var protocolName: String
    public var push: RulePush
    /// The public port the gateway opened.
    public var port: Int
    public var created: Date
    /// The connect call this rule belongs to: the id its answer gave (the
    /// first rule's). Rules on every gateway of an `E` cluster share it.
    public var connectionID: String

    public init(id: String, gatewayID: Int64, desktopID: Int64?, userID: Int64?, protocolName: String,
                push: RulePush, port: Int, created: Date, connectionID: String? = nil) {
        self.id = id
        self.connectionID = connectionID ?? id
        self.gatewayID = gatewayID
        self.desktopID = desktopID
        self.userID = userID
        self.protocolName = protocolName
        self.push = push
        self.port = port
        self.created = created
    }

    /// A fresh rule id.
    public static func newID() -> String { ControlCrypto.hex(Secrets.randomBytes(16)) }
}

/// A group of gateways that share a public address and a placement method.
public struct GatewayCluster: Sendable, Equatable {
    public var id: Int64
    /// 1-100 characters, unique (case-insensitively).
    public var name: String
    /// The cluster's public address ("" when none).
    public var address: String
    public var loadBalanceVia: LoadBalanceMethod
    public var useSourceIP: SourceIPMode
    public var notes: String
    public var created: Date
    public var updated: Date

    public static func blank(now: Date) -> GatewayCluster {
        GatewayCluster(id: 0, name: "", address: "", loadBalanceVia: .everyGateway,
                       useSourceIP: .randomPortOpen, notes: "", created: now, updated: now)
    }
}

/// Which transport a display protocol uses on its port.
public enum Transport: String, Sendable, CaseIterable, Codable {
    case tcp
    case udp
    case both
}

/// One display protocol a desktop offers, on its own port.
public struct DesktopProtocol: Sendable, Equatable, Codable {
    /// A short name such as `rdp`, `nomachine`, `ssh` (1-32 of a-z, 0-9, `-`, `_`, `.`).
    public var name: String
    /// 1-65535.
    public var port: Int
    public var transport: Transport

    public init(name: String, port: Int, transport: Transport = .tcp) {
        self.name = name
        self.port = port
        self.transport = transport
    }
}

/// A remote desktop on a private network.
public struct Desktop: Sendable, Equatable {
    public var id: Int64
    /// 1-100 characters, unique (case-insensitively).
    public var name: String
    /// The desktop's private IP address or DNS name, as a gateway reaches it.
    public var address: String
    /// At least one; names unique within the desktop.
    public var protocols: [DesktopProtocol]
    /// A gateway that carries this desktop's connections, if pinned to one.
    public var gatewayID: Int64?
    /// A gateway cluster that carries this desktop's connections, if any.
    public var loadBalancerID: Int64?
    public var notes: String
    /// The users entitled to this desktop (ids, ascending); empty: every
    /// enabled user may connect to it.
    public var users: [Int64]
    public var created: Date
    public var updated: Date

    public init(id: Int64, name: String, address: String, protocols: [DesktopProtocol], gatewayID: Int64?,
                loadBalancerID: Int64?, notes: String, users: [Int64] = [], created: Date, updated: Date) {
        self.id = id
        self.name = name
        self.address = address
        self.protocols = protocols
        self.gatewayID = gatewayID
        self.loadBalancerID = loadBalancerID
        self.notes = notes
        self.users = users
        self.created = created
        self.updated = updated
    }

    public static func blank(now: Date) -> Desktop {
        Desktop(id: 0, name: "", address: "", protocols: [], gatewayID: nil, loadBalancerID: nil,
                notes: "", created: now, updated: now)
    }

    /// Whether `user` may connect to this desktop: it names them, or names
    /// nobody (open to every user).
    public func entitles(_ user: User) -> Bool {
        users.isEmpty || users.contains(user.id)
    }

    /// The PCoIP protocol entry (name `pcoip`), when the desktop runs a PCoIP agent.
    public var pcoip: DesktopProtocol? { protocols.first { $0.name == "pcoip" } }

    /// The TLS server name a PCoIP client sends to this desktop's agent: the
    /// desktop's address when it is a DNS name, else `desktop-<id>.pcoip`.
    public var pcoipServerName: String {
        let isName = address.contains(where: { $0.isLetter }) && !address.contains(":")
        return isName ? address.lowercased() : "desktop-\(id).pcoip"
    }
}

/// What a user may do through the API.
public enum UserRole: String, Sendable, CaseIterable, Codable {
    /// Everything: gateways, clusters, desktops, users.
    case admin
    /// Log in and out, and (later) connect to desktops; nothing administrative.
    case user
}

/// A person who logs in to the broker. The password hash never leaves the store
/// except through `BrokerStore.credentials(login:)`.
public struct User: Sendable, Equatable {
    public var id: Int64
    /// 1-64 characters, unique (case-insensitively).
    public var login: String
    public var displayName: String
    public var role: UserRole
    /// A disabled user cannot log in (403).
    public var enabled: Bool
    public var created: Date
    public var updated: Date

    public static func blank(now: Date) -> User {
        User(id: 0, login: "", displayName: "", role: .user, enabled: true, created: now, updated: now)
    }
}

/// A logged-in session. Only the SHA-256 of its token is stored.
public struct Session: Sendable, Equatable {
    /// Hex SHA-256 of the bearer token.
    public var tokenHash: String
    public var userID: Int64
    public var created: Date
    public var expires: Date
    /// The client's address as the HTTP layer saw it ("" when unknown).
    public var clientAddress: String
    /// The gateway the user logged in through (broker forwarding), if known.
    public var loginGatewayID: Int64?

    public init(tokenHash: String, userID: Int64, created: Date, expires: Date, clientAddress: String,
                loginGatewayID: Int64? = nil) {
        self.tokenHash = tokenHash
        self.userID = userID
        self.created = created
        self.expires = expires
        self.clientAddress = clientAddress
        self.loginGatewayID = loginGatewayID
    }
}
