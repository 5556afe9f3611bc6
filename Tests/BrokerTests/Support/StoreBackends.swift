import BrokerCore
import BrokerPostgres
import Foundation
import Logging
import PostgresNIO
import Testing

/// The two stores the store suite runs on.
enum StoreBackend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite
    case postgres

    var testDescription: String { rawValue }

    /// Runs `body` with a fresh, empty, migrated store; removes it after.
    func with<T>(_ body: (any BrokerStore) async throws -> T) async throws -> T {
        switch self {
        case .sqlite:
            let folder = try TemporaryFolder()
            defer { folder.remove() }
            let store = try SQLiteBrokerStore(path: folder.path("broker.sqlite"))
            defer { store.close() }
            return try await body(store)
        case .postgres:
            return try await TestPostgres.withDatabase { settings in
                let store = try await TestPostgres.open(settings)
                do {
                    let result = try await body(store)
                    await store.close()
                    return result
                } catch {
                    await store.close()
                    throw error
                }
            }
        }
    }
}

/// The PostgreSQL server `scripts/test` starts (scripts/postgres-test-server):
/// each test gets a database of its own, dropped after.
enum TestPostgres {
    struct Missing: Error, CustomStringConvertible {
        var description: String {
            "RDG_TEST_POSTGRES_URL and RDG_TEST_POSTGRES_PASSWORD are not set: run the tests through scripts/test, which starts a PostgreSQL server (or eval \"$(scripts/postgres-test-server start)\" first)"
        }
    }

    static var environment: (settings: PostgresSettings, password: String, ca: String?) {
        get throws {
            let env = ProcessInfo.processInfo.environment
            guard let url = env["RDG_TEST_POSTGRES_URL"], let password = env["RDG_TEST_POSTGRES_PASSWORD"] else { throw Missing() }
            return (try PostgresSettings.parse(url), password, env["RDG_TEST_POSTGRES_CA"])
        }
    }

    static var password: String { get throws { try environment.password } }

    static let logger: Logger = {
        var logger = Logger(label: "postgres-test")
        logger.logLevel = .critical
        return logger
    }()

    /// Creates a database, runs `body` with its settings, drops it.
    static func withDatabase<T>(_ body: (PostgresSettings) async throws -> T) async throws -> T {
        let (server, password, _) = try environment
        let name = "broker_test_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "")
        try await administer(server, password: password, "CREATE DATABASE \(name)")
        var settings = server
        settings.database = name
        do {
            let result = try await body(settings)
            try? await administer(server, password: password, "DROP DATABASE \(name) WITH (FORCE)")
            return result
        } catch {
            try? await administer(server, password: password, "DROP DATABASE \(name) WITH (FORCE)")
            throw error
        }
    }

    /// A store on `settings`, opened and migrated.
    static func open(_ settings: PostgresSettings, migrate: Bool = true) async throws -> PostgresBrokerStore {
        let store = try PostgresBrokerStore(settings: settings, password: try password, logger: logger)
        do {
            try await store.open(migrate: migrate)
        } catch {
            await store.close()
            throw error
        }
        return store
    }

    /// Runs one statement as the server's superuser on its `postgres` database.
    static func administer(_ server: PostgresSettings, password: String, _ sql: String, database: String? = nil) async throws {
        let configuration = PostgresConnection.Configuration(host: server.host, port: server.port, username: server.user,
                                                             password: password, database: database ?? server.database, tls: .disable)
        let connection = try await PostgresConnection.connect(configuration: configuration, id: 1, logger: logger)
        do {
            try await connection.query(PostgresQuery(unsafeSQL: sql), logger: logger)
            try await connection.close()
        } catch {
            try? await connection.close()
            throw error
        }
    }
}
