import ArgumentParser
import BrokerAPI
import BrokerCore
import BrokerPostgres
import Foundation
import Hummingbird
import Logging
import ServiceSupport
import SystemLayer
import CertificateFiles
import ControlProtocol
import NIOSSL

/// The broker's version, printed by `--version`, `--info` and `system/health`.
let brokerVersion = BuildInfo.version

@main
struct BrokerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "leostream-broker",
        abstract: "The broker core: gateways, gateway clusters, desktops, users and sessions behind a Leostream-compatible REST API.",
        discussion: """
        Without a subcommand (or with `serve`) the broker runs in the foreground:
        it opens (or creates) the SQLite database, applies pending schema
        migrations, creates the first admin when the database has no users, and
        serves the REST API under /v1 and /rest/v1 on --listen.

        The first admin (login from --admin-login, default "admin") gets the
        password read from --admin-password-file (first line) or from the
        LEOSTREAM_BROKER_ADMIN_PASSWORD environment variable. It is used only
        while the database has no users, and never printed or logged.

        --info prints the version, the database (path, size, schema version),
        the listener, the registered gateways and their state, CPUs, memory,
        load and free disk space, without changing anything. A gateway counts
        as online when its last heartbeat is within --offline-after.

        Gateways: an admin enrolls a gateway with
        POST /v1/gateways/{id}/enrollment (its control key is shown once);
        the gateway then registers and sends heartbeats, signed with that key
        (docs/CONTROL-PROTOCOL.md). POST /v1/connect chooses a gateway for a
        desktop and pushes the port-forward rule to it.

        --health runs the same checks and exits 0 when all pass, 1 when one
        fails (database missing, unreadable or with an unknown schema; disk or
        memory nearly full; nothing accepting connections on --listen), saying
        what is wrong on standard error.

        A cluster of brokers: give each the same PostgreSQL database,
        --database postgres://USER@HOST[:PORT]/DATABASE[?sslmode=verify-full&sslrootcert=FILE],
        with the password in --database-password-file or the
        LEOSTREAM_BROKER_DATABASE_PASSWORD environment variable (never in the
        URL). `switch-database` copies an SQLite broker into such a database.

        Signals while serving: SIGTERM or SIGINT stop accepting connections,
        finish the requests in progress and exit 0.
        """,
        version: ProductVersion.line,
        subcommands: [Serve.self, SwitchDatabase.self]
    )

    @Flag(name: .long, help: "Print what an operator needs to know (version, database, listener, gateways, CPUs, memory, disk) and exit.")
    var info = false

    @Flag(name: .long, help: "Check the database, disk, memory and listener; exit 0 when healthy, 1 with the reasons otherwise.")
    var health = false

    @OptionGroup var options: BrokerOptions

    func validate() throws {
        if info && health { throw ValidationError("give --info or --health, not both") }
    }

    func run() async throws {
        if info || health {
            // A one-shot report reads files and probes the listener: its
            // blocking calls run on threads made for them.
            let options = self.options
            let healthy = await withTaskExecutorPreference(BlockingExecutor.shared) {
                if info { await Report.info(options); return true }
                return await Report.health(options)
            }
            if !healthy { throw ExitCode(1) }
        } else {
            try await Serve.serve(options)
        }
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the broker in the foreground (the default when no subcommand is given).")

    @OptionGroup var options: BrokerOptions

    func run() async throws {
        try await Self.serve(options)
    }

    static func serve(_ options: BrokerOptions) async throws {
        let level = Logger.Level(rawValue: options.logLevel) ?? .info
        ServiceLogHandler.bootstrap(level: level)
        ServiceMetrics.shared.bootstrap()
        var logger = Logger(label: "leostream-broker")
        logger.logLevel = level

        let listen = try options.listenAddress()
        let opened: OpenedStore
        do {
            opened = try await OpenedStore.open(options, logger: logger)
        } catch {
            printError("error: \(error)")
            throw ExitCode(1)
        }
        let store = opened.store
        let schema = try await store.schema()
        logger.info("database \(store.location): schema \(schema.version)")

        let hasher = PasswordHasher(cost: options.bcryptCost)
        do {
            let password = try options.adminPassword()
            switch try await AdminBootstrap.ensureAdmin(store: store, login: options.adminLogin, password: password,
                                                        hasher: hasher, now: Date()) {
            case .created(let id):
                logger.notice("created the first admin '\(options.adminLogin)' (user \(id))")
            case .usersExist:
                break
            }
        } catch {
            printError("error: \(error)")
            throw ExitCode(1)
        }

        let configuration = BrokerAPIConfiguration(maxBodyBytes: options.maxBodyBytes,
                                                   sessionLifetime: TimeInterval(options.sessionLifetime),
                                                   passwordHasher: hasher, version: brokerVersion,
                                                   dataPath: opened.dataPath,
                                                   heartbeatInterval: options.heartbeatInterval,
                                                   offlineAfter: options.offlineAfter,
                                                   ruleUnusedExpiry: options.ruleUnusedExpiry)
        let api = BrokerAPI(store: store, configuration: configuration)
        // Reading (or making and writing) the certificate blocks: not on Swift's cooperative threads.
        let made = try await BlockingExecutor.shared.run { Result { try options.tlsConfiguration() } }.get()
        let tls = made?.configuration
        let scheme = tls == nil ? "http" : "https"
        if let made {
            logger.notice("TLS with \(made.source), certificate \(made.fingerprint) (gateways pin it: leostream-gateway --broker https://...)")
        } else {
            logger.warning("the listener speaks plain HTTP (--plain-http): passwords, sessions and gateway messages cross the network in clear")
        }
        let startLogger = logger
        let link = ServiceManagerLink(logger: logger, status: { "serving the REST API on \(options.listen)" })
        let app = api.application(address: .hostname(listen.host, port: Int(listen.port)), logger: logger, tls: tls,
                                  services: [link]) { channel in
            if let local = channel.localAddress, let ip = local.ipAddress, let port = local.port {
                startLogger.notice("listening on \(ip.contains(":") ? "[\(ip)]" : ip):\(port) (\(scheme): REST API under /v1 and /rest/v1, PCoIP broker protocol at /pcoip-broker/xml, metrics at /metrics), pid \(SystemInfo.processID)")
                link.ready()
            }
        }
        defer { link.finish() }
        do {
            try await app.runService()
        } catch {
            await opened.close()
            printError("error: \(options.listen): \(error)")
            throw ExitCode(1)
        }
        await opened.close()
        logger.notice("stopped")
    }
}

/// Options shared by the root command and `serve`.
struct BrokerOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The address to serve the REST API on.", valueName: "HOST:PORT"))
    var listen = "127.0.0.1:8080"

    @Option(name: .long, help: ArgumentHelp("The folder for the broker's data.", valueName: "PATH"))
    var dataDir = "/var/lib/leostream-broker"

    @Option(name: .long, help: ArgumentHelp("The SQLite database file (default: DATA-DIR/broker.sqlite), or the PostgreSQL database a cluster of brokers shares: postgres://USER@HOST[:PORT]/DATABASE[?sslmode=disable|prefer|require|verify-full&sslrootcert=FILE&host=SOCKET-DIR].", valueName: "PATH|URL"))
    var database: String?

    @Option(name: .long, help: ArgumentHelp("The PostgreSQL password, on the first line of FILE (else LEOSTREAM_BROKER_DATABASE_PASSWORD; never in the URL).", valueName: "FILE"))
    var databasePasswordFile: String?

    @Option(name: .long, help: ArgumentHelp("PEM certificate for HTTPS on --listen (RSA of at least 2048 bits), with --tls-key.", valueName: "FILE"))
    var tlsCert: String?

    @Option(name: .long, help: ArgumentHelp("PEM private key of --tls-cert.", valueName: "FILE"))
    var tlsKey: String?

    @Option(name: .long, help: ArgumentHelp("A DNS name or address for the self-signed certificate made without --tls-cert (repeatable; the --listen address is always in it).", valueName: "NAME"))
    var tlsName: [String] = []

    @Flag(name: .long, help: "Serve plain HTTP instead of HTTPS (passwords, sessions and gateway messages in clear); the log says so at start.")
    var plainHttp = false

    @Option(name: .long, help: ArgumentHelp("The first admin's password, on the first line of FILE (used only while the database has no users).", valueName: "FILE"))
    var adminPasswordFile: String?

    @Option(name: .long, help: ArgumentHelp("The first admin's login.", valueName: "NAME"))
    var adminLogin = "admin"

    @Option(name: .long, help: ArgumentHelp("How long a session lasts after login.", valueName: "SECONDS"))
    var sessionLifetime = 8 * 3600

    @Option(name: .long, help: ArgumentHelp("Request bodies larger than this are refused with 413.", valueName: "BYTES"))
    var maxBodyBytes = 1 << 20

    @Option(name: .long, help: ArgumentHelp("bcrypt cost for new password hashes (4-31; each step doubles the time).", valueName: "N"))
    var bcryptCost: UInt8 = 12

    @Option(name: .long, help: ArgumentHelp("trace, debug, info, notice, warning, error or critical.", valueName: "LEVEL"))
    var logLevel = "info"

    @Option(name: .long, help: ArgumentHelp("Seconds between a gateway's heartbeats (told to gateways when they register).", valueName: "SECONDS"))
    var heartbeatInterval = 10

    @Option(name: .long, help: ArgumentHelp("A gateway without a heartbeat for this long is offline and no longer chosen.", valueName: "SECONDS"))
    var offlineAfter = 30

    @Option(name: .long, help: ArgumentHelp("A pushed rule nobody used for this long after its creation is removed by its gateway.", valueName: "SECONDS"))
    var ruleUnusedExpiry = 300

    var databasePath: String {
        database ?? URL(fileURLWithPath: dataDir).appendingPathComponent("broker.sqlite").path
    }

    /// The database --database names.
    enum DatabaseChoice {
        case sqlite(path: String)
        case postgres(PostgresSettings)
    }

    func databaseChoice() throws -> DatabaseChoice {
        guard let database, PostgresSettings.isURL(database) else { return .sqlite(path: databasePath) }
        do {
            return .postgres(try PostgresSettings.parse(database))
        } catch {
            throw ValidationError("--database \(error)")
        }
    }

    /// The PostgreSQL password from --database-password-file or the environment; nil when neither gives one.
    func databasePassword() throws -> String? {
        if let databasePasswordFile {
            do {
                return try AdminBootstrap.readPasswordFile(databasePasswordFile, what: "the database password file")
            } catch {
                throw ValidationError("--database-password-file: \(error)")
            }
        }
        if let value = ProcessInfo.processInfo.environment["LEOSTREAM_BROKER_DATABASE_PASSWORD"], !value.isEmpty {
            return value
        }
        return nil
    }

    func validate() throws {
        _ = try listenAddress()
        _ = try databaseChoice()
        try checkTLSFlags()
        if !(4...31).contains(bcryptCost) { throw ValidationError("--bcrypt-cost must be 4 to 31, got \(bcryptCost)") }
        if sessionLifetime < 60 { throw ValidationError("--session-lifetime must be at least 60 seconds, got \(sessionLifetime)") }
        if maxBodyBytes < 1024 { throw ValidationError("--max-body-bytes must be at least 1024, got \(maxBodyBytes)") }
        if !(1...3600).contains(heartbeatInterval) {
            throw ValidationError("--heartbeat-interval must be 1 to 3600 seconds, got \(heartbeatInterval)")
        }
        if offlineAfter <= heartbeatInterval || offlineAfter > 86400 {
            throw ValidationError("--offline-after must be more than --heartbeat-interval (\(heartbeatInterval)) and at most 86400 seconds, got \(offlineAfter)")
        }
        if !(10...86400).contains(ruleUnusedExpiry) {
            throw ValidationError("--rule-unused-expiry must be 10 to 86400 seconds, got \(ruleUnusedExpiry)")
        }
        if Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError("--log-level must be one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")), got '\(logLevel)'")
        }
    }

    /// How the TLS flags combine; checked in `validate()`, so a bad
    /// combination is refused before the database is opened (or found held
    /// by a running broker), and `tlsConfiguration()` may count on it.
    func checkTLSFlags() throws {
        if plainHttp && (tlsCert != nil || tlsKey != nil) { throw ValidationError("--plain-http and --tls-cert/--tls-key: give one") }
        switch (tlsCert, tlsKey) {
        case (_?, nil): throw ValidationError("--tls-cert needs --tls-key")
        case (nil, _?): throw ValidationError("--tls-key needs --tls-cert")
        default: break
        }
    }

    /// The listener's TLS: --tls-cert and --tls-key (after HP's checks on
    /// them), else a self-signed RSA 3072 pair made once in --data-dir
    /// (broker-tls.crt, broker-tls.key); nil only with --plain-http. The
    /// same loader as the control endpoints' (`ServerTLS`).
    func tlsConfiguration() throws -> BrokerTLS? {
        if plainHttp { return nil }
        var names = tlsName
        if tlsCert == nil {
            let (host, _) = try listenAddress()
            if host != "0.0.0.0" && host != "::" && !names.contains(host) { names.insert(host, at: 0) }
            if names.isEmpty { names = ["localhost"] }
            do {
                try FileManager.default.createDirectory(atPath: dataDir, withIntermediateDirectories: true)
            } catch {
                throw ValidationError("--data-dir: cannot create \(dataDir): \((error as NSError).localizedDescription)")
            }
        }
        do throws(ServerTLS.Problem) {
            let tls = try ServerTLS.load(certificate: tlsCert, key: tlsKey, folder: dataDir, names: names,
                                         fields: ("--tls-cert", "--tls-key"), stem: "broker-tls")
            return BrokerTLS(configuration: tls.configuration,
                             source: tlsCert == nil ? "the self-signed certificate \(tls.source)" : tls.source,
                             fingerprint: tls.fingerprint)
        } catch {
            throw ValidationError("\(error.field) \(error.message)")
        }
    }
}

/// The listener's certificate, key and what the log says of them.
struct BrokerTLS {
    let configuration: TLSConfiguration
    let source: String
    /// "SHA256:AB:CD:..." of the certificate (what a gateway pins).
    let fingerprint: String
}

extension BrokerOptions {
    func listenAddress() throws -> (host: String, port: UInt16) {
        guard let parts = SocketAddress.splitHostPort(listen) else {
            throw ValidationError("--listen must be HOST:PORT (IPv6 as [ADDRESS]:PORT), got '\(listen)'")
        }
        return parts
    }

    /// The first admin's password from the file or the environment; nil when neither gives one.
    func adminPassword() throws -> String? {
        if let adminPasswordFile {
            return try AdminBootstrap.readPasswordFile(adminPasswordFile)
        }
        if let value = ProcessInfo.processInfo.environment["LEOSTREAM_BROKER_ADMIN_PASSWORD"], !value.isEmpty {
            return value
        }
        return nil
    }
}

/// Writes a line to standard error.
func printError(_ message: String) {
    StandardStreams.writeError(message + "\n")
}
