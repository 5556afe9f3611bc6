import CMSGSetup
import ConnectionManager
import Foundation
import KeyValueConfig
import SecurityGateway
import Synchronization
import Testing
import TestSupport

@Suite("pcoip-cmsg-setup flags, HP style", .offPool)
struct SetupFlagTests {
    func refusal(_ arguments: [String]) -> String? {
        do throws(SetupError) {
            _ = try SetupFlags(arguments)
            return nil
        } catch {
            return error.description
        }
    }

    @Test("--flag=value and --flag value; booleans bare or =true|false; repeatable and comma-separated lists")
    func accepted() throws {
        let flags = try SetupFlags(["install", "--accept-policies", "--broker-url", "https://b.example", "--self-signed=false",
                                    "--external-pcoip-ip=203.0.113.5", "--external-pcoip-ip", "2001:db8::5,198.51.100.1",
                                    "--enable-collaboration=TRUE", "--debug=no"])
        #expect(flags.command == .install)
        #expect(flags.flag("accept-policies") == true && flags.flag("self-signed") == false)
        #expect(flags.flag("enable-collaboration") == true && flags.flag("debug") == false)
        #expect(flags.string("broker-url") == "https://b.example")
        #expect(flags.list("external-pcoip-ip") == ["203.0.113.5", "2001:db8::5", "198.51.100.1"])
        #expect(flags.flag("enable-ipv6") == nil)
    }

    @Test("HP's Docker-only flags warn; features this package lacks and unknown flags are refused by name")
    func refusals() throws {
        let docker = try SetupFlags(["install", "--darksite-bundle-path", "bundle", "--accept-policies"])
        #expect(docker.warnings.first?.contains("--darksite-bundle-path") == true && docker.flag("accept-policies") == true)
        #expect(refusal(["install", "--sso-enrollment-url=https://idp"])?.contains("--sso-enrollment-url: single sign-on enrollment is not supported") == true)
        #expect(refusal(["configure", "--enable-oauth=true"])?.contains("OAuth is not supported") == true)
        #expect(refusal(["install", "--horizon-server", "h"])?.contains("Horizon") == true)
        #expect(refusal(["install", "--reg-code", "x"])?.contains("licensing") == true)
        #expect(refusal(["install", "--colour=blue"])?.contains("--colour: unknown flag") == true)
        #expect(refusal(["install", "--broker-url"])?.contains("--broker-url needs a value") == true)
        #expect(refusal(["install", "--self-signed=maybe"])?.contains("\"maybe\" is not true or false") == true)
        #expect(refusal(["install", "--broker-url=a", "--broker-url=b"])?.contains("given twice") == true)
        #expect(refusal(["reinstall"])?.contains("not a command") == true)
        #expect(refusal(["install", "broker"])?.contains("expected a flag") == true)
    }

    @Test("KeyValueFile.updating changes only the keys named, keeping comments and order")
    func updating() throws {
        let text = "# header\nA = 1\nb = 2 # why\n\nC = 3\n"
        let updated = KeyValueFile.updating(text, with: [("B", "20"), ("C", nil), ("D", "4")])
        #expect(updated == "# header\nA = 1\nB = 20\n\nD = 4\n")
        let parsed = try KeyValueFile(parsing: "Key = value\r\nOther = x\r\n", file: "f")
        #expect(parsed.entry("key")?.value == "value" && parsed.entry("OTHER")?.line == 2)
    }
}

/// Collects what setup prints, and answers its questions (nil: no terminal).
final class SetupConsole: Sendable {
    let lines = Mutex<[String]>([])
    let answers: [String]?
    private let asked = Mutex(0)

    init(answers: [String]? = nil) { self.answers = answers }

    func environment(_ dir: String) -> SetupEnvironment {
        SetupEnvironment(dataDirectory: dir, binDirectory: "/usr/local/bin", systemdDirectory: dir + "/systemd", systemdRunning: false,
                         ask: { _ in
                             guard let answers = self.answers else { return nil }
                             return self.asked.withLock { n in defer { n += 1 }; return n < answers.count ? answers[n] : nil }
                         },
                         print: { line in self.lines.withLock { $0.append(line) } }, hostName: "cm.test")
    }

    var text: String { lines.withLock { $0.joined(separator: "\n") } }
}

@Suite("pcoip-cmsg-setup install, configure, uninstall (no systemd)", .serialized, .offPool)
struct SetupTests {
    static let base = ["--accept-policies", "--broker-url", "https://broker.example:8443", "--external-pcoip-ip", "203.0.113.5",
                       "--external-sg-ip", "203.0.113.6@10.1.0.6:4173", "--self-signed", "--gateway-group", "g1"]

    func run(_ arguments: [String], _ console: SetupConsole, dir: String) async -> SetupError? {
        do throws(SetupError) {
            try await CMSGSetup.run(try SetupFlags(arguments + ["--data-dir", dir]), console.environment(dir))
            return nil
        } catch {
            return error
        }
    }

    func temporary() -> String { NSTemporaryDirectory() + "cmsg-\(UUID().uuidString)" }

    @Test("install writes both configs the daemons load, certificates, grant keys; says how to start the services")
    func install() async throws {
        let dir = temporary()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let console = SetupConsole()
        let error = await run(["install"] + Self.base, console, dir: dir)
        #expect(error == nil, "\(error.map { "\($0)" } ?? "")")
        let cm = try ConnectionManagerConfig.load(path: dir + "/ConnectionManager.conf")
        #expect(cm.brokerURL == "https://broker.example:8443" && cm.gatewayGroup == "g1")
        #expect(cm.securityGateways.map(\.publicAddress) == ["203.0.113.5", "203.0.113.6"])
        #expect(cm.maxSessionEstablishments == 40 && cm.maxClientCommunications == 400)
        let sg = try SecurityGatewayConfig.load(path: dir + "/SecurityGateway.conf")
        #expect(sg.gatewayGroup == "g1" && sg.maxConnections == 5000)
        for file in ["certs/connection-manager.crt", "certs/connection-manager.key", "certs/grant-signing.key", "certs/grant-verifying.crt"] {
            #expect(FileManager.default.fileExists(atPath: dir + "/" + file), "\(file)")
        }
        let keyMode = try FileManager.default.attributesOfItem(atPath: dir + "/certs/grant-signing.key")[.posixPermissions] as? Int
        #expect(keyMode == 0o600)
        #expect(console.text.contains("systemd is not running here: start the services with"))
        #expect(console.text.contains("/usr/local/bin/pcoip-connection-manager serve --config \(dir)/ConnectionManager.conf"))
        #expect(console.text.contains("made a self-signed RSA 3072 certificate"))
        // A second install refuses and changes nothing.
        let before = try String(contentsOfFile: dir + "/ConnectionManager.conf", encoding: .utf8)
        let again = await run(["install"] + Self.base, SetupConsole(), dir: dir)
        #expect(again?.description.contains("already installed") == true)
        #expect(try String(contentsOfFile: dir + "/ConnectionManager.conf", encoding: .utf8) == before)
    }

    @Test("required values are asked on a terminal, and without one the flag is named; nothing is written")
    func prompts() async throws {
        let dir = temporary()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let noTerminal = await run(["install", "--external-pcoip-ip", "203.0.113.5", "--self-signed"], SetupConsole(), dir: dir)
        #expect(noTerminal == .usage("--accept-policies is required (no terminal to ask on); nothing was changed"))
        let noBroker = await run(["install", "--accept-policies", "--external-pcoip-ip", "203.0.113.5", "--self-signed"], SetupConsole(), dir: dir)
        #expect(noBroker?.description.contains("--broker-url is required") == true)
        let noCertificate = await run(["install", "--accept-policies", "--broker-url", "https://b.example", "--external-pcoip-ip", "203.0.113.5"],
                                      SetupConsole(), dir: dir)
        #expect(noCertificate?.description.contains("--self-signed or --ssl-cert with --ssl-key") == true)
        #expect(!FileManager.default.fileExists(atPath: dir + "/ConnectionManager.conf"))
        // On a terminal: the answers are taken.
        let console = SetupConsole(answers: ["y", "https://asked.example", "yes", "198.51.100.9"])
        let asked = await run(["install", "--gateway-group", "g"], console, dir: dir)
        #expect(asked == nil, "\(asked.map { "\($0)" } ?? "")")
        let cm = try ConnectionManagerConfig.load(path: dir + "/ConnectionManager.conf")
        #expect(cm.brokerURL == "https://asked.example" && cm.externalPCoIPAddresses == ["198.51.100.9"])
    }

    @Test("configure changes only what its flags name, checks first, and refuses what it cannot do")
    func configure() async throws {
        let dir = temporary()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(await run(["configure", "--debug"], SetupConsole(), dir: dir)?.description.contains("run `pcoip-cmsg-setup install` first") == true)
        #expect(await run(["install"] + Self.base, SetupConsole(), dir: dir) == nil)
        let before = try String(contentsOfFile: dir + "/ConnectionManager.conf", encoding: .utf8)
        let console = SetupConsole()
        #expect(await run(["configure", "--max-session-establishments", "7", "--enable-collaboration=true", "--debug"], console, dir: dir) == nil)
        let after = try String(contentsOfFile: dir + "/ConnectionManager.conf", encoding: .utf8)
        let changed = Set(after.split(separator: "\n")).subtracting(Set(before.split(separator: "\n")))
        #expect(changed == ["MaxSessionEstablishments = 7", "LogLevel = debug"], "\(changed)")
        #expect(try SecurityGatewayConfig.load(path: dir + "/SecurityGateway.conf").enableCollaboration)
        #expect(console.text.contains("pcoip-connection-manager is not running: the change applies when it starts"))
        // Refusals change nothing.
        let snapshot = try String(contentsOfFile: dir + "/ConnectionManager.conf", encoding: .utf8)
        #expect(await run(["configure", "--max-client-communications", "0"], SetupConsole(), dir: dir)?.description.contains("--max-client-communications") == true)
        #expect(await run(["configure", "--broker-url", "http://10.0.0.1"], SetupConsole(), dir: dir)?.description.contains("--broker-url") == true)
        #expect(await run(["configure", "--enable-security-gateway=false"], SetupConsole(), dir: dir)?.description.contains("uninstall and install") == true)
        #expect(await run(["configure", "--ssl-cert", "/nonexistent.crt", "--ssl-key", "/nonexistent.key"], SetupConsole(), dir: dir)?
                    .description.contains("/nonexistent.crt") == true)
        #expect(try String(contentsOfFile: dir + "/ConnectionManager.conf", encoding: .utf8) == snapshot)
        // A new self-signed certificate replaces the old one.
        let oldCertificate = try Data(contentsOf: URL(fileURLWithPath: dir + "/certs/connection-manager.crt"))
        #expect(await run(["configure", "--self-signed"], SetupConsole(), dir: dir) == nil)
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/certs/connection-manager.crt")) != oldCertificate)
    }

    @Test("a Security Gateway alone needs the Connection Manager's verifying certificate, and must match its signing key")
    func grantKeys() async throws {
        let dir = temporary()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let sgOnly = ["install", "--accept-policies", "--enable-connection-manager=false", "--external-pcoip-ip", "203.0.113.5"]
        #expect(await run(sgOnly, SetupConsole(), dir: dir)?.description.contains("--jwt-verifying-cert is required") == true)
        let files = try OpenSSLFiles()
        defer { files.remove() }
        try files.openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "a.key"])
        try files.openssl(["req", "-x509", "-new", "-key", "a.key", "-days", "2", "-subj", "/CN=a", "-out", "a.crt"])
        try files.openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "b.key"])
        try files.openssl(["req", "-x509", "-new", "-key", "b.key", "-days", "2", "-subj", "/CN=b", "-out", "b.crt"])
        let mismatch = await run(["install"] + Self.base + ["--jwt-signing-key", files.path("a.key"), "--jwt-verifying-cert", files.path("b.crt")],
                                 SetupConsole(), dir: dir)
        #expect(mismatch?.description.contains("does not verify grants signed with --jwt-signing-key") == true)
        #expect(!FileManager.default.fileExists(atPath: dir + "/ConnectionManager.conf"))
        #expect(await run(sgOnly + ["--jwt-verifying-cert", files.path("a.crt")], SetupConsole(), dir: dir) == nil)
        #expect(!FileManager.default.fileExists(atPath: dir + "/ConnectionManager.conf"))
        #expect(try SecurityGatewayConfig.load(path: dir + "/SecurityGateway.conf").jwtVerifyingCertificate == dir + "/certs/grant-verifying.crt")
    }

    @Test("uninstall removes what install wrote, and says when there is nothing")
    func uninstall() async throws {
        let dir = temporary()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(await run(["install"] + Self.base, SetupConsole(), dir: dir) == nil)
        let console = SetupConsole()
        #expect(await run(["uninstall"], console, dir: dir) == nil)
        #expect(!FileManager.default.fileExists(atPath: dir))
        #expect(console.text.contains("removed \(dir)/ConnectionManager.conf"))
        #expect(await run(["uninstall"], SetupConsole(), dir: dir)?.description.contains("nothing to remove") == true)
    }
}
