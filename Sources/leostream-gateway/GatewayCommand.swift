import ArgumentParser
import GatewayConfig
import Logging
import Relay
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
        for drain_timeout; SIGHUP re-reads the config without dropping a
        session (a bad config is reported and the old one kept); SIGINT stops at
        once; SIGUSR1 logs the counters.
        """,
        subcommands: [Serve.self]
    )

    @Flag(name: .long, help: "Validate the config file and exit (0: valid; 2: invalid, with file:line and reason).")
    var check = false

    @OptionGroup var global: GlobalOptions

    func run() throws {
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
        let parsed: GatewayConfiguration
        do {
            parsed = try ConfigParser.load(path: config)
        } catch {
            printError("error: \(error)")
            throw ExitCode(2)
        }
        let level = Logger.Level(rawValue: parsed.logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        var logger = Logger(label: "leostream-gateway")
        logger.logLevel = level

        let engine: RelayEngine
        do {
            engine = try RelayEngine(settings: parsed.settings, logger: logger)
        } catch {
            printError("error: cannot start the event loops: \(error)")
            throw ExitCode(1)
        }
        do {
            try engine.apply(parsed.rules)
        } catch {
            printError("error: \(config): \(error)")
            engine.shutdown()
            throw ExitCode(1)
        }
        logger.info("ready: \(parsed.rules.count) forward(s), \(parsed.settings.loops) loop(s), max_connections=\(parsed.settings.maxConnections), pid=\(ProcessInfoLite.pid)")
        for rule in parsed.rules { logger.info("forward \(rule)") }

        var current = parsed
        while true {
            switch ProcessSignal.wait() {
            case .hangUp?:
                current = reload(engine: engine, current: current, logger: logger)
            case .user1?:
                logger.notice("stats: \(engine.stats())")
            case .terminate?:
                let seconds = Double(current.drainTimeoutNanoseconds) / 1e9
                logger.notice("SIGTERM: draining \(engine.stats().active) session(s) for up to \(seconds)s")
                let forced = engine.drain(timeoutNanoseconds: current.drainTimeoutNanoseconds)
                logger.notice("drained; \(forced) session(s) closed at the deadline; stats: \(engine.stats())")
                engine.shutdown()
                return
            case .interrupt?:
                logger.notice("SIGINT: stopping now; stats: \(engine.stats())")
                engine.shutdown()
                return
            case nil:
                continue
            }
        }
    }

    /// Re-reads the config. A bad file changes nothing; settings that only a
    /// restart can change are reported and left as they are.
    private func reload(engine: RelayEngine, current: GatewayConfiguration, logger: Logger) -> GatewayConfiguration {
        let fresh: GatewayConfiguration
        do {
            fresh = try ConfigParser.load(path: global.config!)
        } catch {
            logger.error("SIGHUP: config not reloaded, keeping the running one: \(error)")
            return current
        }
        do {
            try engine.apply(fresh.rules)
        } catch {
            logger.error("SIGHUP: config not reloaded, keeping the running one: \(global.config!): \(error)")
            return current
        }
        if fresh.settings != current.settings || fresh.logLevel != current.logLevel {
            logger.warning("SIGHUP: global settings changed in \(global.config!); they take effect at the next restart (forwards were reloaded)")
        }
        logger.notice("SIGHUP: config reloaded: \(fresh.rules.count) forward(s); \(engine.stats().active) session(s) kept")
        var next = fresh
        next.settings = current.settings
        next.logLevel = current.logLevel
        return next
    }
}

/// Options shared by the root command and `serve`.
struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: "The config file (see Config/gateway.example.conf).")
    var config: String?
}
