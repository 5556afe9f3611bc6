import ControlProtocol
import Foundation
import Logging
import Synchronization
import SystemLayer

/// Registers the gateway with its broker and sends heartbeats, on its own
/// thread, signed gateway-to-broker.
///
/// On start and whenever the broker, id or key change (`configure`), it
/// registers; the answer's `keep` list reconciles the rules. Then it sends a
/// heartbeat every `heartbeat_interval_s`. When the broker cannot be reached
/// or refuses, it retries registration with a backoff of 1, 2, 4 ... 60 s.
/// Rules and live sessions are never touched by an outage: only new pushes
/// stop, because the broker cannot send them.
public final class BrokerAgent: Sendable {
    public struct Target: Sendable {
        public var broker: BrokerAddress
        public var signer: ControlSigner
        /// How an https broker is trusted (nil for http).
        public var trust: TLSTrust?
        public init(broker: BrokerAddress, signer: ControlSigner, trust: TLSTrust? = nil) {
            self.broker = broker
            self.signer = signer
            self.trust = trust
        }
    }

    private struct State {
        var target: Target?
        var generation = 0
        var stopped = false
        var controlURL: String
        var portRange: PortRange
        var status = StatusReport.Registration(state: "not configured")
    }

    private let control: GatewayControl
    private let version: String
    private let logger: Logger
    private let state: Mutex<State>
    private let thread = Mutex<ThreadHandle?>(nil)
    /// The longest wait between registration attempts.
    public let maxBackoffSeconds: Int
    /// The control endpoint's certificate (PEM) for an https control URL: sent in each registration.
    public let controlCertificate: String?

    public init(control: GatewayControl, version: String, controlURL: String, portRange: PortRange,
                controlCertificate: String? = nil,
                logger: Logger = Logger(label: "broker-agent"), maxBackoffSeconds: Int = 60) {
        self.controlCertificate = controlCertificate
        self.control = control
        self.version = version
        self.logger = logger
        self.maxBackoffSeconds = maxBackoffSeconds
        state = Mutex(State(controlURL: controlURL, portRange: portRange))
    }

    /// Sets (or clears) the broker and key; the agent registers again at once.
    public func configure(_ target: Target?, portRange: PortRange? = nil) {
        state.withLock { s in
            s.target = target
            if let portRange { s.portRange = portRange }
            s.generation += 1
            s.status = StatusReport.Registration(state: target == nil ? "not configured" : "registering",
                                                 controlURL: s.controlURL)
        }
    }

    /// The URL sent in the registration (set once the control endpoint is bound).
    public func setControlURL(_ url: String) {
        state.withLock { s in
            s.controlURL = url
            s.generation += 1
        }
    }

    public var status: StatusReport.Registration {
        state.withLock { s in
            var status = s.status
            status.controlURL = s.controlURL
            return status
        }
    }

    public var broker: BrokerAddress? { state.withLock { $0.target?.broker } }

    /// Starts the thread.
    /// - Throws: `Errno` when the thread cannot be created.
    public func start() throws(Errno) {
        let handle = try SystemThread.spawn(name: "broker-agent") { [self] in run() }
        thread.withLock { $0 = handle }
    }

    /// Stops the thread and waits for it (at most one request timeout).
    public func stop() {
        state.withLock { $0.stopped = true }
        if let handle = thread.withLock({ h -> ThreadHandle? in let t = h; h = nil; return t }) { handle.join() }
    }

    private func run() {
        var backoff = 1
        while true {
            let (generation, target, stopped) = state.withLock { ($0.generation, $0.target, $0.stopped) }
            if stopped { return }
            guard let target else {
                _ = pause(seconds: 3600, generation: generation)
                continue
            }
            switch register(target, generation: generation) {
            case .success(let interval):
                backoff = 1
                // Heartbeats until something fails or the configuration changes.
                while pause(seconds: interval, generation: generation) {
                    if case .failure(let error) = heartbeat(target) {
                        record(generation) { s in
                            s.state = "unreachable"
                            s.lastError = error.message
                        }
                        logger.warning("broker \(target.broker): heartbeat failed: \(error); registering again")
                        break
                    }
                    record(generation) { s in s.lastHeartbeat = ControlClock.unixSeconds() }
                }
                // Back off a little before registering again after a failure.
                if isCurrent(generation) { _ = pause(seconds: backoff, generation: generation) }
            case .failure(let error):
                record(generation) { s in
                    s.state = error.message.hasPrefix("refused") ? "refused" : "unreachable"
                    s.lastError = error.message
                }
                logger.warning("broker \(target.broker): registration failed: \(error); retrying in \(backoff) s")
                _ = pause(seconds: backoff, generation: generation)
                backoff = min(backoff * 2, maxBackoffSeconds)
            }
        }
    }

    /// Registers; returns the heartbeat interval.
    private func register(_ target: Target, generation: Int) -> Result<Int, AgentFailure> {
        let rules = control.rules()
        let (url, range) = state.withLock { ($0.controlURL, $0.portRange) }
        let https = url.lowercased().hasPrefix("https://")
        let request = RegisterRequest(gatewayID: target.signer.gatewayID, version: version, controlURL: url,
                                      portRange: range, rules: rules, controlCertificate: https ? controlCertificate : nil)
        let answer = post(target, path: "/v1/gateway-agent/register", body: ControlJSON.encode(request))
        switch answer {
        case .failure(let error): return .failure(error)
        case .success(let response):
            guard response.status == 200 else { return .failure(Self.refusal(response)) }
            guard let decoded = try? JSONDecoder().decode(RegisterResponse.self, from: Data(response.body)) else {
                return .failure(AgentFailure("refused: the broker's answer is not a registration answer: \(Self.snippet(response.body))"))
            }
            guard isCurrent(generation) else { return .success(1) }
            control.reconcile(sent: rules.map(\.id), keep: decoded.keep)
            let now = ControlClock.unixSeconds()
            record(generation) { s in
                s.state = "registered"
                s.lastRegistered = now
                s.lastHeartbeat = now
                s.lastError = nil
            }
            logger.info("registered with broker \(target.broker) as gateway \(target.signer.gatewayID); heartbeat every \(decoded.heartbeatIntervalSeconds) s")
            return .success(min(max(decoded.heartbeatIntervalSeconds, 1), 3600))
        }
    }

    private func heartbeat(_ target: Target) -> Result<Void, AgentFailure> {
        let sessions = control.sessionCounts().values.reduce(0, +)
        let beat = Heartbeat(gatewayID: target.signer.gatewayID, sessions: sessions, rules: control.pushedRules().count,
                             load: Self.load())
        switch post(target, path: "/v1/gateway-agent/heartbeat", body: ControlJSON.encode(beat)) {
        case .failure(let error): return .failure(error)
        case .success(let response):
            return (200..<300).contains(response.status) ? .success(()) : .failure(Self.refusal(response))
        }
    }

    private func post(_ target: Target, path: String, body: [UInt8]) -> Result<BlockingHTTP.Response, AgentFailure> {
        let fullPath = target.broker.basePath + path
        let authorization = target.signer.authorize(direction: .gatewayToBroker, method: "POST", path: fullPath, body: body)
        do throws(BlockingHTTP.Failure) {
            return .success(try BlockingHTTP.request(method: "POST", host: target.broker.host, port: target.broker.port,
                                                     path: fullPath,
                                                     headers: [("Authorization", authorization), ("Content-Type", "application/json")],
                                                     body: body, tls: target.trust))
        } catch {
            return .failure(AgentFailure(error.description))
        }
    }

    static func refusal(_ response: BlockingHTTP.Response) -> AgentFailure {
        AgentFailure("refused: HTTP \(response.status): \(snippet(response.body))")
    }

    static func snippet(_ body: [UInt8]) -> String {
        let text = String(decoding: body.prefix(300), as: UTF8.self).replacingOccurrences(of: "\n", with: " ")
        return text.isEmpty ? "(no body)" : text
    }

    /// One-minute load average per core.
    static func load() -> Double {
        guard let bytes = try? StateFile.read("/proc/loadavg", limit: 4096),
              let first = String(decoding: bytes, as: UTF8.self).split(separator: " ").first,
              let value = Double(first) else { return 0 }
        return (value / Double(max(SystemInfo.onlineCores, 1)) * 100).rounded() / 100
    }

    private func isCurrent(_ generation: Int) -> Bool {
        state.withLock { $0.generation == generation && !$0.stopped }
    }

    private func record(_ generation: Int, _ change: (inout StatusReport.Registration) -> Void) {
        state.withLock { s in
            if s.generation == generation { change(&s.status) }
        }
    }

    /// Sleeps up to `seconds`; false as soon as the configuration changed or the agent stopped.
    private func pause(seconds: Int, generation: Int) -> Bool {
        let deadline = MonotonicClock.nowNanoseconds + UInt64(seconds) * 1_000_000_000
        while MonotonicClock.nowNanoseconds < deadline {
            guard isCurrent(generation) else { return false }
            BlockingWait.sleep(milliseconds: 50)
        }
        return isCurrent(generation)
    }
}

/// Why a registration or heartbeat failed, as shown by `--status`.
struct AgentFailure: Error, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}
