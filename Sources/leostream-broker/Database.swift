import ArgumentParser
import BrokerCore
import BrokerPostgres
import Foundation
import Logging
import ServiceSupport
import SystemLayer

/// The store `--database` names, opened for serving, and how to close it.
struct OpenedStore {
    let store: any BrokerStore
    /// The folder whose filesystem `system/health` measures.
    let dataPath: String
    let close: @Sendable () async -> Void

    /// Opens (creating and migrating) the SQLite file or the PostgreSQL database.
    static func open(_ options: BrokerOptions, logger: Logger) async throws -> OpenedStore {
        switch try options.databaseChoice() {
        case .sqlite(let path):
            if options.databasePasswordFile != nil {
                throw ValidationError("--database-password-file is for a PostgreSQL --database (postgres://...); the SQLite file \(path) needs no password")
            }
            let folder = URL(fileURLWithPath: path).deletingLastPathComponent().path
            do {
                try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
            } catch {
                throw ValidationError("cannot create the folder of the database \(path): \((error as NSError).localizedDescription)")
            }
            let store = try SQLiteBrokerStore(path: path, mode: .readWrite)
            return OpenedStore(store: store, dataPath: folder, close: { store.close() })
        case .postgres(let settings):
            let store = try PostgresBrokerStore(settings: settings, password: try options.databasePassword(), logger: logger)
            do {
                try await store.open()
            } catch {
                await store.close()
                throw error
            }
            if settings.tlsMode != .verifyFull && settings.socketDirectory == nil && !Self.isLoopback(settings.host) {
                logger.warning("database \(settings.location): the server's certificate is not verified (give sslmode=verify-full and sslrootcert=FILE)")
            }
            return OpenedStore(store: store, dataPath: options.dataDir, close: { await store.close() })
        }
    }

    /// Opens the database for a report without changing it; nil when there is none yet (a new SQLite file).
    static func openForReport(_ options: BrokerOptions) async throws -> (any BrokerStore, close: @Sendable () async -> Void)? {
        switch try options.databaseChoice() {
        case .sqlite(let path):
            guard FileManager.default.fileExists(atPath: path) else { return nil }
            let store = try SQLiteBrokerStore(path: path, mode: .readOnly)
            return (store, { store.close() })
        case .postgres(let settings):
            var logger = Logger(label: "leostream-broker")
            logger.logLevel = .critical
            let store = try PostgresBrokerStore(settings: settings, password: try options.databasePassword(), logger: logger, maximumConnections: 2)
            do {
                try await store.open(migrate: false)
            } catch {
                await store.close()
                throw error
            }
            return (store, { await store.close() })
        }
    }

    static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host.hasPrefix("127.")
    }
}

/// `leostream-broker switch-database`: copy an SQLite broker into PostgreSQL.
struct SwitchDatabase: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "switch-database",
        abstract: "Copy an SQLite broker's data into an empty PostgreSQL database, for a cluster of brokers.",
        discussion: """
        Stop the broker that serves the SQLite file first: the copy is a
        snapshot, and changes made after it stay behind. The PostgreSQL
        database gets the schema, then every row with its id (gateways with
        their control keys, users with their password hashes, sessions,
        pushed rules) in one transaction: a copy that fails leaves it as it
        was. The SQLite file is only read. Then start every broker with
        --database URL (and the password as for serving).
        """)

    @Option(name: .long, help: ArgumentHelp("The SQLite file to copy (default: DATA-DIR/broker.sqlite).", valueName: "PATH"))
    var from: String?

    @Option(name: .long, help: ArgumentHelp("The PostgreSQL database: postgres://USER@HOST[:PORT]/DATABASE[?sslmode=...].", valueName: "URL"))
    var to: String

    /// --data-dir and --database-password-file, as for serving.
    @OptionGroup var options: BrokerOptions

    func validate() throws {
        guard PostgresSettings.isURL(to) else {
            throw ValidationError("--to must be a PostgreSQL URL postgres://USER@HOST[:PORT]/DATABASE, got '\(to)'")
        }
        do { _ = try PostgresSettings.parse(to) } catch { throw ValidationError("--to \(error)") }
    }

    func run() async throws {
        ServiceLogHandler.bootstrap(level: .warning)
        var logger = Logger(label: "leostream-broker")
        logger.logLevel = .warning
        let source = from ?? URL(fileURLWithPath: options.dataDir).appendingPathComponent("broker.sqlite").path
        let settings = try PostgresSettings.parse(to)
        let target = try PostgresBrokerStore(settings: settings, password: try options.databasePassword(), logger: logger)
        do {
            try await target.open()
            let report = try await DatabaseSwitch.copy(from: source, to: target)
            await target.close()
            let tables = report.rows.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            StandardStreams.writeOutput("""
                copied \(report.total) row(s) from \(source) into \(settings.location): \(tables)
                start every broker with --database \(settings.location) (password as for this command)

                """)
        } catch {
            await target.close()
            printError("error: \(error)")
            throw ExitCode(1)
        }
    }
}
