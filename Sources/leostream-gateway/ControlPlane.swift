import ControlProtocol
import Dispatch
import Foundation
import GatewayConfig
import GatewayControl
import Logging
import NetfilterKernel
import Relay
import ServiceLifecycle
import ServiceSupport
import Synchronization
import SystemLayer

let gatewayVersion = BuildInfo.version
let defaultStateDirectory = "/var/lib/leostream-gateway"

/// The kernel path cannot start (capability, sysctl, table): the message says why.
struct KernelPathError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// The control plane of a running `serve`: the pushed rules, the signed
/// control endpoint, registration and heartbeats, the status file. Wiring only.
final class ControlPlane: Sendable {
    let control: GatewayControl
    let agent: BrokerAgent
    let directory: StateDirectory
    private let server = Mutex<ServerTask?>(nil)
    private let listen: SocketAddress
    private let tls: ServerTLS?
    private let configuredURL: String?
    private let maintenance = Mutex<ThreadHandle?>(nil)
    private let status = StatusWriter()
    private let stopped = Atomic<Bool>(false)
    private let logger: Logger
    private let current = Mutex<StoredSettings>(StoredSettings())
    private let forwardListen: SocketAddress?
    private let gatewaySignature: String

    /// Loads the state directory and restores the persisted rules with the
    /// config's forwards (the relay serves them from here on); `start`
    /// then opens the control endpoint and registers. (A hot upgrade's
    /// successor adopts the handed sessions between the two.)
    /// - Throws: `ControlError` (state files, the certificate) or `RuleError` (the config's forwards).
    init(engine: RelayEngine, config: GatewayConfiguration, directory: StateDirectory, logger: Logger) throws {
        self.directory = directory
        self.logger = logger
        forwardListen = config.brokerForwardListen
        gatewaySignature = config.gatewaySignature
        try directory.create()
        let stored = try directory.loadSettings()
        let key = try directory.loadKey()
        let range = stored.portRange.map { $0.first...$0.last } ?? 20001...22000
        let listen = config.controlListen!
        self.listen = listen
        configuredURL = config.controlURL
        let own = [listen] + config.rules.map(\.listen) + (config.brokerForwardListen.map { [$0] } ?? []) + (config.metricsListen.map { [$0] } ?? [])
        var settings = ControlSettings(publicAddress: config.publicAddress, desktopNetworks: config.desktopNetworks,
                                       portRange: range, ownAddresses: own)
        settings.localAddresses = SystemInfo.interfaceAddresses()
        settings.defaultForwarding = config.forwarding
        settings.rulesSync = config.rulesSync
        let signer = Self.signer(stored, key)
        var kernel: KernelTable?
        if config.kernelPath {
            // Refused before anything changes: no capability, no forwarding.
            if let problem = KernelChecks.capabilityProblem() { throw KernelPathError(message: problem) }
            let sysctls = KernelChecks.sysctls(wantedFlows: 0)
            if let first = sysctls.errors.first { throw KernelPathError(message: first) }
            kernel = KernelTable(name: config.kernelTable)
        }
        control = GatewayControl(engine: engine, settings: settings, baseRules: config.rules,
                                 stateDirectory: directory.path, signer: signer, logger: logger, kernel: kernel)
        do {
            try control.restore()
        } catch let error as NetfilterError {
            throw KernelPathError(message: "kernel_path: the table inet \(config.kernelTable) cannot be set up: \(error)")
        }
        if let kernel {
            // nf_conntrack is loaded now (the table's NAT chains need it).
            let flows = config.settings.maxFlows + config.settings.maxConnections
            for warning in KernelChecks.sysctls(wantedFlows: flows).warnings { logger.warning("kernel path: \(warning)") }
            let summary = control.kernelSummary()
            logger.info("kernel path: table inet \(kernel.name), \(summary?.forwards ?? 0) forward(s); pushed rules take \(config.forwarding.rawValue) unless the broker says otherwise")
        }

        // TLS unless the config says control_plain_http = yes (issue 14).
        let tls: ServerTLS?
        if config.controlPlainHTTP {
            tls = nil
            logger.warning("control endpoint on \(listen) speaks plain HTTP (control_plain_http = yes): rule contents cross the network in clear, only their signatures protect them")
        } else {
            var names = ServerTLS.names(listening: listen)
            if let url = config.controlURL, let host = URLComponents(string: url)?.host, !names.contains(host) { names.append(host) }
            do throws(ServerTLS.Problem) {
                tls = try ServerTLS.load(certificate: config.controlTLSCertificate, key: config.controlTLSKey,
                                         folder: directory.path, names: names, fields: ("control_tls_cert", "control_tls_key"))
            } catch {
                throw ControlError(500, field: error.field, error.description)
            }
        }
        self.tls = tls
        agent = BrokerAgent(control: control, version: gatewayVersion, controlURL: config.controlURL ?? "",
                            portRange: PortRange(first: range.lowerBound, last: range.upperBound),
                            controlCertificate: tls?.certificatePEM, logger: logger)
        current.withLock { $0 = stored }
        agent.configure(target(stored, signer), portRange: PortRange(first: range.lowerBound, last: range.upperBound))
        updateForwarding(stored, signer)
    }

    /// Opens the control endpoint, starts registration and the maintenance
    /// thread, and writes the pid file.
    /// - Throws: `ControlError` (the endpoint) or `Errno` (a thread).
    func start() throws {
        let bound = Mutex<String?>(nil)
        let server: ServerTask
        do {
            let app = try ControlServer.application(control: control, host: "\(listen.ip)", port: Int(listen.port),
                                                    logger: logger, tls: tls?.configuration,
                                                    onServerRunning: { address in bound.withLock { $0 = address } })
            server = try ServerTask(app, bound: bound, seconds: 10, logger: logger)
        } catch {
            throw ControlError(500, field: "control_listen", "control_listen: cannot serve on \(listen): \(error)")
        }
        self.server.withLock { $0 = server }
        let address = server.address
        let boundAddress = SocketAddress(address)
        control.updateSettings { settings in
            if let boundAddress { settings.ownAddresses.append(boundAddress) }
        }
        let url = configuredURL ?? "\(tls == nil ? "http" : "https")://\(address)"
        agent.setControlURL(url)
        try agent.start()
        writeStatus()
        try directory.writePID(SystemInfo.processID)
        let handle = try SystemThread.spawn(name: "gw-maintain") { [self] in maintain() }
        maintenance.withLock { $0 = handle }
        let stored = current.withLock { $0 }
        logger.info("control endpoint on \(address) (\(url)\(tls.map { ", TLS with \($0.source)" } ?? "")); state in \(directory.path); broker: \(stored.broker ?? "not set")")
    }

    private static func signer(_ stored: StoredSettings, _ key: ControlKey?) -> ControlSigner? {
        guard let id = stored.gatewayID, let key else { return nil }
        return ControlSigner(gatewayID: id, key: key)
    }

    private func target(_ stored: StoredSettings, _ signer: ControlSigner?) -> BrokerAgent.Target? {
        guard let text = stored.broker, let broker = try? BrokerAddress(text), let signer else { return nil }
        guard broker.tls else {
            logger.warning("the broker \(broker) is plain HTTP: registration and heartbeats cross the network in clear (signed)")
            return BrokerAgent.Target(broker: broker, signer: signer)
        }
        // An https broker is trusted only as enrollment pinned it.
        if stored.brokerCA != nil {
            return BrokerAgent.Target(broker: broker, signer: signer, trust: .caFile(directory.brokerCAPath))
        }
        if let pin = stored.brokerPin.flatMap(TLSClientSession.parseFingerprint) {
            return BrokerAgent.Target(broker: broker, signer: signer, trust: .pin(pin))
        }
        logger.error("the broker \(broker) is https but nothing is pinned for it: run leostream-gateway --broker \(broker) again (it pins the certificate), or give --broker-ca or --broker-fingerprint")
        return nil
    }

    /// SIGHUP: re-reads the stored broker, id, key and port range.
    func reloadState() {
        do {
            let stored = try directory.loadSettings()
            let key = try directory.loadKey()
            let signer = Self.signer(stored, key)
            let previousSigner = control.signer
            let previous = current.withLock { $0 }
            let range = stored.portRange.map { $0.first...$0.last } ?? 20001...22000
            control.setPortRange(range)
            control.setSigner(signer)
            let keyChanged = previousSigner?.key != signer?.key
            if stored != previous || keyChanged {
                current.withLock { $0 = stored }
                updateForwarding(stored, signer)
                agent.configure(target(stored, signer), portRange: PortRange(first: range.lowerBound, last: range.upperBound))
                logger.notice("SIGHUP: broker \(stored.broker ?? "not set"), gateway id \(stored.gatewayID.map(String.init) ?? "not set"), port range \(range.lowerBound)-\(range.upperBound)\(keyChanged ? ", new control key" : ""): registering")
            }
        } catch {
            logger.error("SIGHUP: state in \(directory.path) not reloaded, keeping the running one: \(error)")
        }
    }

    /// Broker forwarding follows the stored broker: on when
    /// `broker_forward_listen` is set and the broker, id and key are known.
    private func updateForwarding(_ stored: StoredSettings, _ signer: ControlSigner?) {
        guard let listen = forwardListen else { return }
        var rule: RelayRule?
        if let text = stored.broker, let broker = try? BrokerAddress(text), let signer {
            do throws(AddressResolutionError) {
                let target = try SocketAddress.resolve(host: broker.host, port: broker.port)
                rule = BrokerForwarding.rule(listen: listen, broker: target, signer: signer, signature: gatewaySignature)
            } catch {
                logger.error("broker forwarding: \(error); forwarding stays as it was")
                return
            }
        }
        do throws(RuleError) {
            try control.setForwardRule(rule)
            if let rule { logger.info("broker forwarding: \(rule)") }
        } catch {
            logger.error("broker forwarding on \(listen) not changed: \(error)")
        }
    }

    private func maintain() {
        while !stopped.load(ordering: .relaxed) {
            control.tick()
            writeStatus()
            for _ in 0..<20 where !stopped.load(ordering: .relaxed) { BlockingWait.sleep(milliseconds: 50) }
        }
    }

    /// status.json, for `--status`: rewritten when it changes (and at least
    /// every `StatusWriter.refreshSeconds`), not every second.
    func writeStatus() {
        let sessions = control.sessionCounts()
        let rules = control.rules(sessions: sessions)
        let stored = current.withLock { $0 }
        let range = control.settings.portRange
        status.write(StatusReport(pid: SystemInfo.processID, updated: ControlClock.unixSeconds(), broker: stored.broker,
                                  gatewayID: stored.gatewayID, registration: agent.status, rules: rules,
                                  sessions: sessions.values.reduce(0, +), portsInUse: control.portsInUse(),
                                  portRange: PortRange(first: range.lowerBound, last: range.upperBound)),
                     to: directory)
    }

    /// Stops registration, the endpoint and the maintenance thread; the relay is the caller's.
    /// - Parameter handingOver: a successor takes over (hot upgrade): the pid
    ///   and status files stay for it to replace, and no rule changes after
    ///   this returns (the journal's snapshot is complete on disk).
    func stop(handingOver: Bool = false) {
        stopped.store(true, ordering: .relaxed)
        agent.stop()
        if let handle = maintenance.withLock({ h -> ThreadHandle? in let t = h; h = nil; return t }) { handle.join() }
        server.withLock { s -> ServerTask? in let t = s; s = nil; return t }?.stop()
        // rules_sync = background: what was answered is made durable before the process goes.
        if !control.store.flush() { logger.warning("stop: the rules journal's last changes were still being synced after 30 s") }
        if handingOver {
            if !control.store.waitForCompaction() { logger.warning("upgrade: the rules snapshot was still being written after 30 s") }
            return
        }
        directory.removePID()
        StateFile.remove(directory.statusPath)
    }
}
