@testable import BrokerAPI
import BrokerCore
import Foundation
import GRDB
import Hummingbird
import Logging
import ServiceLifecycle
import Synchronization
import TestSupport

/// A clock the tests can move forward (session expiry).
final class TestClock: Sendable {
    private let offset = Mutex<TimeInterval>(0)

    var now: Date { Date().addingTimeInterval(offset.withLock { $0 }) }

    func advance(_ seconds: TimeInterval) { offset.withLock { $0 += seconds } }
}

/// A fresh temporary folder, removed by `remove()`.
struct TemporaryFolder: Sendable {
    let url: URL

    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("broker-tests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }

    func path(_ name: String) -> String { url.appendingPathComponent(name).path }

    func remove() { try? FileManager.default.removeItem(at: url) }
}

/// A real broker for one test: a SQLite file in a temporary folder, the REST API
/// served by Hummingbird on 127.0.0.1 at a port the kernel picked, and a client.
final class TestBroker: Sendable {
    static let adminPassword = "admin-secret"
    static let sessionLifetime: TimeInterval = 3600

    let folder: TemporaryFolder
    let databasePath: String
    let store: SQLiteBrokerStore
    let clock: TestClock
    let client: HTTPClient
    let api: BrokerAPI
    private let services: ServiceGroup
    private let server: Task<Void, any Error>

    private init(folder: TemporaryFolder, databasePath: String, store: SQLiteBrokerStore, clock: TestClock,
                 client: HTTPClient, api: BrokerAPI, services: ServiceGroup, server: Task<Void, any Error>) {
        self.api = api
        self.folder = folder
        self.databasePath = databasePath
        self.store = store
        self.clock = clock
        self.client = client
        self.services = services
        self.server = server
    }

    /// Starts a broker with one admin (`admin` / `adminPassword`), runs `body`, stops it.
    static func with<T>(maxBodyBytes: Int = 1 << 20, offlineAfter: Int = 30, proxyHeaderTimeout: TimeInterval = 10,
                        _ body: (TestBroker) async throws -> T) async throws -> T {
        let broker = try await start(maxBodyBytes: maxBodyBytes, offlineAfter: offlineAfter, proxyHeaderTimeout: proxyHeaderTimeout)
        do {
            let result = try await body(broker)
            await broker.stop()
            return result
        } catch {
            await broker.stop()
            throw error
        }
    }

    static func start(maxBodyBytes: Int, offlineAfter: Int = 30, proxyHeaderTimeout: TimeInterval = 10) async throws -> TestBroker {
        let folder = try TemporaryFolder()
        let path = folder.path("broker.sqlite")
        let store = try SQLiteBrokerStore(path: path)
        // Cost 4: the lowest bcrypt allows; the tests check behaviour, not slowness.
        let hasher = PasswordHasher(cost: 4)
        _ = try await AdminBootstrap.ensureAdmin(store: store, login: "admin", password: adminPassword, hasher: hasher, now: Date())
        let clock = TestClock()
        let listeners = ListenerRegistry()
        let api = BrokerAPI(store: store,
                            configuration: BrokerAPIConfiguration(maxBodyBytes: maxBodyBytes, sessionLifetime: sessionLifetime,
                                                                  passwordHasher: hasher, version: "test", dataPath: folder.url.path,
                                                                  heartbeatInterval: max(1, offlineAfter / 3), offlineAfter: offlineAfter,
                                                                  gatewayCallTimeout: 3, proxyHeaderTimeout: proxyHeaderTimeout),
                            listeners: listeners, clock: { clock.now })
        var logger = Logger(label: "broker-test")
        logger.logLevel = .warning
        let app = api.application(address: .hostname("127.0.0.1", port: 0), logger: logger)
        let services = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let server = Task { try await services.run() }
        do {
            try await waitUntilAsync("the test broker listening") { !listeners.all.isEmpty }
        } catch {
            server.cancel()
            throw error
        }
        let port = Int(listeners.all[0].split(separator: ":").last!)!
        return TestBroker(folder: folder, databasePath: path, store: store, clock: clock, client: HTTPClient(port: port),
                          api: api, services: services, server: server)
    }

    /// Shuts the server down gracefully (as SIGTERM would) and removes the folder.
    func stop() async {
        await services.triggerGracefulShutdown()
        _ = try? await server.value
        folder.remove()
    }

    /// Logs in and returns the sid.
    func login(_ login: String = "admin", _ password: String = TestBroker.adminPassword) async throws -> String {
        let reply = try await client.json("POST", "/v1/session/login", ["user_login": login, "password": password])
        guard reply.status == 200, let sid = reply.object["sid"] as? String else {
            throw HTTPClient.Failure(description: "login as \(login) failed: \(reply)")
        }
        return sid
    }

    /// Every row of every table, read through a separate connection: equal
    /// snapshots before and after a call mean the call changed nothing.
    func snapshot() throws -> String {
        var configuration = Configuration()
        configuration.readonly = true
        let queue = try DatabaseQueue(path: databasePath, configuration: configuration)
        defer { try? queue.close() }
        return try queue.read { db in
            var text = ""
            let tables = try String.fetchAll(db, sql: "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            for table in tables {
                text += "# \(table)\n"
                let columns = try Row.fetchAll(db, sql: "PRAGMA table_info(\(table))").count
                let order = (1...columns).map(String.init).joined(separator: ", ")
                for row in try Row.fetchAll(db, sql: "SELECT * FROM \(table) ORDER BY \(order)") {
                    text += "\(row)\n"
                }
            }
            return text
        }
    }
}
