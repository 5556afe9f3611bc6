import BrokerCore
import ControlProtocol
import Foundation
import Glibc
import Synchronization
import Testing
import TestSupport

/// The built `leostream-broker` (next to the test bundle, or $BROKER_BINARY),
/// run as a child process (`ChildProcess`). The admin password variable of
/// the test's own environment never reaches it unless a test gives one.
enum BrokerProcess {
    static var binary: String { ChildProcess.builtBinary("leostream-broker", override: "BROKER_BINARY") }

    static func start(_ arguments: [String], environment: [String: String] = [:]) throws -> ChildProcess {
        try ChildProcess(binary, arguments, environment: environmentFor(environment))
    }

    /// Runs the binary to the end; returns its exit status and output.
    static func run(_ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, stdout: String, stderr: String) {
        let done = try ChildProcess.run(binary, arguments, environment: environmentFor(environment))
        return (done.status, done.stdout, done.stderr)
    }

    private static func environmentFor(_ given: [String: String]) -> [String: String?] {
        var environment: [String: String?] = ["LEOSTREAM_BROKER_ADMIN_PASSWORD": nil]
        for (key, value) in given { environment[key] = value }
        return environment
    }
}

@Suite("the leostream-broker binary", .offPool)
struct BinaryTests {
    @Test("--help describes every option and exits 0")
    func help() async throws {
        let (status, stdout, _) = try BrokerProcess.run(["--help"])
        #expect(status == 0)
        for text in ["--listen", "--database", "--data-dir", "--info", "--health", "--admin-password-file",
                     "LEOSTREAM_BROKER_ADMIN_PASSWORD", "serve", "/v1", "/rest/v1", "SIGTERM"] {
            #expect(stdout.contains(text), "--help lacks \(text)")
        }
        let serveHelp = try BrokerProcess.run(["serve", "--help"])
        #expect(serveHelp.status == 0)
        #expect(serveHelp.stdout.contains("--listen"))
        let version = try BrokerProcess.run(["--version"])
        #expect(version.status == 0 && !version.stdout.isEmpty)
    }

    @Test("bad flags: a clear message and a non-zero exit")
    func badFlags() async throws {
        let listen = try BrokerProcess.run(["--listen", "nowhere", "--info"])
        #expect(listen.status != 0)
        #expect(listen.stderr.contains("--listen must be HOST:PORT"))
        let both = try BrokerProcess.run(["--info", "--health"])
        #expect(both.status != 0)
        #expect(both.stderr.contains("not both"))
        let offline = try BrokerProcess.run(["--info", "--heartbeat-interval", "10", "--offline-after", "5"])
        #expect(offline.status != 0)
        #expect(offline.stderr.contains("--offline-after must be more than --heartbeat-interval"), "\(offline.stderr)")
    }

    @Test("--info and --health before the first start: info exits 0, health exits 1 naming the database")
    func beforeFirstStart() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let dataDir = folder.path("data")
        let info = try BrokerProcess.run(["--info", "--data-dir", dataDir, "--listen", "127.0.0.1:1"])
        #expect(info.status == 0, "\(info)")
        #expect(info.stdout.contains("leostream-broker "))
        #expect(info.stdout.contains("not created yet"))
        #expect(info.stdout.contains("CPU"))
        #expect(info.stdout.contains("disk:"))
        #expect(!FileManager.default.fileExists(atPath: dataDir + "/broker.sqlite"), "--info must not create the database")

        let health = try BrokerProcess.run(["--health", "--data-dir", dataDir, "--listen", "127.0.0.1:1"])
        #expect(health.status == 1)
        #expect(health.stderr.contains("\(dataDir)/broker.sqlite: no such file"))
        #expect(health.stderr.contains("listener 127.0.0.1:1"))
    }

    @Test("an empty database and no admin password: serve refuses to start and says what to give")
    func noAdminPassword() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let result = try BrokerProcess.run(["--data-dir", folder.path("data"), "--listen", "127.0.0.1:0"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("--admin-password-file"))
        let short = folder.path("short")
        try "ab\n".write(toFile: short, atomically: true, encoding: .utf8)
        let refused = try BrokerProcess.run(["--data-dir", folder.path("data"), "--listen", "127.0.0.1:0", "--admin-password-file", short])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("must be 3 to 100 characters"))
    }

    @Test("serve: first admin from a file, login over HTTP, --info and --health against it, SIGTERM, then unhealthy")
    func serveInfoHealth() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let dataDir = folder.path("data")
        let database = folder.path("db/broker.sqlite")
        let passwordFile = folder.path("admin-password")
        let password = "first-admin-password-42"
        try (password + "\n").write(toFile: passwordFile, atomically: true, encoding: .utf8)

        let broker = try BrokerProcess.start(["serve", "--listen", "127.0.0.1:0", "--data-dir", dataDir, "--database", database,
                                        "--admin-password-file", passwordFile, "--bcrypt-cost", "4", "--plain-http"])
        defer { broker.stop() }
        #expect(broker.waitForOutput("listening on 127.0.0.1:"), "\(broker.stderr)")
        let portText = broker.stderr.components(separatedBy: "listening on 127.0.0.1:").last?.prefix { $0.isNumber } ?? ""
        let port = try #require(Int(portText), "no port in \(broker.stderr)")
        #expect(broker.stderr.contains("created the first admin 'admin'"))

        let client = HTTPClient(port: port)
        let login = try await client.json("POST", "/v1/session/login", ["user_login": "admin", "password": password])
        #expect(login.status == 200, "\(login)")
        let sid = try #require(login.object["sid"] as? String)
        let gateway = try await client.json("POST", "/v1/gateways", ["name": "gw-one", "address": "gw1.example.com"], token: sid)
        #expect(gateway.status == 201)
        let gateway2 = try await client.json("POST", "/v1/gateways", ["name": "gw-two", "address": "gw2.example.com"], token: sid)
        #expect(gateway2.status == 201)
        // Enroll gw-one and register it with a signed request, as a gateway would.
        let gatewayID = try #require(gateway.storedData["id"] as? Int)
        let enrolled = try await client.json("POST", "/v1/gateways/\(gatewayID)/enrollment", token: sid)
        let key = try ControlKey(text: try #require(enrolled.object["control_key"] as? String, "\(enrolled)"))
        let body = try JSONSerialization.data(withJSONObject: [
            "gateway_id": gatewayID, "version": "9.8.7", "control_url": "http://10.0.0.2:19010",
            "port_range": ["first": 20001, "last": 22000], "rules": [],
        ] as [String: Any])
        let authorization = ControlSigner(gatewayID: gatewayID, key: key)
            .authorize(direction: .gatewayToBroker, method: "POST", path: "/v1/gateway-agent/register", body: Array(body))
        let registered = try await client.send("POST", "/v1/gateway-agent/register", body: body,
                                               headers: ["Authorization": authorization, "Content-Type": "application/json"])
        #expect(registered.status == 200, "\(registered)")

        let listen = "127.0.0.1:\(port)"
        let info = try BrokerProcess.run(["--info", "--database", database, "--listen", listen])
        #expect(info.status == 0, "\(info)")
        let version = try BrokerProcess.run(["--version"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(version.contains("(commit "), "--version names the commit: \(version)")
        for text in ["leostream-broker \(version)", database, "schema:    0007-pending-rules (current)", "\(listen) (accepting connections)",
                     "gateways:  2 registered, 1 online, 1 offline", "gw-one", "gw1.example.com", "CPU(s)", "memory", "disk:",
                     "version 9.8.7", "enrolled (key \(Secrets.fingerprint(key)))", "not enrolled"] {
            #expect(info.stdout.contains(text), "--info lacks \(text):\n\(info.stdout)")
        }
        #expect(!info.stdout.contains(key.text) && !broker.stderr.contains(key.text), "the control key reached --info or the log")
        // With a shorter --offline-after the same gateway counts as offline once its heartbeat is older.
        // Polled: its heartbeat becomes older than 2 s while we wait.
        var later = ""
        #expect(eventually {
            later = (try? BrokerProcess.run(["--info", "--database", database, "--listen", listen,
                                             "--heartbeat-interval", "1", "--offline-after", "2"]).stdout) ?? ""
            return later.contains("gateways:  2 registered, 0 online, 2 offline")
        }, "\(later)")
        let health = try BrokerProcess.run(["--health", "--database", database, "--listen", listen])
        #expect(health.status == 0, "\(health)")
        #expect(health.stdout.contains("healthy"))

        broker.signal(SIGTERM)
        #expect(broker.waitForExit() == 0, "\(broker.stderr)")
        // Neither the password nor the session token ever reaches a log.
        #expect(!broker.stderr.contains(password))
        #expect(!broker.stderr.contains(sid))
        #expect(!broker.stdout.contains(password))

        let stopped = try BrokerProcess.run(["--health", "--database", database, "--listen", listen])
        #expect(stopped.status == 1)
        #expect(stopped.stderr.contains("listener \(listen)"))

        // A database that cannot be read: --health names it.
        try Data(repeating: 0x42, count: 8192).write(to: URL(fileURLWithPath: database))
        let corrupt = try BrokerProcess.run(["--health", "--database", database, "--listen", listen])
        #expect(corrupt.status == 1)
        #expect(corrupt.stderr.contains(database))

        // The password comes from the environment too, and the first admin is made only once.
        let other = folder.path("other.sqlite")
        let fromEnv = try BrokerProcess.start(["--listen", "127.0.0.1:0", "--database", other, "--bcrypt-cost", "4", "--plain-http"],
                                        environment: ["LEOSTREAM_BROKER_ADMIN_PASSWORD": "env-password"])
        defer { fromEnv.stop() }
        #expect(fromEnv.waitForOutput("listening on"), "\(fromEnv.stderr)")
        #expect(fromEnv.stderr.contains("created the first admin"))
        #expect(!fromEnv.stderr.contains("env-password"))
        fromEnv.signal(SIGINT)
        #expect(fromEnv.waitForExit() == 0)
        let again = try BrokerProcess.start(["--listen", "127.0.0.1:0", "--database", other, "--plain-http"])
        defer { again.stop() }
        #expect(again.waitForOutput("listening on"), "\(again.stderr)")
        #expect(!again.stderr.contains("created the first admin"))
        again.signal(SIGTERM)
        #expect(again.waitForExit() == 0)
    }

    @Test("TLS by default: a self-signed certificate made once in the data folder, its hash logged; plain HTTP only with --plain-http")
    func tlsByDefault() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let dataDir = folder.path("data")
        let broker = try BrokerProcess.start(["--listen", "127.0.0.1:0", "--data-dir", dataDir, "--bcrypt-cost", "4"],
                                             environment: ["LEOSTREAM_BROKER_ADMIN_PASSWORD": "tls-admin-password"])
        defer { broker.stop() }
        #expect(broker.waitForOutput("listening on 127.0.0.1:"), "\(broker.stderr)")
        let certificate = dataDir + "/broker-tls.crt"
        let keyMode = (try FileManager.default.attributesOfItem(atPath: dataDir + "/broker-tls.key")[.posixPermissions] as? NSNumber)?.intValue
        #expect(keyMode == 0o600)
        let portText = broker.stderr.components(separatedBy: "listening on 127.0.0.1:").last?.prefix { $0.isNumber } ?? ""
        let port = try #require(Int(portText), "no port in \(broker.stderr)")
        // Hummingbird's own "listening on" line can come before ours: wait for ours.
        #expect(broker.waitForOutput("(https:"), "\(broker.stderr)")
        let fingerprint = try ChildProcess.run("/usr/bin/openssl", ["x509", "-noout", "-fingerprint", "-sha256", "-in", certificate])
        let hash = fingerprint.stdout.split(separator: "=").last.map { "SHA256:" + $0.trimmingCharacters(in: .whitespacesAndNewlines) } ?? "?"
        #expect(broker.stderr.contains("certificate \(hash)"), "the log does not name the certificate's hash \(hash)")
        // A client trusting that certificate gets an answer (401: no session); plain HTTP gets none.
        let secure = try ChildProcess.run("/usr/bin/curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", certificate,
                                                            "https://127.0.0.1:\(port)/v1/system/health"])
        #expect(secure.stdout == "401", "\(secure)")
        let plain = try ChildProcess.run("/usr/bin/curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(port)/v1/system/health"])
        #expect(plain.stdout != "401" && plain.stdout != "200", "plain HTTP was answered: \(plain)")
        broker.signal(SIGTERM)
        #expect(broker.waitForExit() == 0)

        // The certificate is made once: a restart keeps it.
        let before = try String(contentsOfFile: certificate, encoding: .utf8)
        let again = try BrokerProcess.start(["--listen", "127.0.0.1:0", "--data-dir", dataDir])
        defer { again.stop() }
        #expect(again.waitForOutput("listening on"), "\(again.stderr)")
        #expect(try String(contentsOfFile: certificate, encoding: .utf8) == before)

        // A second broker on the same SQLite file is refused, naming the file, its lock and the holder.
        let second = try BrokerProcess.run(["--listen", "127.0.0.1:0", "--data-dir", dataDir])
        #expect(second.status != 0 && second.stderr.contains("broker.sqlite is in use by process")
                    && second.stderr.contains("broker.sqlite.lock"), "\(second)")
        let againPort = again.stderr.components(separatedBy: "listening on 127.0.0.1:").last?.prefix { $0.isNumber } ?? ""
        #expect(try ChildProcess.run("/usr/bin/curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", certificate,
                                                       "https://127.0.0.1:\(againPort)/v1/system/health"]).stdout == "401",
                "the running broker is unharmed")
        let both = try BrokerProcess.run(["--listen", "127.0.0.1:0", "--data-dir", dataDir, "--plain-http", "--tls-cert", certificate,
                                          "--tls-key", dataDir + "/broker-tls.key"])
        #expect(both.status != 0 && both.stderr.contains("--plain-http and --tls-cert/--tls-key: give one"), "\(both)")
    }
}
