import ControlProtocol
import KeyValueConfig
import Relay
import SystemLayer

/// Everything `leostream-gateway serve` needs, read from a config file.
public struct GatewayConfiguration: Sendable, Equatable {
    public var settings = RelaySettings()
    public var drainTimeoutNanoseconds: UInt64 = 30_000_000_000
    public var logLevel = "info"
    public var rules: [RelayRule] = []

    // The control plane (GatewayControl): see docs/CONTROL-PROTOCOL.md.
    /// The address pushed rules listen on (`public_address`, default 0.0.0.0).
    public var publicAddress: IPAddress = .v4(0)
    /// Where pushed rules may point (`desktop_networks`); empty: no pushed rule is accepted.
    public var desktopNetworks: [CIDR] = []
    /// The control endpoint the broker calls (`control_listen`); nil: no control plane.
    public var controlListen: SocketAddress?
    /// The URL registered with the broker (`control_url`); default `https://` + control_listen
    /// (`http://` with `control_plain_http = yes`).
    public var controlURL: String?
    /// The control endpoint's TLS certificate and key (`control_tls_cert`, `control_tls_key`);
    /// nil: a self-signed RSA 3072 pair made in the state directory at first start.
    public var controlTLSCertificate: String?
    public var controlTLSKey: String?
    /// `control_plain_http = yes`: the control endpoint speaks plain HTTP (rule
    /// contents in clear; only the signatures protect them). Off by default.
    public var controlPlainHTTP = false
    /// Broker forwarding (`broker_forward_listen`): relays to the broker with a PROXY v2 header.
    public var brokerForwardListen: SocketAddress?
    /// A listener serving only `GET /metrics` and `GET /health` (`metrics_listen`),
    /// for a gateway without `control_listen` (whose endpoint serves them too).
    public var metricsListen: SocketAddress?
    /// The gateway's Leostream `signature`, sent in the PROXY header's 0xE0 TLV (`gateway_signature`).
    public var gatewaySignature: String = ""

    // The kernel path (NetfilterKernel): see docs/ARCHITECTURE.md, "Kernel path".
    /// The path a pushed rule takes when the broker does not say (`forwarding`).
    public var forwarding: ForwardingPath = .userspace
    /// Whether the gateway keeps an nftables table (`kernel_path`; on by
    /// default when `forwarding` is kernel or offload).
    public var kernelPath = false
    /// The table's name (`kernel_table`), family inet.
    public var kernelTable = "leostream_gateway"

    /// When a pushed rule's change is answered (`rules_sync`): after the
    /// rules journal's fdatasync (`each_change`, the default), or after its
    /// write, with the sync right after on a thread of its own (`background`).
    public var rulesSync: JournalSync = .eachChange

    public init() {}
}

/// A config file error, naming the file, the line and what was wrong.
public typealias ConfigError = ConfigFileError

/// Reads the gateway's config format: `key = value` lines, `#` comments and
/// `[forward NAME]` sections. See Config/gateway.example.conf.
public enum ConfigParser {
    /// Reads and validates the file at `path`.
    /// - Throws: `ConfigError` for an unreadable file or the first bad line.
    public static func load(path: String) throws(ConfigError) -> GatewayConfiguration {
        guard let text = readFile(path) else {
            throw ConfigError(file: path, line: 0, message: "cannot read the file: \(Errno.current)")
        }
        return try parse(text, file: path)
    }

    /// Parses config text; `file` is used in error messages.
    /// - Throws: `ConfigError` for the first bad line.
    public static func parse(_ text: String, file: String = "<config>") throws(ConfigError) -> GatewayConfiguration {
        var config = GatewayConfiguration()
        var forwards: [(name: String, line: Int, keys: [String: (value: String, line: Int)])] = []
        var globalsSeen: Set<String> = []
        var kernelLines: [String: Int] = [:]
        var lineNumber = 0

        func fail(_ message: String, at line: Int? = nil) -> ConfigError {
            ConfigError(file: file, line: line ?? lineNumber, message: message)
        }

        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            var line = Substring(rawLine)
            if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
            let trimmed = line.trimmingWhitespace()
            if trimmed.isEmpty { continue }
            if trimmed.hasPrefix("[") {
                guard trimmed.hasSuffix("]") else { throw fail("section header must end with ']'") }
                let inner = trimmed.dropFirst().dropLast().trimmingWhitespace()
                let words = inner.split(separator: " ", omittingEmptySubsequences: true)
                guard words.count == 2, words[0] == "forward" else {
                    throw fail("unknown section [\(inner)]: expected [forward NAME]")
                }
                let name = String(words[1])
                guard name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." }), name.count <= 100 else {
                    throw fail("forward name \"\(name)\" may hold only letters, digits, '-', '_' and '.' (at most 100)")
                }
                if let previous = forwards.first(where: { $0.name == name }) {
                    throw fail("forward \"\(name)\" is already defined on line \(previous.line)")
                }
                forwards.append((name, lineNumber, [:]))
                continue
            }
            guard let equals = trimmed.firstIndex(of: "=") else {
                throw fail("expected `key = value`, found \"\(trimmed)\"")
            }
            let key = String(trimmed[..<equals].trimmingWhitespace()).lowercased()
            let value = String(trimmed[trimmed.index(after: equals)...].trimmingWhitespace())
            guard !key.isEmpty else { throw fail("missing key before '='") }
            guard !value.isEmpty else { throw fail("\(key): missing value") }
            if forwards.isEmpty {
                guard globalsSeen.insert(key).inserted else { throw fail("\(key) is set twice") }
                kernelLines[key] = lineNumber
                try applyGlobal(key: key, value: value, to: &config, fail: { fail($0) })
            } else {
                guard forwards[forwards.count - 1].keys[key] == nil else {
                    throw fail("\(key) is set twice in [forward \(forwards[forwards.count - 1].name)]")
                }
                forwards[forwards.count - 1].keys[key] = (value, lineNumber)
            }
        }

        for forward in forwards {
            config.rules.append(try makeRule(forward.name, line: forward.line, keys: forward.keys, file: file))
        }
        try checkKernelPath(&config, lines: kernelLines, file: file)
        try checkControlTLS(config, lines: kernelLines, file: file)
        do {
            try RelayRule.check(config.rules)
        } catch {
            let line: Int = {
                switch error {
                case .duplicateID(let id), .invalid(let id, _), .listenFailed(let id, _, _):
                    return forwards.first { $0.name == id }?.line ?? 0
                case .conflictingRules(_, let second, _):
                    return forwards.first { $0.name == second }?.line ?? 0
                }
            }()
            throw ConfigError(file: file, line: line, message: error.description)
        }
        return config
    }

    private static func applyGlobal(key: String, value: String, to config: inout GatewayConfiguration,
                                    fail: (String) -> ConfigError) throws(ConfigError) {
        switch key {
        case "loops":
            config.settings.loops = try integer(key, value, in: 1...256, fail)
        case "max_connections":
            config.settings.maxConnections = try integer(key, value, in: 1...10_000_000, fail)
        case "max_connections_per_listener":
            config.settings.maxConnectionsPerListener = try integer(key, value, in: 1...10_000_000, fail)
        case "connect_timeout":
            guard let d = try duration(key, value, allowOff: false, fail), d > 0 else { throw fail("\(key) must be more than 0") }
            config.settings.connectTimeoutNanoseconds = d
        case "drain_timeout":
            config.drainTimeoutNanoseconds = try duration(key, value, allowOff: false, fail) ?? 0
        case "keepalive_idle":
            config.settings.liveness.keepaliveIdle = try seconds(key, value, in: 1...32767, fail)
        case "keepalive_interval":
            config.settings.liveness.keepaliveInterval = try seconds(key, value, in: 1...32767, fail)
        case "keepalive_count":
            config.settings.liveness.keepaliveCount = try integer(key, value, in: 1...127, fail)
        case "user_timeout":
            let d = try duration(key, value, allowOff: true, fail) ?? 0
            config.settings.liveness.userTimeoutMilliseconds = Int(d / 1_000_000)
        case "pipe_size":
            config.settings.pipeSize = try size(key, value, in: 4096...(1 << 20), fail)
        case "max_pipes":
            config.settings.maxPipes = try integer(key, value, in: 0...100_000, fail)
        case "max_flows":
            config.settings.maxFlows = try integer(key, value, in: 1...10_000_000, fail)
        case "max_flows_per_listener":
            config.settings.maxFlowsPerListener = try integer(key, value, in: 1...10_000_000, fail)
        case "udp_receive_buffer":
            config.settings.udpReceiveBuffer = try size(key, value, in: 0...(256 << 20), fail)
        case "udp_send_buffer":
            config.settings.udpSendBuffer = try size(key, value, in: 0...(256 << 20), fail)
        case "public_address":
            guard let ip = IPAddress(value) else {
                throw fail("public_address: \"\(value)\" is not a numeric IP address (e.g. 0.0.0.0 or 203.0.113.5)")
            }
            config.publicAddress = ip
        case "desktop_networks":
            var networks: [CIDR] = []
            for item in value.split(separator: ",") {
                let text = String(item.trimmingWhitespace())
                guard let prefix = CIDR(text) else {
                    throw fail("desktop_networks: \"\(text)\" is not an address or CIDR prefix (e.g. 10.1.0.0/16)")
                }
                networks.append(prefix)
            }
            config.desktopNetworks = networks
        case "control_listen":
            guard let address = SocketAddress(value) else {
                throw fail("control_listen: \"\(value)\" is not a numeric address and port (e.g. 10.0.0.2:19010)")
            }
            config.controlListen = address
        case "control_url":
            let lower = value.lowercased()
            guard lower.hasPrefix("http://") || lower.hasPrefix("https://"), value.count <= 200, !value.contains(" ") else {
                throw fail("control_url: \"\(value)\" is not an http:// or https:// URL")
            }
            config.controlURL = value
        case "control_tls_cert":
            config.controlTLSCertificate = value
        case "control_tls_key":
            config.controlTLSKey = value
        case "control_plain_http":
            switch value.lowercased() {
            case "on", "yes", "true": config.controlPlainHTTP = true
            case "off", "no", "false": config.controlPlainHTTP = false
            default: throw fail("control_plain_http: \"\(value)\" is not yes or no")
            }
        case "broker_forward_listen":
            guard let address = SocketAddress(value), address.port != 0 else {
                throw fail("broker_forward_listen: \"\(value)\" is not a numeric address and port (e.g. 0.0.0.0:443)")
            }
            config.brokerForwardListen = address
        case "metrics_listen":
            guard let address = SocketAddress(value) else {
                throw fail("metrics_listen: \"\(value)\" is not a numeric address and port (e.g. 127.0.0.1:9110)")
            }
            config.metricsListen = address
        case "gateway_signature":
            guard value.utf8.count <= 100 else { throw fail("gateway_signature: at most 100 bytes, got \(value.utf8.count)") }
            config.gatewaySignature = value
        case "forwarding":
            guard let path = ForwardingPath(rawValue: value.lowercased()) else {
                throw fail("forwarding: \"\(value)\" is not one of userspace, kernel, offload")
            }
            config.forwarding = path
        case "kernel_path":
            switch value.lowercased() {
            case "on", "yes", "true": config.kernelPath = true
            case "off", "no", "false": config.kernelPath = false
            default: throw fail("kernel_path: \"\(value)\" is not on or off")
            }
        case "rules_sync":
            guard let sync = JournalSync(rawValue: value.lowercased()) else {
                throw fail("rules_sync: \"\(value)\" is not one of \(JournalSync.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            config.rulesSync = sync
        case "kernel_table":
            guard value.utf8.count <= 64, value.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x5F || $0 == 0x2D }) else {
                throw fail("kernel_table: \"\(value)\" must be 1 to 64 of A-Z a-z 0-9 _ -")
            }
            config.kernelTable = value
        case "log_level":
            let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
            guard levels.contains(value.lowercased()) else {
                throw fail("log_level: \"\(value)\" is not one of \(levels.joined(separator: ", "))")
            }
            config.logLevel = value.lowercased()
        default:
            throw fail("unknown setting \"\(key)\"")
        }
    }

    /// The kernel path's settings together: `forwarding` kernel or offload
    /// turns it on unless `kernel_path = off` says otherwise (an error), and
    /// it needs the control plane and a specific IPv4 `public_address`.
    /// TLS on the control endpoint: a certificate needs its key, plain HTTP
    /// takes no certificate, and control_url's scheme matches.
    private static func checkControlTLS(_ config: GatewayConfiguration, lines: [String: Int], file: String) throws(ConfigError) {
        switch (config.controlTLSCertificate, config.controlTLSKey) {
        case (_?, nil): throw ConfigError(file: file, line: lines["control_tls_cert"] ?? 0, message: "control_tls_cert: needs control_tls_key")
        case (nil, _?): throw ConfigError(file: file, line: lines["control_tls_key"] ?? 0, message: "control_tls_key: needs control_tls_cert")
        default: break
        }
        if config.controlPlainHTTP, config.controlTLSCertificate != nil {
            throw ConfigError(file: file, line: lines["control_plain_http"] ?? 0,
                              message: "control_plain_http: yes contradicts control_tls_cert (line \(lines["control_tls_cert"] ?? 0))")
        }
        if let url = config.controlURL {
            let https = url.lowercased().hasPrefix("https://")
            if https == config.controlPlainHTTP {
                throw ConfigError(file: file, line: lines["control_url"] ?? 0,
                                  message: config.controlPlainHTTP
                                      ? "control_url: \(url) is https:// but control_plain_http = yes serves plain HTTP"
                                      : "control_url: \(url) is http:// but the control endpoint speaks TLS (set control_plain_http = yes for plain HTTP)")
            }
        }
    }

    private static func checkKernelPath(_ config: inout GatewayConfiguration, lines: [String: Int], file: String) throws(ConfigError) {
        let explicit = lines["kernel_path"] != nil
        if config.forwarding != .userspace {
            if explicit && !config.kernelPath {
                throw ConfigError(file: file, line: lines["forwarding"] ?? 0,
                                  message: "forwarding: \(config.forwarding.rawValue) needs the kernel path, and kernel_path is off (line \(lines["kernel_path"]!))")
            }
            config.kernelPath = true
        }
        guard config.kernelPath else { return }
        let line = lines["kernel_path"] ?? lines["forwarding"] ?? 0
        guard config.controlListen != nil else {
            throw ConfigError(file: file, line: line, message: "kernel_path: the kernel path carries pushed rules, and this config sets no control_listen")
        }
        guard config.publicAddress.isIPv4, !config.publicAddress.isUnspecified else {
            throw ConfigError(file: file, line: lines["public_address"] ?? line,
                              message: "public_address: the kernel path needs the gateway's own public IPv4 address (the address clients connect to), not \(config.publicAddress)")
        }
    }

    private static func makeRule(_ name: String, line: Int, keys: [String: (value: String, line: Int)],
                                 file: String) throws(ConfigError) -> RelayRule {
        let known: Set<String> = ["listen", "target", "allow", "idle_timeout", "max_connections",
                                  "protocol", "udp_idle_timeout", "max_flows", "source_ports"]
        for (key, entry) in keys where !known.contains(key) {
            throw ConfigError(file: file, line: entry.line, message: "unknown setting \"\(key)\" in [forward \(name)]")
        }
        guard let listenEntry = keys["listen"] else {
            throw ConfigError(file: file, line: line, message: "[forward \(name)] needs `listen = ADDRESS:PORT`")
        }
        guard let targetEntry = keys["target"] else {
            throw ConfigError(file: file, line: line, message: "[forward \(name)] needs `target = HOST:PORT`")
        }
        guard let listen = SocketAddress(listenEntry.value) else {
            throw ConfigError(file: file, line: listenEntry.line,
                              message: "listen: \"\(listenEntry.value)\" is not a numeric address and port (e.g. 0.0.0.0:20001 or [::]:20001)")
        }
        guard listen.port != 0 else {
            throw ConfigError(file: file, line: listenEntry.line, message: "listen: port must be 1-65535")
        }
        guard let (host, port) = SocketAddress.splitHostPort(targetEntry.value), port != 0 else {
            throw ConfigError(file: file, line: targetEntry.line,
                              message: "target: \"\(targetEntry.value)\" is not HOST:PORT with a port of 1-65535")
        }
        let target: SocketAddress
        do {
            target = try SocketAddress.resolve(host: host, port: port)
        } catch {
            throw ConfigError(file: file, line: targetEntry.line, message: "target: \(error)")
        }
        var allow: [CIDR] = []
        if let allowEntry = keys["allow"] {
            for item in allowEntry.value.split(separator: ",") {
                let text = String(item.trimmingWhitespace())
                guard let prefix = CIDR(text) else {
                    throw ConfigError(file: file, line: allowEntry.line,
                                      message: "allow: \"\(text)\" is not an address or CIDR prefix (e.g. 203.0.113.0/24)")
                }
                allow.append(prefix)
            }
        }
        var rule = RelayRule(id: name, listen: listen, allow: allow, target: target)
        if let idle = keys["idle_timeout"] {
            let fail = { (message: String) in ConfigError(file: file, line: idle.line, message: message) }
            rule.idleTimeoutNanoseconds = try duration("idle_timeout", idle.value, allowOff: true, fail)
        }
        if let proto = keys["protocol"] {
            switch proto.value.lowercased() {
            case "tcp": rule.transport = .tcp
            case "udp": rule.transport = .udp
            case "tcp+udp", "udp+tcp", "both": rule.transport = .both
            default:
                throw ConfigError(file: file, line: proto.line,
                                  message: "protocol: \"\(proto.value)\" is not tcp, udp or tcp+udp")
            }
        }
        if let idle = keys["udp_idle_timeout"] {
            let fail = { (message: String) in ConfigError(file: file, line: idle.line, message: message) }
            guard let d = try duration("udp_idle_timeout", idle.value, allowOff: false, fail), d > 0 else {
                throw fail("udp_idle_timeout must be more than 0")
            }
            rule.udpIdleTimeoutNanoseconds = d
        }
        if let flows = keys["max_flows"] {
            let fail = { (message: String) in ConfigError(file: file, line: flows.line, message: message) }
            rule.maxFlows = try integer("max_flows", flows.value, in: 1...10_000_000, fail)
        }
        if let ports = keys["source_ports"] {
            let parts = ports.value.split(separator: "-", omittingEmptySubsequences: false).map { String($0.trimmingWhitespace()) }
            guard (1...2).contains(parts.count), let low = UInt16(parts[0]), let high = UInt16(parts.last!), low >= 1, low <= high else {
                throw ConfigError(file: file, line: ports.line,
                                  message: "source_ports: \"\(ports.value)\" is not a port or range of ports 1-65535 (e.g. 55000 or 55000-55099)")
            }
            guard rule.transport.contains(.udp) else {
                throw ConfigError(file: file, line: ports.line, message: "source_ports applies to udp forwards only (set protocol = udp or tcp+udp)")
            }
            rule.sourcePorts = low...high
        }
        for key in ["udp_idle_timeout", "max_flows"] where keys[key] != nil && !rule.transport.contains(.udp) {
            throw ConfigError(file: file, line: keys[key]!.line, message: "\(key) applies to udp forwards only (set protocol = udp or tcp+udp)")
        }
        if let max = keys["max_connections"] {
            let fail = { (message: String) in ConfigError(file: file, line: max.line, message: message) }
            rule.maxConnections = try integer("max_connections", max.value, in: 1...10_000_000, fail)
        }
        return rule
    }

    // MARK: Values

    static func integer(_ key: String, _ value: String, in range: ClosedRange<Int>,
                        _ fail: (String) -> ConfigError) throws(ConfigError) -> Int {
        guard let n = Int(value), range.contains(n) else {
            throw fail("\(key): \"\(value)\" is not a whole number from \(range.lowerBound) to \(range.upperBound)")
        }
        return n
    }

    /// Parses `500ms`, `5s`, `2m`, `1h` (or `off` when allowed, giving nil) into nanoseconds.
    static func duration(_ key: String, _ value: String, allowOff: Bool,
                         _ fail: (String) -> ConfigError) throws(ConfigError) -> UInt64? {
        let lower = value.lowercased()
        if allowOff && (lower == "off" || lower == "0") { return nil }
        let units: [(String, UInt64)] = [("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000)]
        for (suffix, scale) in units where lower.hasSuffix(suffix) {
            let number = lower.dropLast(suffix.count)
            if let n = UInt64(number), n <= 1_000_000_000, !number.isEmpty {
                return n * scale
            }
        }
        throw fail("\(key): \"\(value)\" is not a duration (e.g. 500ms, 5s, 2m, 1h\(allowOff ? " or off" : ""))")
    }

    static func seconds(_ key: String, _ value: String, in range: ClosedRange<Int>,
                        _ fail: (String) -> ConfigError) throws(ConfigError) -> Int {
        let nanos = try duration(key, value, allowOff: false, fail) ?? 0
        let secs = Int(nanos / 1_000_000_000)
        guard nanos % 1_000_000_000 == 0, range.contains(secs) else {
            throw fail("\(key): \"\(value)\" must be whole seconds from \(range.lowerBound)s to \(range.upperBound)s")
        }
        return secs
    }

    /// Parses `65536`, `64k` or `1m` into bytes.
    static func size(_ key: String, _ value: String, in range: ClosedRange<Int>,
                     _ fail: (String) -> ConfigError) throws(ConfigError) -> Int {
        let lower = value.lowercased()
        var scale = 1
        var digits = Substring(lower)
        if lower.hasSuffix("k") { scale = 1024; digits = digits.dropLast() }
        else if lower.hasSuffix("m") { scale = 1 << 20; digits = digits.dropLast() }
        guard let n = Int(digits), range.contains(n * scale) else {
            throw fail("\(key): \"\(value)\" is not a size from \(range.lowerBound) to \(range.upperBound) bytes (e.g. 64k, 1m)")
        }
        return n * scale
    }

    private static func readFile(_ path: String) -> String? {
        guard let fd = try? FileDescriptor.openReadOnly(path) else { return nil }
        defer { fd.close() }
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let result = chunk.withUnsafeMutableBytes { try? fd.read(into: $0) }
            guard case .done(let n)? = result else { return nil }
            if n == 0 { break }
            data.append(contentsOf: chunk[0..<n])
            if data.count > 16 << 20 { return nil }
        }
        return String(decoding: data, as: UTF8.self)
    }
}

extension StringProtocol {
    func trimmingWhitespace() -> Substring {
        var s = Substring(self)
        while let first = s.first, first == " " || first == "\t" || first == "\r" { s = s.dropFirst() }
        while let last = s.last, last == " " || last == "\t" || last == "\r" { s = s.dropLast() }
        return s
    }
}
