import AsyncHTTPClient
import CertificateFiles
import ConnectionManager
import Foundation
import KeyValueConfig
import NIOCore
import NIOSSL
import ServiceSupport
import SecurityGateway
import SessionGrants
import SystemLayer

/// Where `pcoip-cmsg-setup` works and how it talks to its user.
public struct SetupEnvironment: Sendable {
    /// HP's folder for the Connection Manager and Security Gateway.
    public static let defaultDataDirectory = "/opt/teradici/cmsg"

    public var dataDirectory: String
    /// Where `pcoip-connection-manager` and `pcoip-security-gateway` are.
    public var binDirectory: String
    public var systemdDirectory: String
    /// systemd is PID 1 (`/run/systemd/system` exists).
    public var systemdRunning: Bool
    /// Asks a question on the terminal; nil when there is none (or at end of input).
    public var ask: @Sendable (String) -> String?
    public var print: @Sendable (String) -> Void
    public var hostName: String

    public init(dataDirectory: String, binDirectory: String, systemdDirectory: String, systemdRunning: Bool,
                ask: @escaping @Sendable (String) -> String?, print: @escaping @Sendable (String) -> Void, hostName: String) {
        self.dataDirectory = dataDirectory
        self.binDirectory = binDirectory
        self.systemdDirectory = systemdDirectory
        self.systemdRunning = systemdRunning
        self.ask = ask
        self.print = print
        self.hostName = hostName
    }
}

/// The files of an installation under the data directory.
struct Layout {
    let root: String
    var cmConfig: String { root + "/ConnectionManager.conf" }
    var sgConfig: String { root + "/SecurityGateway.conf" }
    var certs: String { root + "/certs" }
    var sslCertificate: String { certs + "/connection-manager.crt" }
    var sslKey: String { certs + "/connection-manager.key" }
    var brokerCA: String { certs + "/broker-ca.crt" }
    var signingKey: String { certs + "/grant-signing.key" }
    var verifyingCertificate: String { certs + "/grant-verifying.crt" }
    var sgData: String { root + "/sg-data" }
    var run: String { root + "/run" }
    var cmPID: String { run + "/pcoip-connection-manager.pid" }
    var sgPID: String { run + "/pcoip-security-gateway.pid" }
}

/// `pcoip-cmsg-setup`: installs, configures, reports on and removes the
/// Connection Manager and the Security Gateway of this package, as HP's
/// tool of that name does for its own. Every check runs before anything is
/// written; a failure names the flag or file and changes nothing.
public enum CMSGSetup {
    public static let cmService = "pcoip-connection-manager"
    public static let sgService = "pcoip-security-gateway"

    public static func run(_ flags: SetupFlags, _ environment: SetupEnvironment) async throws(SetupError) {
        for warning in flags.warnings { environment.print("warning: \(warning)") }
        switch flags.command {
        case .install: try await install(flags, environment)
        case .configure: try await configure(flags, environment)
        case .status: await status(flags, environment)
        case .uninstall: try uninstall(flags, environment)
        }
    }

    // MARK: install

    static func install(_ flags: SetupFlags, _ env: SetupEnvironment) async throws(SetupError) {
        let layout = Layout(root: flags.string("data-dir") ?? env.dataDirectory)
        if FileManager.default.fileExists(atPath: layout.cmConfig) || FileManager.default.fileExists(atPath: layout.sgConfig) {
            throw .failed("already installed in \(layout.root): change it with `pcoip-cmsg-setup configure`, or `uninstall` first; nothing was changed")
        }
        var accepted = flags.flag("accept-policies")
        if accepted == nil {
            accepted = try confirm(env, "Do you accept the policies under which the Connection Manager and Security Gateway are used?", flag: "--accept-policies")
        }
        guard accepted == true else {
            throw .usage("--accept-policies=true is required to install; nothing was changed")
        }
        let cmEnabled = flags.flag("enable-connection-manager") ?? true
        let sgEnabled = flags.flag("enable-security-gateway") ?? true
        guard cmEnabled || sgEnabled else {
            throw .usage("--enable-connection-manager=false and --enable-security-gateway=false: nothing to install")
        }
        var plan = Plan(layout: layout, cmEnabled: cmEnabled, sgEnabled: sgEnabled)
        plan.gatewayGroup = flags.string("gateway-group") ?? "cmsg"
        plan.logLevel = flags.flag("debug") == true ? "debug" : "info"
        if cmEnabled {
            var url = flags.string("broker-url") ?? ""
            if url.isEmpty { url = try required(env, "The broker's URL (https://HOST[:PORT])", flag: "--broker-url") }
            guard BrokerURL(url) != nil else {
                throw .usage("--broker-url: \"\(url)\" is not https://HOST[:PORT] (http:// only to a loopback address)")
            }
            plan.brokerURL = url
            plan.externalGateways = try externalGateways(flags)
            plan.allowSelfSignedBroker = flags.flag("allow-self-signed-broker") ?? false
            if let ca = flags.string("ca-cert") { plan.brokerCA = try readCA(ca) }
            plan.ssl = try serverCertificate(flags, env, hostAddresses: hostAddresses(flags, env))
            plan.maxEstablishments = try number(flags, "max-session-establishments", 1...100_000)
            plan.maxCommunications = try number(flags, "max-client-communications", 1...100_000)
        }
        if sgEnabled && !cmEnabled && flags.has("ssl-cert") {
            // A gateway-only host: the certificate its control endpoint presents (the deployment's, which the CM trusts).
            plan.ssl = try serverCertificate(flags, env, hostAddresses: hostAddresses(flags, env), interactive: false)
        }
        if sgEnabled {
            var addresses = flags.list("external-pcoip-ip")
            if addresses.isEmpty {
                addresses = [try required(env, "The public IP address clients reach this Security Gateway at", flag: "--external-pcoip-ip")]
            }
            for address in addresses where IPAddress(address) == nil {
                throw .usage("--external-pcoip-ip: \"\(address)\" is not an IP address")
            }
            plan.externalPCoIP = addresses
            plan.collaboration = flags.flag("enable-collaboration") ?? false
            plan.maxConnections = try number(flags, "max-connections", 1...1_000_000)
        }
        if !cmEnabled && !plan.externalGateways.isEmpty {
            throw .usage("--external-sg-ip is a Connection Manager setting; this install has no Connection Manager")
        }
        if cmEnabled && !sgEnabled && plan.externalGateways.isEmpty {
            throw .usage("--external-sg-ip is required without --enable-security-gateway: the Connection Manager needs a Security Gateway")
        }
        try plan.setAddresses(flags, ipv6: flags.flag("enable-ipv6") ?? false)
        try await plan.setGrantKeys(flags, env)
        if !(flags.flag("ignore-disk-req") ?? false) { try checkDisk(layout.root) }
        let written = try plan.write()
        env.print("installed in \(layout.root):")
        for file in written { env.print("  wrote \(file)") }
        try services(plan, env, start: !(flags.flag("no-start") ?? false))
    }

    /// The decisions of an install or configure, then written at once.
    struct Plan {
        let layout: Layout
        var cmEnabled: Bool
        var sgEnabled: Bool
        var gatewayGroup = "cmsg"
        var logLevel = "info"
        var brokerURL = ""
        var brokerCA: [UInt8]?
        var allowSelfSignedBroker = false
        var ssl: (certificate: [UInt8], key: [UInt8], generated: Bool)?
        var signing: (key: [UInt8], certificate: [UInt8], generated: Bool)?
        var verifying: [UInt8]?
        var externalPCoIP: [String] = []
        var externalGateways: [String] = []
        var collaboration = false
        var maxEstablishments: Int?
        var maxCommunications: Int?
        var maxConnections: Int?
        var cmListen = "0.0.0.0:443"
        var cmControl = "127.0.0.1:4174"
        var sgListen = "0.0.0.0:4172"
        var sgControl = "127.0.0.1:4173"
        var ipv6 = false

        init(layout: Layout, cmEnabled: Bool, sgEnabled: Bool) {
            self.layout = layout
            self.cmEnabled = cmEnabled
            self.sgEnabled = sgEnabled
        }

        mutating func setAddresses(_ flags: SetupFlags, ipv6: Bool) throws(SetupError) {
            self.ipv6 = ipv6
            if ipv6 { cmListen = "[::]:443"; sgListen = "[::]:4172" }
            for (flag, keyPath) in [("cm-listen", \Plan.cmListen), ("cm-control", \Plan.cmControl),
                                    ("sg-listen", \Plan.sgListen), ("sg-control", \Plan.sgControl)] {
                if let value = flags.string(flag) {
                    guard SystemLayer.SocketAddress(value) != nil else { throw .usage("--\(flag): \"\(value)\" is not a numeric HOST:PORT") }
                    self[keyPath: keyPath] = value
                }
            }
        }

        /// The grant keys: given (checked against each other), or made when both roles are here.
        mutating func setGrantKeys(_ flags: SetupFlags, _ env: SetupEnvironment) async throws(SetupError) {
            if let path = flags.string("jwt-signing-key") {
                let pem = try readFile(path, flag: "--jwt-signing-key")
                do throws(GrantError) {
                    _ = try await GrantSigner.load(pem: String(decoding: pem, as: UTF8.self).replacingOccurrences(of: "\r\n", with: "\n"))
                } catch {
                    throw .usage("--jwt-signing-key \(path): \(error)")
                }
                signing = (pem, [], false)
            }
            if let path = flags.string("jwt-verifying-cert") {
                let pem = try readFile(path, flag: "--jwt-verifying-cert")
                do throws(GrantError) {
                    _ = try await GrantVerifier.load(certificatePEM: String(decoding: pem, as: UTF8.self).replacingOccurrences(of: "\r\n", with: "\n"),
                                                     audience: gatewayGroup)
                } catch {
                    throw .usage("--jwt-verifying-cert \(path): \(error)")
                }
                verifying = pem
            }
            if signing == nil && (cmEnabled || verifying == nil) {
                guard verifying == nil else {
                    throw .usage("--jwt-verifying-cert without --jwt-signing-key: give the Connection Manager's signing key too")
                }
                guard cmEnabled else {
                    throw .usage("--jwt-verifying-cert is required for a Security Gateway without a Connection Manager (the certificate of the Connection Manager's --jwt-signing-key)")
                }
                do throws(CertificateFiles.Problem) {
                    let pair = try CertificateFiles.makeGrantSigningPair(commonName: "\(env.hostName) grant signing")
                    signing = (Array(pair.key.utf8), Array(pair.certificate.utf8), true)
                    verifying = Array(pair.certificate.utf8)
                } catch {
                    throw .failed("\(error)")
                }
            }
            if sgEnabled && verifying == nil {
                throw .usage("--jwt-verifying-cert is required with --jwt-signing-key when this host runs a Security Gateway")
            }
            if let signing, let verifying, !signing.generated {
                try await Self.checkPair(signing: signing.key, verifying: verifying, audience: gatewayGroup)
            }
        }

        /// A grant signed with the key must verify with the certificate.
        static func checkPair(signing: [UInt8], verifying: [UInt8], audience: String) async throws(SetupError) {
            do throws(GrantError) {
                let signer = try await GrantSigner.load(pem: String(decoding: signing, as: UTF8.self).replacingOccurrences(of: "\r\n", with: "\n"))
                let verifier = try await GrantVerifier.load(certificatePEM: String(decoding: verifying, as: UTF8.self).replacingOccurrences(of: "\r\n", with: "\n"),
                                                            audience: audience)
                let now = Date()
                let probe = SessionGrant(sessionID: "setup-check", agent: "127.0.0.1:4172", serverName: "setup.check",
                                         audience: audience, issuedAt: now, expires: now.addingTimeInterval(60))
                _ = try await verifier.verify(try await signer.sign(probe), recordUse: false)
            } catch {
                throw .usage("--jwt-verifying-cert does not verify grants signed with --jwt-signing-key: \(error)")
            }
        }

        var cmConfigText: String {
            var lines = ["# Written by pcoip-cmsg-setup. `pcoip-cmsg-setup configure` changes it; SIGHUP reloads it.",
                         "ListenAddress = \(cmListen)", "ControlListen = \(cmControl)",
                         "SSLCert = \(layout.sslCertificate)", "SSLKey = \(layout.sslKey)",
                         "BrokerUrl = \(brokerURL)"]
            if brokerCA != nil { lines.append("BrokerCaCert = \(layout.brokerCA)") }
            if allowSelfSignedBroker { lines.append("BrokerAllowSelfSigned = true") }
            lines += ["JwtSigningKey = \(layout.signingKey)", "GatewayGroup = \(gatewayGroup)",
                      "SecurityGatewayEnabled = \(sgEnabled)"]
            if sgEnabled {
                lines += ["SecurityGatewayControl = \(sgControl)", "ExternalPcoipIp = \(externalPCoIP.joined(separator: ", "))"]
                if let port = SystemLayer.SocketAddress(sgListen)?.port, port != 4172 { lines.append("SecurityGatewayPort = \(port)") }
            }
            if !externalGateways.isEmpty { lines.append("ExternalSecurityGateways = \(externalGateways.joined(separator: ", "))") }
            lines.append("MaxSessionEstablishments = \(maxEstablishments ?? 40)")
            lines.append("MaxClientCommunications = \(maxCommunications ?? 400)")
            lines.append("EnableIPv6 = \(ipv6)")
            lines.append("LogLevel = \(logLevel)")
            return lines.joined(separator: "\n") + "\n"
        }

        var sgConfigText: String {
            var lines = ["# Written by pcoip-cmsg-setup. `pcoip-cmsg-setup configure` changes it; SIGHUP reloads it.",
                         "ListenAddress = \(sgListen)", "ControlListen = \(sgControl)", "GatewayGroup = \(gatewayGroup)",
                         "JwtVerifyingCert = \(layout.verifyingCertificate)", "MaxConnections = \(maxConnections ?? 5000)",
                         "EnableCollaboration = \(collaboration)", "LogLevel = \(logLevel)"]
            // The control endpoint presents the installation's certificate (the CM trusts it);
            // without one the gateway makes a self-signed pair in its data folder.
            if ssl != nil { lines += ["ControlTLSCert = \(layout.sslCertificate)", "ControlTLSKey = \(layout.sslKey)"] }
            if externalPCoIP.isEmpty { lines.removeLast(0) }
            return lines.joined(separator: "\n") + "\n"
        }

        /// Checks the config texts with the daemons' own parsers, then writes
        /// every file; a failure removes what was written.
        func write() throws(SetupError) -> [String] {
            if cmEnabled {
                do throws(ConfigFileError) { _ = try ConnectionManagerConfig.parse(cmConfigText, file: layout.cmConfig) } catch {
                    throw .failed("the Connection Manager's config would not load (\(error)); nothing was changed")
                }
            }
            if sgEnabled {
                do throws(ConfigFileError) { _ = try SecurityGatewayConfig.parse(sgConfigText, file: layout.sgConfig) } catch {
                    throw .failed("the Security Gateway's config would not load (\(error)); nothing was changed")
                }
            }
            var files: [(String, [UInt8], UInt32)] = []
            if let ssl { files += [(layout.sslCertificate, ssl.certificate, 0o644), (layout.sslKey, ssl.key, 0o600)] }
            if let brokerCA { files.append((layout.brokerCA, brokerCA, 0o644)) }
            if cmEnabled, let signing { files.append((layout.signingKey, signing.key, 0o600)) }
            if let verifying { files.append((layout.verifyingCertificate, verifying, 0o644)) }
            if cmEnabled { files.append((layout.cmConfig, Array(cmConfigText.utf8), 0o640)) }
            if sgEnabled { files.append((layout.sgConfig, Array(sgConfigText.utf8), 0o640)) }
            var written: [String] = []
            do throws(Errno) {
                for directory in [layout.root, layout.certs, layout.sgData, layout.run] {
                    try StateFile.makeDirectories(directory, mode: 0o700)
                }
                for (path, bytes, mode) in files {
                    try StateFile.writeAtomically(path, bytes, mode: mode)
                    written.append(path)
                }
            } catch {
                for path in written { StateFile.remove(path) }
                throw .failed("cannot write in \(layout.root): \(error); nothing was left behind")
            }
            return written
        }
    }

    // MARK: configure

    static func configure(_ flags: SetupFlags, _ env: SetupEnvironment) async throws(SetupError) {
        let layout = Layout(root: flags.string("data-dir") ?? env.dataDirectory)
        let fm = FileManager.default
        let cmText = fm.contents(atPath: layout.cmConfig).map { String(decoding: $0, as: UTF8.self) }
        let sgText = fm.contents(atPath: layout.sgConfig).map { String(decoding: $0, as: UTF8.self) }
        guard cmText != nil || sgText != nil else {
            throw .failed("not installed in \(layout.root) (no ConnectionManager.conf or SecurityGateway.conf): run `pcoip-cmsg-setup install` first")
        }
        for role in ["enable-connection-manager", "enable-security-gateway"] where flags.has(role) {
            let now = role == "enable-connection-manager" ? cmText != nil : sgText != nil
            if flags.flag(role) != now {
                throw .usage("--\(role): adding or removing a role is done with uninstall and install; nothing was changed")
            }
        }
        let readOnly: Set<String> = ["accept-policies", "data-dir", "bin-dir", "systemd-dir", "ignore-disk-req", "no-start",
                                     "enable-connection-manager", "enable-security-gateway"]
        let changing = flags.names.filter { !readOnly.contains($0) }
        guard !changing.isEmpty else { throw .usage("configure: give at least one setting to change (see --help)") }
        var cmChanges: [(key: String, value: String?)] = []
        var sgChanges: [(key: String, value: String?)] = []
        var files: [(String, [UInt8], UInt32)] = []
        var restartNeeded: [String] = []
        func needCM(_ flag: String) throws(SetupError) {
            guard cmText != nil else { throw .usage("--\(flag) is a Connection Manager setting; this host has no Connection Manager") }
        }
        func needSG(_ flag: String) throws(SetupError) {
            guard sgText != nil else { throw .usage("--\(flag) is a Security Gateway setting; this host has no Security Gateway") }
        }
        for name in changing {
            switch name {
            case "broker-url":
                try needCM(name)
                let url = flags.string(name)!
                guard BrokerURL(url) != nil else { throw .usage("--broker-url: \"\(url)\" is not https://HOST[:PORT]") }
                cmChanges.append(("BrokerUrl", url))
            case "external-pcoip-ip":
                for address in flags.list(name) where IPAddress(address) == nil {
                    throw .usage("--external-pcoip-ip: \"\(address)\" is not an IP address")
                }
                if cmText != nil { cmChanges.append(("ExternalPcoipIp", flags.list(name).joined(separator: ", "))) }
            case "external-sg-ip":
                try needCM(name)
                cmChanges.append(("ExternalSecurityGateways", try externalGateways(flags).joined(separator: ", ")))
            case "ssl-cert", "ssl-key", "self-signed", "host-address":
                try needCM(name)
                if name == "ssl-key" || name == "host-address", flags.has("ssl-cert") || flags.has("self-signed") { continue }
                if name == "self-signed" && flags.has("ssl-cert") { continue }
                let ssl = try serverCertificate(flags, env, hostAddresses: hostAddresses(flags, env), interactive: false)
                files += [(layout.sslCertificate, ssl.certificate, 0o644), (layout.sslKey, ssl.key, 0o600)]
                cmChanges += [("SSLCert", layout.sslCertificate), ("SSLKey", layout.sslKey)]
            case "ca-cert":
                try needCM(name)
                files.append((layout.brokerCA, try readCA(flags.string(name)!), 0o644))
                cmChanges.append(("BrokerCaCert", layout.brokerCA))
            case "allow-self-signed-broker":
                try needCM(name)
                cmChanges.append(("BrokerAllowSelfSigned", flags.flag(name)! ? "true" : nil))
            case "jwt-signing-key":
                try needCM(name)
                let pem = try readFile(flags.string(name)!, flag: "--jwt-signing-key")
                let verifying = try flags.string("jwt-verifying-cert").map { path throws(SetupError) in try readFile(path, flag: "--jwt-verifying-cert") }
                    ?? (sgText != nil ? fm.contents(atPath: layout.verifyingCertificate).map { Array($0) } : nil)
                if let verifying {
                    try await Plan.checkPair(signing: pem, verifying: verifying, audience: flags.string("gateway-group") ?? "cmsg")
                } else {
                    do throws(GrantError) { _ = try await GrantSigner.load(pem: String(decoding: pem, as: UTF8.self)) } catch {
                        throw .usage("--jwt-signing-key: \(error)")
                    }
                }
                files.append((layout.signingKey, pem, 0o600))
                cmChanges.append(("JwtSigningKey", layout.signingKey))
            case "jwt-verifying-cert":
                try needSG(name)
                let pem = try readFile(flags.string(name)!, flag: "--jwt-verifying-cert")
                if !flags.has("jwt-signing-key"), cmText != nil, let signing = fm.contents(atPath: layout.signingKey) {
                    try await Plan.checkPair(signing: Array(signing), verifying: pem, audience: flags.string("gateway-group") ?? "cmsg")
                }
                files.append((layout.verifyingCertificate, pem, 0o644))
                sgChanges.append(("JwtVerifyingCert", layout.verifyingCertificate))
            case "enable-collaboration":
                try needSG(name)
                sgChanges.append(("EnableCollaboration", flags.flag(name)! ? "true" : "false"))
            case "enable-ipv6":
                if cmText != nil { cmChanges.append(("EnableIPv6", flags.flag(name)! ? "true" : "false")) }
            case "debug":
                let level = flags.flag(name)! ? "debug" : "info"
                if cmText != nil { cmChanges.append(("LogLevel", level)) }
                if sgText != nil { sgChanges.append(("LogLevel", level)) }
            case "gateway-group":
                let group = flags.string(name)!
                if cmText != nil { cmChanges.append(("GatewayGroup", group)) }
                if sgText != nil { sgChanges.append(("GatewayGroup", group)) }
            case "max-session-establishments":
                try needCM(name)
                cmChanges.append(("MaxSessionEstablishments", String(try number(flags, name, 1...100_000)!)))
            case "max-client-communications":
                try needCM(name)
                cmChanges.append(("MaxClientCommunications", String(try number(flags, name, 1...100_000)!)))
            case "max-connections":
                try needSG(name)
                sgChanges.append(("MaxConnections", String(try number(flags, name, 1...1_000_000)!)))
            case "cm-listen", "cm-control":
                try needCM(name)
                guard let value = flags.string(name), SystemLayer.SocketAddress(value) != nil else { throw .usage("--\(name): not a numeric HOST:PORT") }
                cmChanges.append((name == "cm-listen" ? "ListenAddress" : "ControlListen", value))
                restartNeeded.append("--\(name)")
            case "sg-listen", "sg-control":
                try needSG(name)
                guard let value = flags.string(name), SystemLayer.SocketAddress(value) != nil else { throw .usage("--\(name): not a numeric HOST:PORT") }
                sgChanges.append((name == "sg-listen" ? "ListenAddress" : "ControlListen", value))
                if cmText != nil && name == "sg-control" { cmChanges.append(("SecurityGatewayControl", value)) }
                restartNeeded.append("--\(name)")
            default:
                throw .usage("--\(name) cannot be changed by configure")
            }
        }
        // The new files, checked by the daemons' own parsers before anything is written.
        var configs: [(String, [UInt8], UInt32)] = []
        if let cmText, !cmChanges.isEmpty {
            let text = KeyValueFile.updating(cmText, with: cmChanges)
            do throws(ConfigFileError) { _ = try ConnectionManagerConfig.parse(text, file: layout.cmConfig) } catch {
                throw .usage("the change would not load: \(error); nothing was changed")
            }
            configs.append((layout.cmConfig, Array(text.utf8), 0o640))
        }
        if let sgText, !sgChanges.isEmpty {
            let text = KeyValueFile.updating(sgText, with: sgChanges)
            do throws(ConfigFileError) { _ = try SecurityGatewayConfig.parse(text, file: layout.sgConfig) } catch {
                throw .usage("the change would not load: \(error); nothing was changed")
            }
            configs.append((layout.sgConfig, Array(text.utf8), 0o640))
        }
        // Certificates and keys first, the configs that name them last; each file is replaced atomically.
        var backups: [(String, [UInt8]?)] = []
        do throws(Errno) {
            for (path, bytes, mode) in files + configs {
                backups.append((path, fm.contents(atPath: path).map { Array($0) }))
                try StateFile.writeAtomically(path, bytes, mode: mode)
                env.print("updated \(path)")
            }
        } catch {
            for (path, old) in backups.reversed() {
                if let old { try? StateFile.writeAtomically(path, old) } else { StateFile.remove(path) }
            }
            throw .failed("cannot write in \(layout.root): \(error); the previous files are back")
        }
        // Running services pick the change up without dropping a session.
        try reload(layout, env, cm: !cmChanges.isEmpty, sg: !sgChanges.isEmpty)
        if !restartNeeded.isEmpty {
            env.print("note: \(restartNeeded.joined(separator: ", ")) take effect when the service restarts (listeners are not moved under live sessions)")
        }
    }

    // MARK: status

    static func status(_ flags: SetupFlags, _ env: SetupEnvironment) async {
        let layout = Layout(root: flags.string("data-dir") ?? env.dataDirectory)
        let cm = (try? ConnectionManagerConfig.load(path: layout.cmConfig))
        let sg = (try? SecurityGatewayConfig.load(path: layout.sgConfig))
        guard cm != nil || sg != nil else {
            env.print("not installed in \(layout.root)")
            return
        }
        env.print("installation:    \(layout.root)")
        if let cm {
            env.print("connection manager: \(serviceState(cmService, pidFile: layout.cmPID, env)), listening on \(cm.listen)")
            let health = await get("http://\(cm.controlListen)/health")
            env.print("  health:        \(health.map { $0.status == 200 ? "healthy" : "unhealthy: \(($0.object["reason"] as? String) ?? "HTTP \($0.status)")" } ?? "does not answer on \(cm.controlListen)")")
            env.print("  broker:        \(cm.brokerURL)")
            if let status = await get("http://\(cm.controlListen)/v1/status") {
                let object = status.object
                if let problem = object["broker_problem"] as? String { env.print("  broker state:  \(problem)") }
                env.print("  client sessions: \(object["client_sessions"] as? Int ?? 0), establishments in progress: \(object["establishments_in_progress"] as? Int ?? 0)/\(object["max_session_establishments"] as? Int ?? 0), communications: \(object["communications_in_progress"] as? Int ?? 0)/\(object["max_client_communications"] as? Int ?? 0)")
                for gateway in object["security_gateways"] as? [[String: Any]] ?? [] {
                    let healthy = gateway["healthy"] as? Bool == true
                    env.print("  security gateway \(gateway["address"] as? String ?? "?")\((gateway["local"] as? Bool) == true ? " (this host)" : ""): \(healthy ? "healthy" : "unhealthy (\(gateway["problem"] as? String ?? "?"))"), \(gateway["active_sessions"] as? Int ?? 0) session(s)")
                }
                if let counters = object["counters"] as? [String: Int] {
                    env.print("  counters:      " + counters.keys.sorted().map { "\($0) \(counters[$0]!)" }.joined(separator: ", "))
                }
            }
        }
        if let sg {
            env.print("security gateway: \(serviceState(sgService, pidFile: layout.sgPID, env)), listening on \(sg.listen)")
            let trust = sg.controlTLSCertificate.isEmpty ? layout.sgData + "/control-tls.crt" : sg.controlTLSCertificate
            let tls = sg.controlPlainHTTP ? nil : try? ServerTLS.pinnedClient(trusting: trust)
            let scheme = sg.controlPlainHTTP ? "http" : "https"
            let health = await get("\(scheme)://\(sg.controlListen)/health", tls: tls)
            env.print("  health:        \(health.map { $0.status == 200 ? "healthy" : "unhealthy: \(($0.object["reason"] as? String) ?? "HTTP \($0.status)")" } ?? "does not answer on \(sg.controlListen)")")
            if let status = await get("\(scheme)://\(sg.controlListen)/v1/status", tls: tls) {
                let object = status.object
                env.print("  sessions:      \(object["active_sessions"] as? Int ?? 0) active, \(object["prepared_grants"] as? Int ?? 0) prepared grant(s), \(object["udp_bindings"] as? Int ?? 0) UDP binding(s)")
            }
        }
    }

    struct Fetched {
        var status: Int
        var object: [String: Any]
    }

    static func get(_ url: String, tls: TLSConfiguration? = nil) async -> Fetched? {
        do {
            var request = HTTPClientRequest(url: url)
            request.tlsConfiguration = tls
            let response = try await HTTPClient.shared.execute(request, timeout: .seconds(3))
            let body = try await response.body.collect(upTo: 1 << 20)
            let object = (try? JSONSerialization.jsonObject(with: Data(body.readableBytesView))) as? [String: Any] ?? [:]
            return Fetched(status: Int(response.status.code), object: object)
        } catch {
            return nil
        }
    }

    // MARK: uninstall

    static func uninstall(_ flags: SetupFlags, _ env: SetupEnvironment) throws(SetupError) {
        let layout = Layout(root: flags.string("data-dir") ?? env.dataDirectory)
        let fm = FileManager.default
        guard fm.fileExists(atPath: layout.cmConfig) || fm.fileExists(atPath: layout.sgConfig) else {
            throw .failed("not installed in \(layout.root): nothing to remove")
        }
        if env.systemdRunning {
            for service in [cmService, sgService] {
                let unit = env.systemdDirectory + "/\(service).service"
                guard fm.fileExists(atPath: unit) else { continue }
                _ = runTool("/bin/systemctl", ["disable", "--now", service])
                StateFile.remove(unit)
                env.print("stopped and removed the \(service) service")
            }
            _ = runTool("/bin/systemctl", ["daemon-reload"])
        }
        for (service, pidFile) in [(cmService, layout.cmPID), (sgService, layout.sgPID)] {
            guard let pid = runningPID(pidFile) else { continue }
            _ = ProcessSignal.send(.terminate, to: pid)
            let stopped = waitGone(pid, seconds: 30)
            env.print(stopped ? "stopped \(service) (pid \(pid))" : "warning: \(service) (pid \(pid)) did not stop within 30 s")
        }
        for path in [layout.cmConfig, layout.sgConfig, layout.certs, layout.sgData, layout.run] where fm.fileExists(atPath: path) {
            do { try fm.removeItem(atPath: path) } catch {
                throw .failed("cannot remove \(path): \(error.localizedDescription)")
            }
            env.print("removed \(path)")
        }
        if (try? fm.contentsOfDirectory(atPath: layout.root))?.isEmpty == true {
            try? fm.removeItem(atPath: layout.root)
            env.print("removed \(layout.root)")
        }
    }
}
