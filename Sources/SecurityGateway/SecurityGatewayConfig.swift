import Foundation
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

    public init() {}

    /// Parses the text of a config file.
    /// - Throws: `SecurityGatewayConfigError` with file, line and reason.
    public static func parse(_ text: String, file: String = "SecurityGateway.conf") throws(SecurityGatewayConfigError) -> SecurityGatewayConfig {
        var config = SecurityGatewayConfig()
        var seen: [String: Int] = [:]
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = index + 1
            let fail = { (message: String) in SecurityGatewayConfigError(file: file, line: line, message: message) }
            var content = Substring(raw)
            if let hash = content.firstIndex(of: "#") { content = content[..<hash] }
            let trimmed = content.trimmingCharacters(in: .whitespaces)
            if trimmed.isEmpty { continue }
            guard let equals = trimmed.firstIndex(of: "=") else { throw fail("expected `Key = value`") }
            let key = trimmed[..<equals].trimmingCharacters(in: .whitespaces)
            let value = trimmed[trimmed.index(after: equals)...].trimmingCharacters(in: .whitespaces)
            guard !key.isEmpty else { throw fail("missing key before `=`") }
            guard !value.isEmpty else { throw fail("\(key): missing value") }
            let lower = key.lowercased()
            if let first = seen[lower] { throw fail("\(key) is set twice (first on line \(first))") }
            seen[lower] = line
            switch lower {
            case "maxconnections":
                guard let n = Int(value), (1...1_000_000).contains(n) else { throw fail("MaxConnections: \"\(value)\" is not a number 1-1000000") }
                config.maxConnections = n
            case "listenaddress":
                guard let address = SocketAddress(value) else { throw fail("ListenAddress: \"\(value)\" is not a numeric HOST:PORT") }
                config.listen = address
            case "gatewaygroup":
                guard value.utf8.count <= 255, value.allSatisfy({ !$0.isWhitespace }) else {
                    throw fail("GatewayGroup: must be one word of at most 255 bytes")
                }
                config.gatewayGroup = value
            case "jwtverifyingcert":
                config.jwtVerifyingCertificate = value
            case "agentsourceport":
                guard let port = UInt16(value), port > 0 else { throw fail("AgentSourcePort: \"\(value)\" is not a port 1-65535") }
                config.agentSourcePort = port
            case "enablecollaboration":
                guard let flag = parseBool(value) else { throw fail("EnableCollaboration: \"\(value)\" is not true or false") }
                config.enableCollaboration = flag
            case "collaborationsourceports":
                let parts = value.split(separator: "-").map { $0.trimmingCharacters(in: .whitespaces) }
                guard parts.count == 2, let low = UInt16(parts[0]), let high = UInt16(parts[1]), low > 0, low <= high else {
                    throw fail("CollaborationSourcePorts: \"\(value)\" is not a range FIRST-LAST of ports")
                }
                config.collaborationSourcePorts = low...high
            case "clienthellotimeout":
                guard let seconds = Double(value.hasSuffix("s") ? String(value.dropLast()) : value), seconds > 0, seconds <= 300 else {
                    throw fail("ClientHelloTimeout: \"\(value)\" is not a number of seconds (0-300]")
                }
                config.clientHelloTimeoutNanoseconds = UInt64(seconds * 1e9)
            case "clienthellomaxbytes":
                guard let n = Int(value), (512...65536).contains(n) else { throw fail("ClientHelloMaxBytes: \"\(value)\" is not 512-65536") }
                config.clientHelloMaxBytes = n
            case "controllisten":
                guard let address = SocketAddress(value) else { throw fail("ControlListen: \"\(value)\" is not a numeric HOST:PORT") }
                config.controlListen = address
            default:
                throw fail("unknown key \"\(key)\"")
            }
        }
        guard !config.gatewayGroup.isEmpty else {
            throw SecurityGatewayConfigError(file: file, line: 0, message: "GatewayGroup is required (the audience grants must name)")
        }
        guard !config.jwtVerifyingCertificate.isEmpty else {
            throw SecurityGatewayConfigError(file: file, line: 0, message: "JwtVerifyingCert is required (the PEM certificate that verifies grants)")
        }
        if config.enableCollaboration, config.collaborationSourcePorts.contains(config.agentSourcePort) {
            throw SecurityGatewayConfigError(file: file, line: seen["collaborationsourceports"] ?? 0,
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

    static func parseBool(_ text: String) -> Bool? {
        switch text.lowercased() {
        case "true", "yes", "on", "1": true
        case "false", "no", "off", "0": false
        default: nil
        }
    }
}

public struct SecurityGatewayConfigError: Error, Equatable, CustomStringConvertible {
    public let file: String
    /// 0 when the problem is the file as a whole.
    public let line: Int
    public let message: String

    public var description: String { line > 0 ? "\(file):\(line): \(message)" : "\(file): \(message)" }
}
