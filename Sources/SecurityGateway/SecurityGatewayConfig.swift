import FoundationEssentials
import KeyValueConfig
import SystemLayer

/// `SecurityGateway.conf`: `Key = value` lines, `#` comments, keys
/// case-insensitive as HP's tool writes them. Every error names the file,
/// the line and the key, and nothing is applied from a file with an error.
public struct SecurityGatewayConfig: Sendable, Equatable {
    /// Sessions at once; the next client is refused (HP's default: 5000).
    public var maxConnections = 5000
    /// Where clients connect, TCP and UDP.
    public var listen = SocketAddress(ip: .v4(0), port: 4172)
    /// The gateway group this gateway belongs to: the `aud` a grant must name.
    public var gatewayGroup = ""
    /// PEM X.509 certificate whose key verifies grants (`--jwt-verifying-cert`).
    public var jwtVerifyingCertificate = ""
    /// UDP toward agents leaves from this port.
    public var agentSourcePort: UInt16 = 55000
    /// A second session to the same agent takes a port from this range.
    public var enableCollaboration = false
    public var collaborationSourcePorts: ClosedRange<UInt16> = 55001...55100
    /// The client's ClientHello must arrive within this time and size.
    public var clientHelloTimeoutNanoseconds: UInt64 = 10_000_000_000
    public var clientHelloMaxBytes = 16 * 1024
    /// The control endpoint a Connection Manager prepares sessions on.
    public var controlListen = SocketAddress(ip: .v4(0x7f00_0001), port: 4173)
    /// Its TLS certificate and key (`ControlTLSCert`, `ControlTLSKey`); empty:
    /// a self-signed pair made in the data folder (issue 14).
    public var controlTLSCertificate = ""
    public var controlTLSKey = ""
    /// `ControlPlainHTTP = true`: the control endpoint speaks plain HTTP (said in the log).
    public var controlPlainHTTP = false
    /// The log level `serve` starts with (its `--log-level` wins when given).
    public var logLevel: String?

    public init() {}

    /// Parses the text of a config file.
    /// - Throws: `SecurityGatewayConfigError` with file, line and reason.
    public static func parse(_ text: String, file: String = "SecurityGateway.conf") throws(SecurityGatewayConfigError) -> SecurityGatewayConfig {
        let kv = try KeyValueFile(parsing: text, file: file)
        var config = SecurityGatewayConfig()
        for entry in kv.entries {
            let value = entry.value
            switch entry.key.lowercased() {
            case "maxconnections":
                config.maxConnections = try kv.int(entry, 1...1_000_000)
            case "listenaddress":
                guard let address = SocketAddress(value) else { throw kv.error(entry, "\"\(value)\" is not a numeric HOST:PORT") }
                config.listen = address
            case "gatewaygroup":
                config.gatewayGroup = try kv.word(entry)
            case "jwtverifyingcert":
                config.jwtVerifyingCertificate = value
            case "agentsourceport":
                config.agentSourcePort = UInt16(try kv.int(entry, 1...65535))
            case "enablecollaboration":
                config.enableCollaboration = try kv.bool(entry)
            case "collaborationsourceports":
                let parts = value.split(separator: "-").map { KeyValueFile.trim($0) }
                guard parts.count == 2, let low = UInt16(parts[0]), let high = UInt16(parts[1]), low > 0, low <= high else {
                    throw kv.error(entry, "\"\(value)\" is not a range FIRST-LAST of ports")
                }
                config.collaborationSourcePorts = low...high
            case "clienthellotimeout":
                let seconds = try kv.seconds(entry, 0.001...300)
                config.clientHelloTimeoutNanoseconds = UInt64(seconds * 1e9)
            case "clienthellomaxbytes":
                config.clientHelloMaxBytes = try kv.int(entry, 512...65536)
            case "controllisten":
                guard let address = SocketAddress(value) else { throw kv.error(entry, "\"\(value)\" is not a numeric HOST:PORT") }
                config.controlListen = address
            case "controltlscert":
                config.controlTLSCertificate = value
            case "controltlskey":
                config.controlTLSKey = value
            case "controlplainhttp":
                config.controlPlainHTTP = try kv.bool(entry)
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
        guard !config.gatewayGroup.isEmpty else {
            throw kv.error("GatewayGroup is required (the audience grants must name)")
        }
        guard !config.jwtVerifyingCertificate.isEmpty else {
            throw kv.error("JwtVerifyingCert is required (the PEM certificate that verifies grants)")
        }
        if config.controlTLSCertificate.isEmpty != config.controlTLSKey.isEmpty {
            let given = config.controlTLSCertificate.isEmpty ? "ControlTLSKey" : "ControlTLSCert"
            throw ConfigFileError(file: file, line: kv.entry(given)?.line ?? 0,
                                  message: "\(given) needs \(given == "ControlTLSCert" ? "ControlTLSKey" : "ControlTLSCert")")
        }
        if config.controlPlainHTTP, !config.controlTLSCertificate.isEmpty {
            throw ConfigFileError(file: file, line: kv.entry("ControlPlainHTTP")?.line ?? 0,
                                  message: "ControlPlainHTTP = true contradicts ControlTLSCert")
        }
        if config.enableCollaboration, config.collaborationSourcePorts.contains(config.agentSourcePort) {
            throw ConfigFileError(file: file, line: kv.entry("CollaborationSourcePorts")?.line ?? 0,
                                  message: "CollaborationSourcePorts must not contain AgentSourcePort \(config.agentSourcePort)")
        }
        return config
    }

    /// Reads and parses a file.
    public static func load(path: String) throws(SecurityGatewayConfigError) -> SecurityGatewayConfig {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw SecurityGatewayConfigError(file: path, line: 0, message: "cannot read the file")
        }
        return try parse(text, file: path)
    }
}

/// A problem in SecurityGateway.conf: file, line, what is wrong.
public typealias SecurityGatewayConfigError = ConfigFileError
