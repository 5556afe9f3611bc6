/// The flags of `pcoip-cmsg-setup`, read the way HP's tool takes them:
/// `--flag=value` or `--flag value`; booleans as `--flag=true|false` or bare
/// `--flag` (true); `--external-pcoip-ip` and `--external-sg-ip` repeatable
/// (or comma-separated). Flags of HP's tool that only concern its Docker
/// images are accepted with a warning; flags for features this package does
/// not have are refused by name; anything else unknown is refused by name.
public struct SetupFlags: Sendable, Equatable {
    public enum Command: String, Sendable, CaseIterable {
        case install, configure, status, uninstall
    }

    public var command: Command
    /// Every flag given, by its name without dashes (repeatable ones joined).
    public private(set) var values: [String: [String]] = [:]
    /// Warnings to print (Docker-only flags).
    public private(set) var warnings: [String] = []

    /// Flags that take a value, and whether they may repeat.
    static let valueFlags: [String: Bool] = [
        "broker-url": false, "external-pcoip-ip": true, "external-sg-ip": true, "host-address": false,
        "ssl-cert": false, "ssl-key": false, "ca-cert": false, "jwt-signing-key": false, "jwt-verifying-cert": false,
        // This package's own: where things go, and what the tests override.
        "data-dir": false, "bin-dir": false, "systemd-dir": false, "gateway-group": false,
        "cm-listen": false, "cm-control": false, "sg-listen": false, "sg-control": false,
        "max-session-establishments": false, "max-client-communications": false, "max-connections": false,
    ]
    /// Boolean flags.
    static let boolFlags: Set<String> = [
        "accept-policies", "enable-connection-manager", "enable-security-gateway", "self-signed", "enable-collaboration",
        "enable-ipv6", "ignore-disk-req", "debug", "allow-self-signed-broker", "no-start",
    ]
    /// HP's flags about its Docker images: accepted, with a warning that they do not apply.
    static let dockerOnly: Set<String> = ["darksite-bundle-path", "docker-registry", "docker-image-tag"]
    /// Features of HP's tool this package does not have: refused by name.
    static let unsupported: [(prefix: String, feature: String)] = [
        ("sso", "single sign-on enrollment"), ("oauth", "OAuth"), ("enable-oauth", "OAuth"), ("id-provider", "OAuth"),
        ("horizon", "VMware Horizon brokering"), ("enable-horizon", "VMware Horizon brokering"),
        ("license", "licensing"), ("reg-code", "licensing"), ("registration-code", "licensing"),
        ("enable-mfa", "multi-factor authentication"), ("radius", "RADIUS multi-factor authentication"),
    ]

    /// Reads `arguments` (without the program name).
    /// - Throws: `SetupError.usage` naming the flag or value that is wrong.
    public init(_ arguments: [String]) throws(SetupError) {
        guard let first = arguments.first else {
            throw .usage("give a command: install, configure, status or uninstall (see --help)")
        }
        guard let command = Command(rawValue: first) else {
            throw .usage("\(first): not a command (install, configure, status or uninstall)")
        }
        self.command = command
        var index = 1
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            guard argument.hasPrefix("--"), argument.count > 2 else {
                throw .usage("\(argument): expected a flag such as --broker-url=https://broker.example")
            }
            var name = String(argument.dropFirst(2))
            var inline: String?
            if let equals = name.firstIndex(of: "=") {
                inline = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            }
            if let refusal = Self.unsupported.first(where: { name == $0.prefix || name.hasPrefix($0.prefix + "-") }) {
                throw .usage("--\(name): \(refusal.feature) is not supported by this package; nothing was changed")
            }
            if Self.dockerOnly.contains(name) {
                if inline == nil, index < arguments.count, !arguments[index].hasPrefix("--") { index += 1 }
                warnings.append("--\(name) concerns HP's Docker images and does not apply here; ignored")
                continue
            }
            if Self.boolFlags.contains(name) {
                let text = inline ?? "true"
                guard let value = Self.bool(text) else { throw .usage("--\(name): \"\(text)\" is not true or false") }
                guard values[name] == nil else { throw .usage("--\(name) is given twice") }
                values[name] = [value ? "true" : "false"]
                continue
            }
            guard let repeatable = Self.valueFlags[name] else {
                throw .usage("--\(name): unknown flag (see pcoip-cmsg-setup \(command.rawValue) --help)")
            }
            let value: String
            if let inline {
                value = inline
            } else {
                guard index < arguments.count, !arguments[index].hasPrefix("--") else { throw .usage("--\(name) needs a value") }
                value = arguments[index]
                index += 1
            }
            guard !value.isEmpty else { throw .usage("--\(name) needs a value") }
            if repeatable {
                values[name, default: []] += value.split(separator: ",").map { String($0).trimmingSpaces() }.filter { !$0.isEmpty }
            } else {
                guard values[name] == nil else { throw .usage("--\(name) is given twice") }
                values[name] = [value]
            }
        }
    }

    static func bool(_ text: String) -> Bool? {
        switch text.lowercased() {
        case "true", "yes", "1", "on": true
        case "false", "no", "0", "off": false
        default: nil
        }
    }

    public func string(_ name: String) -> String? { values[name]?.first }
    public func list(_ name: String) -> [String] { values[name] ?? [] }
    public func flag(_ name: String) -> Bool? { values[name]?.first.map { $0 == "true" } }
    public func has(_ name: String) -> Bool { values[name] != nil }
    public var names: [String] { values.keys.sorted() }
}

/// What went wrong: the message names the flag, file or step, and says
/// whether anything was changed.
public enum SetupError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A flag or its value (exit 2).
    case usage(String)
    /// Something the machine or a file does not allow (exit 1).
    case failed(String)

    public var description: String {
        switch self {
        case .usage(let text), .failed(let text): text
        }
    }

    public var exitCode: Int32 {
        switch self {
        case .usage: 2
        case .failed: 1
        }
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while s.first == " " || s.first == "\t" { s = s.dropFirst() }
        while s.last == " " || s.last == "\t" { s = s.dropLast() }
        return String(s)
    }
}
