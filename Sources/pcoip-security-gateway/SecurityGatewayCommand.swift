import ArgumentParser
import FoundationEssentials
import Logging
import Relay
import SecurityGateway
import ServiceLifecycle
import ServiceSupport
import SessionGrants
import SystemLayer
import UnixSignals

let securityGatewayVersion = ProductVersion.line

@main
struct SecurityGatewayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pcoip-security-gateway",
        abstract: "The PCoIP Security Gateway: admits PCoIP sessions a Connection Manager signed, without terminating TLS.",
        discussion: """
        TCP on ListenAddress (4172): the gateway reads the client's TLS
        ClientHello (at most ClientHelloMaxBytes, within ClientHelloTimeout),
        takes its SNI, finds the prepared grant for it (and for the client's
        address where two grants share an SNI), checks MaxConnections, connects
        to the grant's agent, replays the bytes it read and then relays. No
        grant, a bad ClientHello or the limit reached: the client is closed at
        once and the refusal counted by reason.

        UDP on the same port: while a client has a live TCP session, its
        datagrams go to that session's agent (same port number) from
        AgentSourcePort (55000); with EnableCollaboration a second session to
        the same agent gets a port from CollaborationSourcePorts. Datagrams
        from anyone else are dropped and counted.

        The control endpoint (ControlListen, HTTP):
          POST /v1/sessions {"grant": "<JWT>"}  prepare (201; 200 when already prepared;
                                                400 malformed; 401 forged, expired, not yet
                                                valid, another group, none/HMAC; 409 replayed)
          DELETE /v1/sessions/{session id}      revoke its prepared grants
          GET /health                           200 {"code":200,"status":"success"} or 500 with "reason"
          GET /v1/status                        counters: sessions, refusals by reason, bytes
        Grants are verified with the certificate JwtVerifyingCert names, for the
        audience GatewayGroup. Prepared grants persist in --data-dir and are
        restored (verified again, expired ones dropped) at start.

        --check --config FILE checks the file, JwtVerifyingCert and, when set,
        ControlTLSCert/ControlTLSKey (as serve will) and exits 0, or 1 naming
        the file, line and key (or the certificate's problem).

        grant --jwt-signing-key KEY --audience GROUP --agent HOST:PORT --sni NAME
        signs grants as a Connection Manager would and prints them, one JWT per
        line (see grant --help).

        Signals while serving: SIGTERM or SIGINT stop the control endpoint and
        close every session.
        """,
        version: securityGatewayVersion,
        subcommands: [Serve.self, Grant.self, CheckControlTLS.self]
    )

    @Flag(name: .long, help: "Check --config (and the certificates it names), print a summary and exit: 0 when valid, 1 otherwise.")
    var check = false

    @Option(name: .long, help: "The SecurityGateway.conf to use (serve) or to check (--check).")
    var config: String?

    func run() async throws {
        guard check else {
            throw ValidationError("give a subcommand (serve, grant) or --check --config FILE; see --help")
        }
        guard let config else { throw ValidationError("--check needs --config FILE") }
        let (loaded, verifier) = try await Loader.load(config)
        print("config \(config): valid")
        print("listen \(loaded.listen) (tcp+udp), control \(loaded.controlListen)")
        print("gateway group \(loaded.gatewayGroup), grants verified with \(verifier.algorithm.rawValue) from \(loaded.jwtVerifyingCertificate)")
        print("MaxConnections \(loaded.maxConnections), AgentSourcePort \(loaded.agentSourcePort), collaboration \(loaded.enableCollaboration ? "on (\(loaded.collaborationSourcePorts.lowerBound)-\(loaded.collaborationSourcePorts.upperBound))" : "off")")
        // The control endpoint's pair, when the config names one: checked as serve will (a made pair is serve's, in --data-dir).
        if loaded.controlPlainHTTP {
            print("control endpoint: plain HTTP (ControlPlainHTTP = true)")
        } else if loaded.controlTLSCertificate.isEmpty {
            print("control endpoint: TLS with a self-signed pair serve makes in --data-dir")
        } else {
            switch await controlTLS(loaded, folder: "", names: [], check: .inProcess) {
            case .success(let pair): print("control endpoint: TLS with \(pair.source) (\(pair.fingerprint))")
            case .failure(let problem): throw Failure("\(config): \(problem)")
            }
        }
    }
}

/// The control endpoint's TLS pair as the config names it (or the one made
/// in `folder`), loaded on a dedicated thread: files, and maybe a child.
func controlTLS(_ loaded: SecurityGatewayConfig, folder: String, names: [String],
                check: ServerTLS.PairCheck) async -> Result<ServerTLS, ServerTLS.Problem> {
    await BlockingExecutor.shared.run {
        Result { () throws(ServerTLS.Problem) in
            try ServerTLS.load(certificate: loaded.controlTLSCertificate.isEmpty ? nil : loaded.controlTLSCertificate,
                               key: loaded.controlTLSKey.isEmpty ? nil : loaded.controlTLSKey,
                               folder: folder, names: names, fields: ("ControlTLSCert", "ControlTLSKey"), check: check)
        }
    }
}

/// Not for operators: `serve` runs this as a child to make and check the
/// control endpoint's certificate and key with OpenSSL, so that OpenSSL's
/// decoders and key generation never run in the serving process (see
/// `ServerTLS.PairCheck`). Prints one JSON answer.
struct CheckControlTLS: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-control-tls",
        abstract: "Make and check the control endpoint's TLS pair (run by serve).",
        shouldDisplay: false)

    @Argument(help: "The request (JSON), as serve writes it.")
    var request: String

    func run() async {
        // Files and key generation: on a dedicated thread, as everywhere.
        let request = request
        print(await BlockingExecutor.shared.run { ServerTLS.answer(request: request) })
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the Security Gateway in the foreground.",
        usage: "pcoip-security-gateway serve --config <SecurityGateway.conf> --data-dir <dir> [--log-level <level>] [--pid-file <file>]",
        discussion: """
            --config FILE (the SecurityGateway.conf, required) may come before or after `serve`.
            SIGHUP re-reads the config without dropping a session (ListenAddress, ControlListen and
            AgentSourcePort need a restart); SIGTERM stops.
            """)

    @ParentCommand var parent: SecurityGatewayCommand

    @Option(name: .long, help: "Where prepared grants persist (created if missing, mode 0700).")
    var dataDir: String

    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical (default: the config's LogLevel, else info).")
    var logLevel: String?

    @Option(name: .long, help: "Write the process id here while serving (for pcoip-cmsg-setup configure and uninstall).")
    var pidFile: String?

    func run() async throws {
        if let logLevel, Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError("--log-level: \"\(logLevel)\" is not one of trace, debug, info, notice, warning, error, critical")
        }
        guard let config = parent.config else { throw ValidationError("serve needs --config FILE") }
        ServiceLogHandler.bootstrap(level: .info)
        ServiceMetrics.shared.bootstrap()
        var logger = Logger(label: "pcoip-security-gateway")
        logger.logLevel = .info
        // Start-up reads files, restores the grant journal and waits for the
        // relay loops: on threads made for blocking work, not Swift's
        // cooperative ones (the control endpoint below runs there).
        let dataDir = self.dataDir
        let (startLogger, levelFlag) = (logger, logLevel)
        let (loaded, gateway, leveled) = try await withTaskExecutorPreference(BlockingExecutor.shared) {
            () async throws -> (SecurityGatewayConfig, SecurityGateway, Logger) in
            let (loaded, verifier) = try await Loader.load(config)
            // --log-level, else the config's LogLevel, for everything from
            // here on: the gateway keeps this logger (a copy; setting the
            // level on another copy later would not reach it), and the
            // command goes on with it too.
            var startLogger = startLogger
            if let level = (levelFlag ?? loaded.logLevel).flatMap({ Logger.Level(rawValue: $0) }) { startLogger.logLevel = level }
            do {
                try FileManager.default.createDirectory(atPath: dataDir, withIntermediateDirectories: true,
                                                        attributes: [.posixPermissions: 0o700])
            } catch {
                throw Failure("--data-dir: cannot create \(dataDir): \(error)")
            }
            let grants = PreparedGrants(path: dataDir + "/prepared-grants.json")
            let restored = await grants.restore(verifier: verifier)
            startLogger.info("prepared grants restored from \(dataDir): \(restored.kept) kept, \(restored.dropped) dropped (expired or no longer verifying)")
            let gateway: SecurityGateway
            do throws(Errno) {
                gateway = try SecurityGateway(config: loaded, verifier: verifier, grants: grants, logger: startLogger)
            } catch {
                throw Failure("cannot start the relay loops: \(error)")
            }
            do throws(RuleError) {
                try gateway.start()
            } catch {
                gateway.shutdown()
                throw Failure("\(config): ListenAddress: \(error)")
            }
            return (loaded, gateway, startLogger)
        }
        logger = leveled
        let listen = loaded.controlListen
        let log = logger
        ServiceMetrics.shared.addCollector { text in gateway.writeMetrics(into: &text) }
        let link = ServiceManagerLink(loops: gateway.engine.loopProbes,
                                      logger: logger,
                                      status: { "\(gateway.sessions.active) session(s), \(gateway.grants.count) prepared grant(s)" })
        // TLS unless ControlPlainHTTP = true (issue 14); making a certificate writes files: not on the pool.
        let tls: ServerTLS?
        if loaded.controlPlainHTTP {
            tls = nil
            logger.warning("control endpoint on \(listen) speaks plain HTTP (ControlPlainHTTP = true): grants cross the network in clear")
        } else {
            let names = ServerTLS.names(listening: listen)
            // Made and checked by a child (OpenSSL stays out of this process's memory, issue 15).
            switch await controlTLS(loaded, folder: dataDir, names: names,
                                    check: .child(executable: "/proc/self/exe", arguments: ["check-control-tls"])) {
            case .success(let pair):
                tls = pair
                logger.info("control endpoint TLS with \(pair.source)")
            case .failure(let problem):
                await BlockingExecutor.shared.run { gateway.shutdown() }
                throw Failure("\(config): \(problem)")
            }
        }
        let app = try SecurityGatewayControl.application(
            gateway: gateway, host: "\(listen.ip)", port: Int(listen.port), logger: logger, tls: tls?.configuration,
            onServerRunning: { address in
                log.notice("control endpoint on \(address)")
                // The data listeners opened in start(); the grants are restored: ready.
                link.ready()
            })
        let pidFile = self.pidFile
        if let pidFile {
            try await BlockingExecutor.shared.run { () throws in
                do throws(Errno) { try StateFile.writeAtomically(pidFile, Array("\(SystemInfo.processID)\n".utf8), mode: 0o644) } catch {
                    throw Failure("--pid-file \(pidFile): \(error)")
                }
            }
        }
        let group = ServiceGroup(configuration: .init(services: [app, Reloader(gateway: gateway, path: config, logger: logger, link: link), link],
                                                      gracefulShutdownSignals: [.sigterm], cancellationSignals: [.sigint],
                                                      logger: logger))
        defer { link.finish() }
        do {
            // The control endpoint handles requests on threads of its own;
            // the reloader's start-up work blocks: on the blocking pool.
            try await withTaskExecutorPreference(BlockingExecutor.shared) { try await group.run() }
        } catch {
            await BlockingExecutor.shared.run {
                gateway.shutdown()
                if let pidFile { StateFile.remove(pidFile) }
            }
            throw Failure("ControlListen: cannot serve on \(listen): \(error)")
        }
        let active = await BlockingExecutor.shared.run { () -> Int in
            let active = gateway.status().activeSessions
            gateway.shutdown()
            if let pidFile { StateFile.remove(pidFile) }
            return active
        }
        logger.notice("stopped: \(active) session(s) closed")
    }
}

/// Re-reads the config on SIGHUP; a bad file is logged and changes nothing.
struct Reloader: Service {
    let gateway: SecurityGateway
    let path: String
    let logger: Logger
    let link: ServiceManagerLink

    func run() async throws {
        for await _ in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            link.reloading()
            defer { link.reloaded() }
            do {
                let (config, verifier) = try await withTaskExecutorPreference(BlockingExecutor.shared) { try await Loader.load(path) }
                let gateway = self.gateway
                try await BlockingExecutor.shared.run { () throws in
                    do throws(RuleError) { try gateway.reload(config: config, verifier: verifier) } catch {
                        throw Failure("\(error)")
                    }
                }
            } catch {
                logger.error("config not reloaded (the running one stays): \(error)")
            }
        }
    }
}

/// A failure the user sees on standard error, with exit code 1.
struct Failure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

enum Loader {
    /// Reads the config and its verifying certificate.
    /// - Throws: `Failure` naming the file and line, or the certificate and its problem.
    static func load(_ path: String) async throws -> (SecurityGatewayConfig, GrantVerifier) {
        let config: SecurityGatewayConfig
        do throws(SecurityGatewayConfigError) {
            config = try SecurityGatewayConfig.load(path: path)
        } catch {
            throw Failure(error.description)
        }
        var certificatePath = config.jwtVerifyingCertificate
        if !certificatePath.hasPrefix("/") {
            certificatePath = URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent(certificatePath).path
        }
        guard let pem = try? String(contentsOfFile: certificatePath, encoding: .utf8) else {
            throw Failure("\(path): JwtVerifyingCert: cannot read \(certificatePath)")
        }
        do throws(GrantError) {
            return (config, try await GrantVerifier.load(certificatePEM: pem, audience: config.gatewayGroup))
        } catch {
            throw Failure("\(path): JwtVerifyingCert \(certificatePath): \(error)")
        }
    }
}
