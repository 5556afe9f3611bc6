import BrokerCore
import ControlProtocol
import Foundation
import Glibc
import Synchronization
import Testing

/// The built `leostream-broker`, run as a child process with its output captured.
final class BrokerProcess: @unchecked Sendable {
    let process = Process()
    private final class Captured: Sendable {
        let stdout = Mutex("")
        let stderr = Mutex("")
    }
    private let output = Captured()
    private let stdoutPipe = Pipe()
    private let stderrPipe = Pipe()

    /// The binary next to the test bundle (SwiftPM builds both into one folder), or $BROKER_BINARY.
    static var binary: String {
        if let path = ProcessInfo.processInfo.environment["BROKER_BINARY"] { return path }
        let bundle = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [bundle, bundle.deletingLastPathComponent()] {
            let path = candidate.appendingPathComponent("leostream-broker").path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return bundle.appendingPathComponent("leostream-broker").path
    }

    init(_ arguments: [String], environment: [String: String] = [:]) throws {
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        env.removeValue(forKey: "LEOSTREAM_BROKER_ADMIN_PASSWORD")
        for (key, value) in environment { env[key] = value }
        process.environment = env
        process.standardOutput = stdoutPipe
        process.standardError = stderrPipe
        let output = self.output
        stdoutPipe.fileHandleForReading.readabilityHandler = { handle in
            let data = handle.availableData
            if !data.isEmpty { output.stdout.withLock { $0 += String(decoding: data, as: UTF8.self) } }
        }
        stderrPipe.fileHandleForReading.readabilityHandler = { handle in
            let data = handle.availableData
            if !data.isEmpty { output.stderr.withLock { $0 += String(decoding: data, as: UTF8.self) } }
        }
        try process.run()
    }

    var stdout: String { output.stdout.withLock { $0 } }
    var stderr: String { output.stderr.withLock { $0 } }

    /// Runs the binary to the end; returns its exit status and output.
    static func run(_ arguments: [String], environment: [String: String] = [:]) async throws -> (status: Int32, stdout: String, stderr: String) {
        let child = try BrokerProcess(arguments, environment: environment)
        let status = try #require(await child.waitForExit(seconds: 60), "leostream-broker \(arguments) did not exit")
        return (status, child.stdout, child.stderr)
    }

    func waitForExit(seconds: Double) async -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning {
            if Date() > deadline { return nil }
            try? await Task.sleep(for: .milliseconds(20))
        }
        process.waitUntilExit()
        // Let the readers take what is left in the pipes.
        try? await Task.sleep(for: .milliseconds(100))
        stdoutPipe.fileHandleForReading.readabilityHandler = nil
        stderrPipe.fileHandleForReading.readabilityHandler = nil
        return process.terminationStatus
    }

    /// Waits until standard error contains `text` (or the process exits).
    func waitForLog(_ text: String, seconds: Double = 30) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while !stderr.contains(text) && process.isRunning && Date() < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        return stderr.contains(text)
    }

    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}

@Suite("the leostream-broker binary")
struct BinaryTests {
    @Test("--help describes every option and exits 0")
    func help() async throws {
        let (status, stdout, _) = try await BrokerProcess.run(["--help"])
        #expect(status == 0)
        for text in ["--listen", "--database", "--data-dir", "--info", "--health", "--admin-password-file",
                     "LEOSTREAM_BROKER_ADMIN_PASSWORD", "serve", "/v1", "/rest/v1", "SIGTERM"] {
            #expect(stdout.contains(text), "--help lacks \(text)")
        }
        let serveHelp = try await BrokerProcess.run(["serve", "--help"])
        #expect(serveHelp.status == 0)
        #expect(serveHelp.stdout.contains("--listen"))
        let version = try await BrokerProcess.run(["--version"])
        #expect(version.status == 0 && !version.stdout.isEmpty)
    }

    @Test("bad flags: a clear message and a non-zero exit")
    func badFlags() async throws {
        let listen = try await BrokerProcess.run(["--listen", "nowhere", "--info"])
        #expect(listen.status != 0)
        #expect(listen.stderr.contains("--listen must be HOST:PORT"))
        let both = try await BrokerProcess.run(["--info", "--health"])
        #expect(both.status != 0)
        #expect(both.stderr.contains("not both"))
        let offline = try await BrokerProcess.run(["--info", "--heartbeat-interval", "10", "--offline-after", "5"])
        #expect(offline.status != 0)
        #expect(offline.stderr.contains("--offline-after must be more than --heartbeat-interval"), "\(offline.stderr)")
    }

    @Test("--info and --health before the first start: info exits 0, health exits 1 naming the database")
    func beforeFirstStart() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let dataDir = folder.path("data")
        let info = try await BrokerProcess.run(["--info", "--data-dir", dataDir, "--listen", "127.0.0.1:1"])
        #expect(info.status == 0, "\(info)")
        #expect(info.stdout.contains("leostream-broker "))
        #expect(info.stdout.contains("not created yet"))
        #expect(info.stdout.contains("CPU"))
        #expect(info.stdout.contains("disk:"))
        #expect(!FileManager.default.fileExists(atPath: dataDir + "/broker.sqlite"), "--info must not create the database")

        let health = try await BrokerProcess.run(["--health", "--data-dir", dataDir, "--listen", "127.0.0.1:1"])
        #expect(health.status == 1)
        #expect(health.stderr.contains("\(dataDir)/broker.sqlite: no such file"))
        #expect(health.stderr.contains("listener 127.0.0.1:1"))
    }

    @Test("an empty database and no admin password: serve refuses to start and says what to give")
    func noAdminPassword() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let result = try await BrokerProcess.run(["--data-dir", folder.path("data"), "--listen", "127.0.0.1:0"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("--admin-password-file"))
        let short = folder.path("short")
        try "ab\n".write(toFile: short, atomically: true, encoding: .utf8)
        let refused = try await BrokerProcess.run(["--data-dir", folder.path("data"), "--listen", "127.0.0.1:0", "--admin-password-file", short])
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

        let broker = try BrokerProcess(["serve", "--listen", "127.0.0.1:0", "--data-dir", dataDir, "--database", database,
                                        "--admin-password-file", passwordFile, "--bcrypt-cost", "4"])
        defer { broker.stop() }
        #expect(await broker.waitForLog("listening on 127.0.0.1:"), "\(broker.stderr)")
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
        let info = try await BrokerProcess.run(["--info", "--database", database, "--listen", listen])
        #expect(info.status == 0, "\(info)")
        for text in ["leostream-broker 0.1.0", database, "schema:    0003-connection-groups (current)", "\(listen) (accepting connections)",
                     "gateways:  2 registered, 1 online, 1 offline", "gw-one", "gw1.example.com", "CPU(s)", "memory", "disk:",
                     "version 9.8.7", "enrolled (key \(Secrets.fingerprint(key)))", "not enrolled"] {
            #expect(info.stdout.contains(text), "--info lacks \(text):\n\(info.stdout)")
        }
        #expect(!info.stdout.contains(key.text) && !broker.stderr.contains(key.text), "the control key reached --info or the log")
        // With a shorter --offline-after the same gateway counts as offline once its heartbeat is older.
        try await Task.sleep(for: .seconds(3))
        let later = try await BrokerProcess.run(["--info", "--database", database, "--listen", listen,
                                                 "--heartbeat-interval", "1", "--offline-after", "2"])
        #expect(later.stdout.contains("gateways:  2 registered, 0 online, 2 offline"), "\(later.stdout)")
        let health = try await BrokerProcess.run(["--health", "--database", database, "--listen", listen])
        #expect(health.status == 0, "\(health)")
        #expect(health.stdout.contains("healthy"))

        kill(broker.process.processIdentifier, SIGTERM)
        #expect(await broker.waitForExit(seconds: 30) == 0, "\(broker.stderr)")
        // Neither the password nor the session token ever reaches a log.
        #expect(!broker.stderr.contains(password))
        #expect(!broker.stderr.contains(sid))
        #expect(!broker.stdout.contains(password))

        let stopped = try await BrokerProcess.run(["--health", "--database", database, "--listen", listen])
        #expect(stopped.status == 1)
        #expect(stopped.stderr.contains("listener \(listen)"))

        // A database that cannot be read: --health names it.
        try Data(repeating: 0x42, count: 8192).write(to: URL(fileURLWithPath: database))
        let corrupt = try await BrokerProcess.run(["--health", "--database", database, "--listen", listen])
        #expect(corrupt.status == 1)
        #expect(corrupt.stderr.contains(database))

        // The password comes from the environment too, and the first admin is made only once.
        let other = folder.path("other.sqlite")
        let fromEnv = try BrokerProcess(["--listen", "127.0.0.1:0", "--database", other, "--bcrypt-cost", "4"],
                                        environment: ["LEOSTREAM_BROKER_ADMIN_PASSWORD": "env-password"])
        defer { fromEnv.stop() }
        #expect(await fromEnv.waitForLog("listening on"), "\(fromEnv.stderr)")
        #expect(fromEnv.stderr.contains("created the first admin"))
        #expect(!fromEnv.stderr.contains("env-password"))
        kill(fromEnv.process.processIdentifier, SIGINT)
        #expect(await fromEnv.waitForExit(seconds: 30) == 0)
        let again = try BrokerProcess(["--listen", "127.0.0.1:0", "--database", other])
        defer { again.stop() }
        #expect(await again.waitForLog("listening on"), "\(again.stderr)")
        #expect(!again.stderr.contains("created the first admin"))
        kill(again.process.processIdentifier, SIGTERM)
        #expect(await again.waitForExit(seconds: 30) == 0)
    }
}
