import ControlProtocol
import Relay
import SystemLayer

/// What the gateway's config allows pushed rules to do.
public struct ControlSettings: Sendable, Equatable {
    /// The address pushed rules listen on (`public_address`).
    public var publicAddress: IPAddress
    /// Where pushed rules may point (`desktop_networks`); empty: nowhere.
    public var desktopNetworks: [CIDR]
    /// The range random ports come from (`--port-range`).
    public var portRange: ClosedRange<Int>
    /// The gateway's own listening addresses (control endpoint, config
    /// forwards, broker forwarding): a target never points at them.
    public var ownAddresses: [SocketAddress]
    /// This host's interface addresses: a target never points at them
    /// (loopback ones only when no loopback network is listed).
    public var localAddresses: [IPAddress] = []
    /// `unused_expiry_s` when the push does not say.
    public var defaultUnusedExpirySeconds: Int
    /// Request bodies larger than this are refused with 413.
    public var maxBodyBytes: Int
    /// The path a push takes when it does not say (`forwarding`).
    public var defaultForwarding: ForwardingPath = .userspace
    /// When a change is answered (`rules_sync`): after its journal record's
    /// fdatasync (the default), or after its write with the sync in the background.
    public var rulesSync: JournalSync = .eachChange

    public init(publicAddress: IPAddress = .v4(0), desktopNetworks: [CIDR] = [], portRange: ClosedRange<Int> = 20001...22000,
                ownAddresses: [SocketAddress] = [], defaultUnusedExpirySeconds: Int = 300, maxBodyBytes: Int = 64 * 1024) {
        self.publicAddress = publicAddress
        self.desktopNetworks = desktopNetworks
        self.portRange = portRange
        self.ownAddresses = ownAddresses
        self.defaultUnusedExpirySeconds = defaultUnusedExpirySeconds
        self.maxBodyBytes = maxBodyBytes
    }
}

/// Checks pushes and maps them onto relay rules.
public enum RulePolicy {
    /// Engine ids of pushed rules carry this prefix; config forward names
    /// cannot hold ':', so the two never clash.
    public static let idPrefix = "broker:"
    static let longestExpiry = 7 * 24 * 3600

    /// Checks a rule id from the path: 1-100 of `A-Z a-z 0-9 . _ -`.
    public static func checkID(_ id: String) throws(ControlError) {
        guard !id.isEmpty, id.utf8.count <= 100, id.utf8.allSatisfy({ byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || byte == 0x2E || byte == 0x5F || byte == 0x2D
        }) else {
            throw .badField("id", "must be 1 to 100 of the characters A-Z a-z 0-9 . _ -")
        }
    }

    /// A checked push: its numeric target and client.
    public struct Checked: Sendable {
        public var target: SocketAddress
        public var client: IPAddress?
        public var transport: Transport
        public var unusedExpirySeconds: Int
    }

    /// Checks every field of a push against the config.
    /// - Throws: `ControlError` 400 naming a malformed field, 403 naming a
    ///   target outside the desktop networks or pointing at the gateway.
    public static func check(_ push: RulePush, settings: ControlSettings) throws(ControlError) -> Checked {
        var client: IPAddress?
        if let text = push.clientIP {
            guard let ip = IPAddress(text) else { throw .badField("client_ip", "\"\(short(text))\" is not a numeric IP address") }
            guard !ip.isUnspecified else { throw .badField("client_ip", "must not be the unspecified address") }
            client = ip.unmapped
        }
        switch push.method {
        case .randomPort:
            // A port with method 0 or 2 must be one of the range (checked when it is allocated).
            if let port = push.port, !(1...65535).contains(port) { throw .badField("port", "\(port) is outside 1-65535") }
        case .protocolPortClientOnly:
            guard client != nil else { throw .badField("client_ip", "required for method 1") }
            guard let port = push.port else { throw .badField("port", "required for method 1") }
            guard (1...65535).contains(port) else { throw .badField("port", "\(port) is outside 1-65535") }
        case .randomPortClientOnly:
            guard client != nil else { throw .badField("client_ip", "required for method 2") }
            if let port = push.port, !(1...65535).contains(port) { throw .badField("port", "\(port) is outside 1-65535") }
        }
        let expiry = push.unusedExpirySeconds ?? settings.defaultUnusedExpirySeconds
        guard (1...longestExpiry).contains(expiry) else {
            throw .badField("unused_expiry_s", "\(expiry) is outside 1-\(longestExpiry)")
        }
        guard let target = SocketAddress(push.target), target.port != 0 else {
            throw .badField("target", "\"\(short(push.target))\" is not a numeric HOST:PORT (e.g. 10.1.2.3:3389 or [2001:db8::5]:3389)")
        }
        let ip = target.ip.unmapped
        guard !settings.desktopNetworks.isEmpty else {
            throw ControlError(403, field: "target", "target: \(target) refused: this gateway's config sets no desktop_networks, so it accepts no pushed rule")
        }
        guard settings.desktopNetworks.contains(where: { $0.contains(ip) }) else {
            let allowed = settings.desktopNetworks.map(\.description).joined(separator: ", ")
            throw ControlError(403, field: "target", "target: \(target) is outside the desktop networks this gateway allows (\(allowed))")
        }
        if ip.isUnspecified || isMulticastOrBroadcast(ip) {
            throw ControlError(403, field: "target", "target: \(target) is not a single host")
        }
        if isLoopback(ip) && !settings.desktopNetworks.contains(where: { isLoopback($0.address) }) {
            throw ControlError(403, field: "target", "target: \(target) is the gateway itself (loopback); list a loopback network in desktop_networks to allow it")
        }
        if pointsAtGateway(target, settings: settings) {
            throw ControlError(403, field: "target", "target: \(target) is the gateway itself (one of its own addresses, listening sockets or public ports)")
        }
        let transport: Transport = switch push.protocol {
        case .tcp: .tcp
        case .udp: .udp
        case .both: .both
        }
        return Checked(target: SocketAddress(ip: ip, port: target.port), client: client, transport: transport,
                       unusedExpirySeconds: expiry)
    }

    /// The relay rule of a pushed rule.
    public static func relayRule(_ state: RuleState, settings: ControlSettings) -> RelayRule? {
        guard let target = SocketAddress(state.push.target), let port = UInt16(exactly: state.port) else { return nil }
        var allow: [CIDR] = []
        if state.push.method != .randomPort, let text = state.push.clientIP, let ip = IPAddress(text)?.unmapped {
            allow = [CIDR(address: ip, prefixLength: ip.isIPv4 ? 32 : 128)]
        }
        let transport: Transport = switch state.push.protocol {
        case .tcp: .tcp
        case .udp: .udp
        case .both: .both
        }
        return RelayRule(id: idPrefix + state.id, listen: SocketAddress(ip: settings.publicAddress, port: port),
                         allow: allow, target: SocketAddress(ip: target.ip.unmapped, port: target.port), transport: transport)
    }

    /// True when `target` is one of the gateway's own listening sockets: an
    /// own address (or any address when that one is a wildcard) on its port,
    /// or the public address with a port of the range.
    static func pointsAtGateway(_ target: SocketAddress, settings: ControlSettings) -> Bool {
        let ip = target.ip.unmapped
        let ownIPs = settings.ownAddresses.map { $0.ip.unmapped } + [settings.publicAddress] + settings.localAddresses
        // One of this host's own (not loopback) addresses: the gateway itself, whatever the port.
        if !isLoopback(ip) && ownIPs.contains(ip) { return true }
        let local = isLoopback(ip)
        for own in settings.ownAddresses where own.port == target.port {
            if own.ip.unmapped == ip || (own.ip.isUnspecified && local) { return true }
        }
        if settings.portRange.contains(Int(target.port)) && (ip == settings.publicAddress || (settings.publicAddress.isUnspecified && local)) {
            return true
        }
        return false
    }

    static func isLoopback(_ ip: IPAddress) -> Bool {
        switch ip.unmapped {
        case .v4(let value): value >> 24 == 127
        case .v6(let high, let low): high == 0 && low == 1
        }
    }

    static func isMulticastOrBroadcast(_ ip: IPAddress) -> Bool {
        switch ip.unmapped {
        case .v4(let value): value >> 28 == 0xE || value == 0xFFFF_FFFF
        case .v6(let high, _): high >> 56 == 0xFF
        }
    }

    static func short(_ text: String) -> String { text.count > 60 ? String(text.prefix(60)) + "…" : text }
}
