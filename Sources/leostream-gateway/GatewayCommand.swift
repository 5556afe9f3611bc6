import ArgumentParser
import ControlProtocol
import GatewayConfig
import GatewayControl
import Logging
import Relay
import ServiceSupport
import Synchronization
import SystemLayer

@main
struct GatewayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "leostream-gateway",
        abstract: "Remote-desktop access gateway: relays display-protocol traffic from public ports to desktops on private networks.",
        discussion: """
        Run the relay with `leostream-gateway serve --config FILE`. Validate a
        config without starting anything with `leostream-gateway --check --config FILE`:
        it prints the file, line and reason of the first error and exits 2.

        Signals while serving: SIGTERM stops accepting and lets sessions finish
        for drain_timeout; SIGHUP re-reads the config and the state directory
        without dropping a session (a bad config is reported and the old one
        kept); SIGINT stops at once; SIGUSR1 logs the counters; SIGUSR2 upgrades
        without dropping a session: the binary now at the path this one was
        started from takes over every listening socket and live connection.

        Control plane (when the config sets control_listen): set the broker with
        `leostream-gateway --broker ADDRESS --gateway-id N --control-key-file FILE`
        (the key comes from the broker's enrollment call; it is copied into the
        state directory with mode 0600 and never printed). A running gateway
        picks the change up at once (SIGHUP). `--port-range FIRST-LAST` sets the
        range random rule ports come from; `--status` shows the broker,
        registration, rules, sessions and ports in use. Bad values exit 2.
        """,
        version: ProductVersion.line,
        subcommands: [Serve.self, Uninstall.self]
    )

    @Flag(name: .long, help: "Validate the config file and exit (0: valid; 2: invalid, with file:line and reason).")
    var check = false

    @OptionGroup var global: GlobalOptions

    @Option(name: .long, help: ArgumentHelp("The broker to register with and take rules from: https://HOST[:PORT][/PATH] (its certificate is pinned now), or http://HOST[:PORT] / HOST:PORT for plain HTTP.", valueName: "address"))
    var broker: String?

    @Option(name: .long, help: ArgumentHelp("With an https --broker: trust this CA (PEM) for the broker's certificate, which must name its host, instead of pinning the certificate.", valueName: "file"))
    var brokerCa: String?

    @Option(name: .long, help: ArgumentHelp("With an https --broker: pin this certificate hash (SHA256:AB:CD:... as `openssl x509 -noout -fingerprint -sha256` prints it) instead of the one the broker presents now.", valueName: "hash"))
    var brokerFingerprint: String?

    @Option(name: .long, parsing: .unconditional, help: ArgumentHelp("This gateway's id on the broker (from its enrollment call).", valueName: "n"))
    var gatewayId: String?

    @Option(name: .long, help: ArgumentHelp("A file holding the control key the broker's enrollment call returned; copied into the state directory (mode 0600).", valueName: "file"))
    var controlKeyFile: String?

    @Option(name: .long, parsing: .unconditional, help: ArgumentHelp("The range random rule ports come from (default 20001-22000).", valueName: "first-last"))
    var portRange: String?

    @Flag(name: .long, help: "Print the broker, gateway id, registration state, rules, sessions and ports in use (never the key).")
    var status = false

    func run() throws {
        let configuring = broker != nil || gatewayId != nil || controlKeyFile != nil || portRange != nil
            || brokerCa != nil || brokerFingerprint != nil
        if configuring {
            try configure()
        }
        if status {
            try printStatus()
        }
        if configuring || status { return }
        guard check else {
            throw CleanExit.helpRequest(self)
        }
        guard let config = global.config else {
            throw ValidationError("--check needs --config FILE")
        }
        do {
            let parsed = try ConfigParser.load(path: config)
            print("\(config): OK: \(parsed.rules.count) forward(s) on \(Set(parsed.rules.map(\.listen)).count) listener(s)")
            for rule in parsed.rules { print("  \(rule)") }
            if let listen = parsed.controlListen {
                let networks = parsed.desktopNetworks.isEmpty ? "none (no pushed rule accepted)" : parsed.desktopNetworks.map(\.description).joined(separator: ", ")
                print("  control plane: control_listen \(listen), public_address \(parsed.publicAddress), desktop_networks \(networks)")
            }
            if parsed.kernelPath {
                print("  kernel path: table inet \(parsed.kernelTable); pushed rules take \(parsed.forwarding.rawValue) unless the broker says otherwise (needs CAP_NET_ADMIN and net.ipv4.ip_forward = 1, checked at start)")
            }
            if let metrics = parsed.metricsListen {
                print("  metrics: GET /metrics and GET /health on \(metrics)")
            }
            if let forward = parsed.brokerForwardListen {
                print("  broker forwarding: \(forward) -> the --broker address, with a PROXY v2 header")
            }
        } catch {
            printError("error: \(error)")
            throw ExitCode(2)
        }
    }
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the gateway's relay with the forwards in a config file.")

    @OptionGroup var global: GlobalOptions

    func run() throws {
        guard let config = global.config else {
            throw ValidationError("serve needs --config FILE")
        }
        // Before any thread starts, so that every thread inherits the mask and
        // signals are taken only by the wait below.
        ProcessSignal.blockAll()
        // The file SIGUSR2 will start: its path now, before anyone replaces it.
        _ = Upgrade.executablePath
        // Started by a running gateway for a hot upgrade (SIGUSR2)?
        let takeover = Upgrade.successorChannel()
        let parsed: GatewayConfiguration
        do {
            parsed = try ConfigParser.load(path: config)
        } catch {
            takeover?.channel.abort("\(error)")
            printError("error: \(error)")
            throw ExitCode(2)
        }
        let level = Logger.Level(rawValue: parsed.logLevel) ?? .info
        ServiceLogHandler.bootstrap(level: level)
        var logger = Logger(label: "leostream-gateway")
        logger.logLevel = level

        var settings = parsed.settings
        var predecessor: Int32?
        if let takeover {
            do throws(UpgradeFailure) {
                let manifest = try takeover.hello(pid: SystemInfo.processID, version: gatewayVersion)
                predecessor = manifest.pid
                if manifest.loops != settings.loops {
                    logger.warning("upgrade: loops = \(settings.loops) in \(config) takes effect at the next restart; the \(manifest.loops) running loop(s) are kept (each UDP flow stays with its socket)")
                    settings.loops = manifest.loops
                }
                logger.notice("upgrade: taking over from pid \(manifest.pid) (\(manifest.version))")
            } catch {
                printError("error: upgrade: \(error)")
                throw ExitCode(1)
            }
        }
        let engine: RelayEngine
        do {
            engine = try RelayEngine(settings: settings, logger: logger)
        } catch {
            takeover?.channel.abort("cannot start the event loops: \(error)")
            printError("error: cannot start the event loops: \(error)")
            throw ExitCode(1)
        }
        var handed: [HandedSocket] = []
        var suspendedAt: UInt64 = 0
        var receivedAt: UInt64 = 0
        var restoredAt: UInt64 = 0
        if let takeover {
            do throws(UpgradeFailure) {
                (handed, suspendedAt) = try takeover.receiveSockets()
                receivedAt = MonotonicClock.nowNanoseconds
            } catch {
                printError("error: upgrade: \(error)")
                engine.shutdown()
                throw ExitCode(1)
            }
            for problem in engine.inheritHandedListeners(handed) { logger.warning("upgrade: \(problem)") }
        } else {
            Self.adoptActivatedSockets(engine: engine, logger: logger)
        }
        let planeBox = Mutex<ControlPlane?>(nil)
        GatewayOperations.registerMetrics(engine: engine, plane: { planeBox.withLock { $0 } })
        let metricsBox = Mutex<ServerTask?>(nil)
        var plane: ControlPlane?
        do {
            if parsed.controlListen != nil {
                plane = try ControlPlane(engine: engine, config: parsed, directory: StateDirectory(global.stateDir), logger: logger)
                planeBox.withLock { $0 = plane }
            } else {
                try engine.apply(parsed.rules)
            }
            if let takeover, let predecessor {
                // Rules are served on the handed listeners; now the commit.
                do throws(UpgradeFailure) {
                    restoredAt = MonotonicClock.nowNanoseconds
                    try takeover.confirm(count: handed.count)
                } catch {
                    throw UpgradeFailure("pid \(predecessor) keeps serving: \(error)")
                }
                takeover.channel.socket.close()
                let releasedAt = MonotonicClock.nowNanoseconds
                let report = engine.adopt(handed)
                for problem in report.refused { logger.warning("upgrade: not taken: \(problem)") }
                for address in engine.discardUnclaimedHandedListeners() {
                    logger.warning("upgrade: listener \(address) closed: no rule of this config uses it")
                }
                let now = MonotonicClock.nowNanoseconds
                func ms(_ from: UInt64, _ to: UInt64) -> Double { Double((to &- from) / 1000) / 1000 }
                let paused = "\(ms(suspendedAt, now)) ms (sockets received \(ms(suspendedAt, receivedAt)) ms after the suspension, rules restored in \(ms(receivedAt, restoredAt)) ms, the release came \(ms(restoredAt, releasedAt)) ms later, sessions adopted in \(ms(releasedAt, now)) ms)"
                logger.notice("upgrade: took over \(report.connections) connection(s) and \(report.flows) UDP flow(s) from pid \(predecessor); the relay was paused \(paused)\(report.refused.isEmpty ? "" : "; \(report.refused.count) not taken")")
            }
            try plane?.start()
            try Self.startMetrics(parsed, into: metricsBox, logger: logger)
        } catch {
            takeover?.channel.abort("\(error)")
            printError("error: \(config): \(error)")
            plane?.stop()
            engine.shutdown()
            throw ExitCode(1)
        }
        logger.info("ready: \(parsed.rules.count) forward(s), \(settings.loops) loop(s), max_connections=\(settings.maxConnections), pid=\(ProcessInfoLite.pid)")
        for rule in parsed.rules { logger.info("forward \(rule)", metadata: ["rule": "\(rule.id)", "target": "\(rule.target)"]) }
        if let predecessor, !Upgrade.waitForExit(of: predecessor, seconds: 10) {
            logger.warning("upgrade: pid \(predecessor) has not exited 10 s after the handover")
        }
        // Listeners are open and state restored: only now READY=1.
        let link = ServiceManagerLink(loops: engine.loopProbes, logger: logger,
                                      status: { GatewayOperations.status(engine: engine, plane: planeBox.withLock { $0 }) })
        link.ready()
        defer {
            link.finish()
            metricsBox.withLock { $0 }?.stop()
        }

        var current = parsed
        while true {
            let plane = planeBox.withLock { $0 }
            switch ProcessSignal.wait() {
            case .hangUp?:
                link.reloading()
                current = reload(engine: engine, plane: plane, current: current, logger: logger)
                plane?.reloadState()
                link.reloaded()
            case .user1?:
                logger.notice("stats: \(engine.stats())")
                if let kernel = plane?.control.kernelSummary() {
                    logger.notice("kernel path: \(kernel.forwards) forward(s), \(kernel.traffic.flows) flow(s), \(kernel.traffic.packets) packet(s), \(kernel.traffic.bytes) byte(s), \(kernel.traffic.offloadedClients) offloaded client(s)\(kernel.problem.map { "; problem: \($0)" } ?? "")")
                }
            case .user2?:
                if upgrade(engine: engine, config: current, planeBox: planeBox, metricsBox: metricsBox, link: link, logger: logger) {
                    return
                }
            case .terminate?:
                let seconds = Double(current.drainTimeoutNanoseconds) / 1e9
                // Listeners close first, so that once this line is logged a
                // new client is refused.
                engine.stopAccepting()
                link.stopping(status: "draining \(engine.stats().active) session(s) for up to \(seconds)s")
                logger.notice("SIGTERM: draining \(engine.stats().active) session(s) for up to \(seconds)s")
                plane?.stop()
                let forced = engine.drain(timeoutNanoseconds: current.drainTimeoutNanoseconds)
                logger.notice("drained; \(forced) session(s) closed at the deadline; stats: \(engine.stats())")
                engine.shutdown()
                return
            case .interrupt?:
                link.stopping(status: "stopping now (SIGINT)")
                logger.notice("SIGINT: stopping now; stats: \(engine.stats())")
                plane?.stop()
                engine.shutdown()
                return
            case nil:
                continue
            }
        }
    }

    /// `metrics_listen`, when the config sets it.
    private static func startMetrics(_ config: GatewayConfiguration, into box: borrowing Mutex<ServerTask?>, logger: Logger) throws {
        guard let listen = config.metricsListen else { return }
        let listener = try MetricsListener.start(listen: listen, logger: logger)
        box.withLock { $0 = listener }
        logger.info("metrics on http://\(listener.address)/metrics")
    }

    /// Socket activation: listening sockets systemd passed (a .socket
    /// unit) serve the forwards on their addresses.
    private static func adoptActivatedSockets(engine: RelayEngine, logger: Logger) {
        do {
            let passed = try Systemd.passedSockets()
            if !passed.isEmpty {
                let (adopted, refused) = engine.adopt(passed.map(\.fd))
                for address in adopted { logger.info("socket activation: listener \(address) passed by the service manager") }
                for fd in refused {
                    logger.warning("socket activation: descriptor \(fd.rawValue) is not a listening TCP socket (or repeats an address); closed")
                    fd.close()
                }
            }
        } catch {
            logger.warning("socket activation: LISTEN_FDS cannot be read: \(error)")
        }
    }

    /// SIGUSR2: hands every socket to the binary now at this one's path.
    /// - Returns: true when the successor took over (this process exits);
    ///   false when it did not (everything runs on, as it was).
    private func upgrade(engine: RelayEngine, config: GatewayConfiguration, planeBox: borrowing Mutex<ControlPlane?>,
                         metricsBox: borrowing Mutex<ServerTask?>, link: ServiceManagerLink, logger: Logger) -> Bool {
        logger.notice("SIGUSR2: upgrading to \(Upgrade.executablePath ?? "?")")
        do throws(UpgradeFailure) {
            let summary = try Upgrade.handOver(engine: engine, logger: logger, stopControl: {
                planeBox.withLock { $0 }?.stop(handingOver: true)
                metricsBox.withLock { m -> ServerTask? in let t = m; m = nil; return t }?.stop()
            }, restartControl: {
                restartControl(engine: engine, config: config, planeBox: planeBox, metricsBox: metricsBox, logger: logger)
            })
            link.handedOver(to: summary.successor)
            let milliseconds = Double(summary.pauseNanoseconds / 1000) / 1000
            logger.notice("upgrade: handed over \(summary.connections) connection(s), \(summary.flows) UDP flow(s) and \(summary.listeners) listening socket(s) to pid \(summary.successor) (\(milliseconds) ms from suspension to release: suspended in \(Double(summary.suspendNanoseconds / 1000) / 1000) ms, records sent in \(Double(summary.sendNanoseconds / 1000) / 1000) ms); exiting")
            return true
        } catch {
            logger.error("upgrade failed: \(error); still serving every session")
            return false
        }
    }

    /// A handover failed after the control plane stopped: it starts again
    /// (the relay kept its rules; restoring re-applies the same set).
    private func restartControl(engine: RelayEngine, config: GatewayConfiguration, planeBox: borrowing Mutex<ControlPlane?>,
                                metricsBox: borrowing Mutex<ServerTask?>, logger: Logger) {
        do {
            if config.controlListen != nil {
                let plane = try ControlPlane(engine: engine, config: config, directory: StateDirectory(global.stateDir), logger: logger)
                try plane.start()
                planeBox.withLock { $0 = plane }
            }
            try Self.startMetrics(config, into: metricsBox, logger: logger)
        } catch {
            logger.critical("upgrade: the control plane cannot start again: \(error); the relay serves on, without it")
        }
    }

    /// Re-reads the config. A bad file changes nothing; settings that only a
    /// restart can change are reported and left as they are.
    private func reload(engine: RelayEngine, plane: ControlPlane?, current: GatewayConfiguration, logger: Logger) -> GatewayConfiguration {
        let fresh: GatewayConfiguration
        do {
            fresh = try ConfigParser.load(path: global.config!)
        } catch {
            logger.error("SIGHUP: config not reloaded, keeping the running one: \(error)")
            return current
        }
        do {
            if let plane { try plane.control.setBaseRules(fresh.rules) } else { try engine.apply(fresh.rules) }
        } catch {
            logger.error("SIGHUP: config not reloaded, keeping the running one: \(global.config!): \(error)")
            return current
        }
        if fresh.settings != current.settings || fresh.logLevel != current.logLevel || fresh.controlListen != current.controlListen
            || fresh.publicAddress != current.publicAddress || fresh.desktopNetworks != current.desktopNetworks
            || fresh.rulesSync != current.rulesSync {
            logger.warning("SIGHUP: global settings changed in \(global.config!); they take effect at the next restart (forwards were reloaded)")
        }
        logger.notice("SIGHUP: config reloaded: \(fresh.rules.count) forward(s); \(engine.stats().active) session(s) kept")
        var next = fresh
        next.settings = current.settings
        next.logLevel = current.logLevel
        next.controlListen = current.controlListen
        next.publicAddress = current.publicAddress
        next.desktopNetworks = current.desktopNetworks
        next.rulesSync = current.rulesSync
        return next
    }
}

/// Options shared by the root command and `serve`.
struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: "The config file (see Config/gateway.example.conf).")
    var config: String?

    @Option(name: .long, help: ArgumentHelp("The state directory: broker settings, control key, pushed rules, pid and status.", valueName: "dir"))
    var stateDir: String = defaultStateDirectory
}
