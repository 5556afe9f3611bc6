import ControlProtocol
import Foundation
import Synchronization
import SystemLayer

/// Where the broker is: `host:port`, or an `http://` or `https://` URL with an optional base path.
public struct BrokerAddress: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16
    /// `https://`: the calls go over TLS, trusting what enrollment pinned (issue 14).
    public var tls: Bool = false
    /// Prepended to `/v1/...` (empty, or starting with `/` and without a trailing one).
    public var basePath: String

    /// Parses what `--broker` takes.
    /// - Throws: `ControlError` naming `--broker` and what is wrong.
    public init(_ text: String) throws(ControlError) {
        var rest = Substring(text.trimmingSpaces())
        var defaultPort: UInt16? = nil
        if rest.lowercased().hasPrefix("https://") {
            rest = rest.dropFirst(8)
            defaultPort = 443
            tls = true
        } else if rest.lowercased().hasPrefix("http://") {
            rest = rest.dropFirst(7)
            defaultPort = 80
        } else if rest.contains("://") {
            throw ControlError(400, field: "--broker", "--broker: \"\(text)\" has an unknown scheme; give https://HOST[:PORT], http://HOST[:PORT] or HOST:PORT")
        }
        var path = ""
        if let slash = rest.firstIndex(of: "/") {
            path = String(rest[slash...])
            rest = rest[..<slash]
            while path.hasSuffix("/") { path.removeLast() }
        }
        let authority = String(rest)
        guard !authority.isEmpty else { throw ControlError(400, field: "--broker", "--broker: \"\(text)\" has no host") }
        if let (host, port) = SocketAddress.splitHostPort(authority), port != 0, !host.isEmpty {
            self.host = host
            self.port = port
        } else if let defaultPort, !authority.contains(":") || authority.hasPrefix("[") && authority.hasSuffix("]") {
            host = authority.hasPrefix("[") ? String(authority.dropFirst().dropLast()) : authority
            port = defaultPort
        } else {
            throw ControlError(400, field: "--broker", "--broker: \"\(text)\" is not HOST:PORT or http(s)://HOST[:PORT][/PATH] with a port of 1-65535")
        }
        guard host.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "@") }), host.utf8.count <= 253 else {
            throw ControlError(400, field: "--broker", "--broker: \"\(text)\" has an invalid host")
        }
        guard path.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "?") && $0 != UInt8(ascii: "#") }) else {
            throw ControlError(400, field: "--broker", "--broker: \"\(text)\" has an invalid path")
        }
        basePath = path
    }

    public var url: String {
        let h = host.contains(":") ? "[\(host)]" : host
        return "\(tls ? "https" : "http")://\(h):\(port)\(basePath)"
    }

    public var description: String { url }
}

/// What `--broker`, `--gateway-id` and `--port-range` store (`gateway-state.json`).
public struct StoredSettings: Codable, Sendable, Equatable {
    public var broker: String?
    public var gatewayID: Int?
    public var portRange: PortRange?
    /// An https broker's certificate as pinned at enrollment ("SHA256:AB:..."),
    /// or nil when `brokerCA` is the trust instead.
    public var brokerPin: String?
    /// An https broker's CA (PEM), from `--broker-ca`: the chain must verify and name the host.
    public var brokerCA: String?

    enum CodingKeys: String, CodingKey {
        case broker
        case gatewayID = "gateway_id"
        case portRange = "port_range"
        case brokerPin = "broker_pin"
        case brokerCA = "broker_ca"
    }

    public init(broker: String? = nil, gatewayID: Int? = nil, portRange: PortRange? = nil) {
        self.broker = broker
        self.gatewayID = gatewayID
        self.portRange = portRange
    }
}

/// The gateway's state directory: stored settings, the control key (mode
/// 0600), the pushed rules, the daemon's pid and its last status.
public struct StateDirectory: Sendable {
    public let path: String

    public init(_ path: String) { self.path = path }

    public var settingsPath: String { path + "/gateway-state.json" }
    public var keyPath: String { path + "/control.key" }
    /// An https broker's CA from `--broker-ca` (the PEM in `gateway-state.json`, as a file for OpenSSL).
    public var brokerCAPath: String { path + "/broker-ca.pem" }
    public var pidPath: String { path + "/gateway.pid" }
    public var statusPath: String { path + "/status.json" }

    /// Creates the directory (mode 0700) when missing.
    public func create() throws(ControlError) {
        do throws(Errno) { try StateFile.makeDirectories(path, mode: 0o700) } catch {
            throw ControlError(500, field: "--state-dir", "--state-dir: cannot create \(path): \(error)")
        }
    }

    public func loadSettings() throws(ControlError) -> StoredSettings {
        let bytes: [UInt8]?
        do throws(Errno) { bytes = try StateFile.read(settingsPath) } catch {
            throw ControlError(500, "\(settingsPath): cannot read: \(error)")
        }
        guard let bytes else { return StoredSettings() }
        do { return try JSONDecoder().decode(StoredSettings.self, from: Data(bytes)) } catch {
            throw ControlError(500, "\(settingsPath): not valid settings (\(RuleStore.shortDescription(error)))")
        }
    }

    public func saveSettings(_ settings: StoredSettings) throws(ControlError) {
        try create()
        do throws(Errno) { try StateFile.writeAtomically(settingsPath, ControlJSON.encode(settings), mode: 0o600, directoryOwner: true) } catch {
            throw ControlError(500, "\(settingsPath): cannot write: \(error)")
        }
    }

    /// The stored control key, or nil when none is stored.
    /// - Throws: `ControlError` naming the file (never its content).
    public func loadKey() throws(ControlError) -> ControlKey? {
        let bytes: [UInt8]?
        do throws(Errno) { bytes = try StateFile.read(keyPath, limit: 4096) } catch {
            throw ControlError(500, "\(keyPath): cannot read: \(error)")
        }
        guard let bytes else { return nil }
        do throws(ControlKeyError) { return try ControlKey(text: String(decoding: bytes, as: UTF8.self)) } catch {
            throw ControlError(500, "\(keyPath): \(error)")
        }
    }

    public func saveKey(_ key: ControlKey) throws(ControlError) {
        try create()
        do throws(Errno) { try StateFile.writeAtomically(keyPath, Array((key.text + "\n").utf8), mode: 0o600, directoryOwner: true) } catch {
            throw ControlError(500, "\(keyPath): cannot write: \(error)")
        }
    }

    /// The running daemon's pid, when its pid file names a live process.
    public func runningPID() -> Int32? {
        guard let bytes = try? StateFile.read(pidPath, limit: 64),
              let pid = Int32(String(decoding: bytes, as: UTF8.self).trimmingSpaces().filter { $0 != "\n" }),
              ProcessSignal.processExists(pid) else { return nil }
        return pid
    }

    public func writePID(_ pid: Int32) throws(ControlError) {
        do throws(Errno) { try StateFile.writeAtomically(pidPath, Array("\(pid)\n".utf8), mode: 0o644) } catch {
            throw ControlError(500, "\(pidPath): cannot write: \(error)")
        }
    }

    public func removePID() { StateFile.remove(pidPath) }
}

/// What the daemon last reported (`status.json`), for `--status`. Holds no key.
public struct StatusReport: Codable, Sendable, Equatable {
    public struct Registration: Codable, Sendable, Equatable {
        public var state: String
        public var lastRegistered: Int64?
        public var lastHeartbeat: Int64?
        public var lastError: String?
        public var controlURL: String?

        enum CodingKeys: String, CodingKey {
            case state
            case lastRegistered = "last_registered"
            case lastHeartbeat = "last_heartbeat"
            case lastError = "last_error"
            case controlURL = "control_url"
        }

        public init(state: String, lastRegistered: Int64? = nil, lastHeartbeat: Int64? = nil, lastError: String? = nil,
                    controlURL: String? = nil) {
            self.state = state
            self.lastRegistered = lastRegistered
            self.lastHeartbeat = lastHeartbeat
            self.lastError = lastError
            self.controlURL = controlURL
        }
    }

    public var pid: Int32
    public var updated: Int64
    public var broker: String?
    public var gatewayID: Int?
    public var registration: Registration
    public var rules: [RuleState]
    public var sessions: Int
    public var portsInUse: [String]
    public var portRange: PortRange

    enum CodingKeys: String, CodingKey {
        case pid, updated, broker, registration, rules, sessions
        case gatewayID = "gateway_id"
        case portsInUse = "ports_in_use"
        case portRange = "port_range"
    }

    public init(pid: Int32, updated: Int64, broker: String?, gatewayID: Int?, registration: Registration,
                rules: [RuleState], sessions: Int, portsInUse: [String], portRange: PortRange) {
        self.pid = pid
        self.updated = updated
        self.broker = broker
        self.gatewayID = gatewayID
        self.registration = registration
        self.rules = rules
        self.sessions = sessions
        self.portsInUse = portsInUse
        self.portRange = portRange
    }

    /// Written often, so not fsynced: a lost status is rewritten later.
    /// - Returns: false when it could not be written.
    @discardableResult
    public func write(to directory: StateDirectory) -> Bool {
        (try? StateFile.writeAtomically(directory.statusPath, encoded(), mode: 0o644, durable: false)) != nil
    }

    /// `ControlJSON.encode(self)`, byte for byte (tested), with the rules
    /// written by `ControlJSON.encodeRule`: the maintenance thread writes
    /// this every second, and with 2,000 rules held JSONEncoder took 3 % of
    /// the gateway's CPU (issue 15). The rest of the report goes through
    /// JSONEncoder with no rules; its `"rules":[]`, which with sorted keys
    /// appears once and only as a key (a string value cannot hold an
    /// unescaped quote), is then replaced by the rules.
    public func encoded() -> [UInt8] {
        var shell = self
        shell.rules = []
        var bytes = ControlJSON.encode(shell)
        let empty = Array(#""rules":[]"#.utf8)
        guard let at = bytes.firstRange(of: empty) else { return ControlJSON.encode(self) }
        var list = Array(#""rules":["#.utf8)
        list.reserveCapacity(rules.count * 200 + 10)
        for (index, rule) in rules.enumerated() {
            if index > 0 { list.append(UInt8(ascii: ",")) }
            list += ControlJSON.encodeRule(rule)
        }
        list.append(UInt8(ascii: "]"))
        bytes.replaceSubrange(at, with: list)
        return bytes
    }

    public static func read(from directory: StateDirectory) -> StatusReport? {
        guard let bytes = try? StateFile.read(directory.statusPath) else { return nil }
        return try? JSONDecoder().decode(StatusReport.self, from: Data(bytes))
    }
}

/// When the daemon rewrites `status.json`: when what it says changes
/// (looked at every second), and at least every `refreshSeconds`, so its
/// `updated` still shows a live daemon. With 2,000 rules the report is
/// about 400 KB; rewritten every second, its encoding, its write and the
/// writeback ext4 starts when it is renamed over the old one took 30-50 ms
/// of the gateway's CPU a second, in bursts that delayed pushes (issue 15).
public final class StatusWriter: Sendable {
    public static let refreshSeconds: Int64 = 10
    private let last = Mutex<StatusReport?>(nil)

    public init() {}

    /// Writes `report` when it is due.
    /// - Returns: true when it was written.
    @discardableResult
    public func write(_ report: StatusReport, to directory: StateDirectory) -> Bool {
        guard isDue(report), report.write(to: directory) else { return false }
        last.withLock { $0 = report }
        return true
    }

    /// True when `report` differs from the last one written in more than
    /// its time, or that one is `refreshSeconds` old (or from the future:
    /// the clock was set back), or none was written yet.
    public func isDue(_ report: StatusReport) -> Bool {
        last.withLock { last in
            guard var previous = last else { return true }
            let age = report.updated - previous.updated
            if age >= Self.refreshSeconds || age < 0 { return true }
            previous.updated = report.updated
            return previous != report
        }
    }
}
