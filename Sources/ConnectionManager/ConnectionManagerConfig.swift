import Foundation
import KeyValueConfig
import SystemLayer

/// `ConnectionManager.conf`: `Key = value` lines as HP's tool writes them.
/// Every error names the file, the line and the key; nothing is applied from
/// a file with an error.
public struct ConnectionManagerConfig: Sendable, Equatable {
    /// Where PCoIP clients reach the Connection Manager (HTTPS).
    public var listen = SocketAddress(ip: .v4(0), port: 443)
    /// The PEM certificate and key of that listener (RSA of at least 2048 bits).
    public var sslCertificate = ""
    public var sslKey = ""
    /// The broker the messages are relayed to (`https://host[:port]`; `http://` only on loopback).
    public var brokerURL = ""
    /// A PEM CA (or the broker's own certificate) to verify the broker with; "" uses the system's CAs.
    public var brokerCACertificate = ""
    /// Accept any certificate from the broker (self-signed): only when set explicitly.
    public var brokerAllowSelfSigned = false
    /// The private key that signs session grants (RS256 or ES256).
    public var jwtSigningKey = ""
    /// The audience of grants: the Security Gateways' `GatewayGroup`.
    public var gatewayGroup = ""
    /// This host runs a Security Gateway too: its control endpoint and public address.
    public var securityGatewayEnabled = false
    public var securityGatewayControl = SocketAddress(ip: .v4(0x7f00_0001), port: 4173)
    /// The public addresses of this host's Security Gateway (`--external-pcoip-ip`); the first is given to clients.
    public var externalPCoIPAddresses: [String] = []
    /// The port clients reach Security Gateways on.
    public var securityGatewayPort = 4172
    /// Other Security Gateways (`--external-sg-ip`), in failover order.
    public var externalSecurityGateways: [SecurityGatewayAddress] = []
    /// What the Security Gateways' control endpoints are trusted with
    /// (`SecurityGatewayCaCert`, PEM): empty means `SSLCert`, the certificate
    /// `pcoip-cmsg-setup` gives this host's Security Gateway too (issue 14).
    public var securityGatewayCACertificate = ""
    /// `SecurityGatewayPlainHttp = true`: the control endpoints are plain HTTP.
    public var securityGatewayPlainHTTP = false
    /// Session establishments (allocations) in progress at once (HP: 40).
    public var maxSessionEstablishments = 40
    /// Client requests being handled at once (HP: 400).
    public var maxClientCommunications = 400
    /// How long a grant admits connections (and reconnections) to its session.
    public var grantLifetimeSeconds = 8 * 3600
    /// A client session unused this long is forgotten.
    public var sessionIdleSeconds = 15 * 60
    /// Security Gateways' and the broker's health is checked this often.
    public var healthCheckSeconds = 2.0
    /// A local endpoint for `pcoip-cmsg-setup status` (GET /v1/status).
    public var controlListen = SocketAddress(ip: .v4(0x7f00_0001), port: 4174)
    public var enableIPv6 = false
    public var logLevel = "info"

    public init() {}

    /// Parses the text of a config file.
    /// - Throws: `ConfigFileError` with file, line and reason.
    public static func parse(_ text: String, file: String = "ConnectionManager.conf") throws(ConfigFileError) -> ConnectionManagerConfig {
        let kv = try KeyValueFile(parsing: text, file: file)
        var config = ConnectionManagerConfig()
        for entry in kv.entries {
            let value = entry.value
            func address() throws(ConfigFileError) -> SocketAddress {
                guard let address = SocketAddress(value) else { throw kv.error(entry, "\"\(value)\" is not a numeric HOST:PORT") }
                return address
            }
            switch entry.key.lowercased() {
            case "listenaddress": config.listen = try address()
            case "sslcert": config.sslCertificate = value
            case "sslkey": config.sslKey = value
            case "brokerurl":
                guard BrokerURL(value) != nil else {
                    throw kv.error(entry, "\"\(value)\" is not https://HOST[:PORT] (http:// only to a loopback address)")
                }
                config.brokerURL = value
            case "brokercacert": config.brokerCACertificate = value
            case "brokerallowselfsigned": config.brokerAllowSelfSigned = try kv.bool(entry)
            case "jwtsigningkey": config.jwtSigningKey = value
            case "gatewaygroup": config.gatewayGroup = try kv.word(entry)
            case "securitygatewayenabled": config.securityGatewayEnabled = try kv.bool(entry)
            case "securitygatewaycontrol": config.securityGatewayControl = try address()
            case "externalpcoipip":
                let addresses = kv.list(entry)
                for item in addresses where IPAddress(item) == nil {
                    throw kv.error(entry, "\"\(item)\" is not an IP address")
                }
                config.externalPCoIPAddresses = addresses
            case "securitygatewayport": config.securityGatewayPort = try kv.int(entry, 1...65535)
            case "externalsecuritygateways":
                var gateways: [SecurityGatewayAddress] = []
                for item in kv.list(entry) {
                    guard let gateway = SecurityGatewayAddress(item, defaultPort: config.securityGatewayPort) else {
                        throw kv.error(entry, "\"\(item)\" is not PUBLIC_IP[:PORT][@CONTROL_HOST:PORT]")
                    }
                    gateways.append(gateway)
                }
                config.externalSecurityGateways = gateways
            case "securitygatewaycacert": config.securityGatewayCACertificate = value
            case "securitygatewayplainhttp": config.securityGatewayPlainHTTP = try kv.bool(entry)
            case "maxsessionestablishments": config.maxSessionEstablishments = try kv.int(entry, 1...100_000)
            case "maxclientcommunications": config.maxClientCommunications = try kv.int(entry, 1...100_000)
            case "grantlifetime": config.grantLifetimeSeconds = Int(try kv.seconds(entry, 60...7 * 86400))
            case "sessionidletimeout": config.sessionIdleSeconds = Int(try kv.seconds(entry, 10...86400))
            case "healthcheckinterval": config.healthCheckSeconds = try kv.seconds(entry, 0.1...300)
            case "controllisten": config.controlListen = try address()
            case "enableipv6": config.enableIPv6 = try kv.bool(entry)
            case "loglevel":
                let level = value.lowercased()
                guard ["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(level) else {
                    throw kv.error(entry, "\"\(value)\" is not trace, debug, info, notice, warning, error or critical")
                }
                config.logLevel = level
            default:
                throw ConfigFileError(file: file, line: entry.line, message: "unknown key \"\(entry.key)\"")
            }
        }
        for (key, present) in [("BrokerUrl", !config.brokerURL.isEmpty), ("SSLCert", !config.sslCertificate.isEmpty),
                               ("SSLKey", !config.sslKey.isEmpty), ("JwtSigningKey", !config.jwtSigningKey.isEmpty),
                               ("GatewayGroup", !config.gatewayGroup.isEmpty)] where !present {
            throw kv.error("\(key) is required")
        }
        if config.securityGatewayEnabled && config.externalPCoIPAddresses.isEmpty {
            throw kv.error("ExternalPcoipIp is required when SecurityGatewayEnabled is true (the address clients reach this gateway at)")
        }
        if !config.securityGatewayEnabled && config.externalSecurityGateways.isEmpty {
            throw kv.error("no Security Gateway: set SecurityGatewayEnabled = true or list ExternalSecurityGateways")
        }
        return config
    }

    /// Reads and parses a file.
    public static func load(path: String) throws(ConfigFileError) -> ConnectionManagerConfig {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ConfigFileError(file: path, line: 0, message: "cannot read the file")
        }
        return try parse(text, file: path)
    }

    /// Relative paths in the file are relative to its folder.
    public func resolvingPaths(relativeTo configFile: String) -> ConnectionManagerConfig {
        let folder = URL(fileURLWithPath: configFile).deletingLastPathComponent()
        func resolve(_ path: String) -> String {
            path.isEmpty || path.hasPrefix("/") ? path : folder.appendingPathComponent(path).path
        }
        var copy = self
        copy.sslCertificate = resolve(sslCertificate)
        copy.sslKey = resolve(sslKey)
        copy.brokerCACertificate = resolve(brokerCACertificate)
        copy.securityGatewayCACertificate = resolve(securityGatewayCACertificate)
        copy.jwtSigningKey = resolve(jwtSigningKey)
        return copy
    }

    /// Every Security Gateway in failover order: this host's first (when
    /// enabled), then the external ones.
    public var securityGateways: [SecurityGatewayAddress] {
        var all: [SecurityGatewayAddress] = []
        if securityGatewayEnabled, let first = externalPCoIPAddresses.first {
            all.append(SecurityGatewayAddress(publicAddress: first, publicPort: securityGatewayPort,
                                              control: securityGatewayControl, local: true))
        }
        return all + externalSecurityGateways
    }
}

/// A Security Gateway as the Connection Manager knows it: where clients
/// reach it and where its control endpoint is.
public struct SecurityGatewayAddress: Sendable, Equatable, CustomStringConvertible {
    public var publicAddress: String
    public var publicPort: Int
    public var control: SocketAddress
    /// This host's own gateway.
    public var local: Bool

    public init(publicAddress: String, publicPort: Int, control: SocketAddress, local: Bool = false) {
        self.publicAddress = publicAddress
        self.publicPort = publicPort
        self.control = control
        self.local = local
    }

    /// `PUBLIC_IP[:PORT][@CONTROL_HOST:PORT]`; the control endpoint defaults
    /// to the public address on port 4173.
    public init?(_ text: String, defaultPort: Int = 4172) {
        let parts = text.split(separator: "@", maxSplits: 1).map(String.init)
        let publicPart = parts[0]
        if let address = SocketAddress(publicPart) {
            publicAddress = "\(address.ip)"
            publicPort = Int(address.port)
        } else if let ip = IPAddress(publicPart) {
            publicAddress = "\(ip)"
            publicPort = defaultPort
        } else {
            return nil
        }
        if parts.count == 2 {
            guard let control = SocketAddress(parts[1]) else { return nil }
            self.control = control
        } else {
            guard let ip = IPAddress(publicAddress) else { return nil }
            control = SocketAddress(ip: ip, port: 4173)
        }
        local = false
    }

    public var description: String {
        let host = publicAddress.contains(":") ? "[\(publicAddress)]" : publicAddress
        return "\(host):\(publicPort) (control \(control))"
    }
}

/// The broker's URL, checked: `https://HOST[:PORT][/path]`, or `http://` to a loopback address.
public struct BrokerURL: Sendable, Equatable, CustomStringConvertible {
    public let scheme: String
    public let host: String
    public let port: Int
    /// The URL of `POST /pcoip-broker/xml` on it.
    public var endpoint: String { "\(scheme)://\(hostForURL):\(port)/pcoip-broker/xml" }
    public var base: String { "\(scheme)://\(hostForURL):\(port)/" }
    var hostForURL: String { host.contains(":") ? "[\(host)]" : host }

    public init?(_ text: String) {
        guard let components = URLComponents(string: text), let scheme = components.scheme?.lowercased(),
              scheme == "https" || scheme == "http", let host = components.host, !host.isEmpty else { return nil }
        let bare = host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host
        if scheme == "http" {
            // Clear text only where it never crosses a network.
            guard let ip = IPAddress(bare), ip.isLoopback else { return nil }
        }
        self.scheme = scheme
        self.host = bare
        port = components.port ?? (scheme == "https" ? 443 : 80)
    }

    public var description: String { base }
}
