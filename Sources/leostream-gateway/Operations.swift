import Dispatch
import GatewayConfig
import GatewayControl
import Logging
import Relay
import ServiceLifecycle
import ServiceSupport
import Synchronization
import SystemLayer

/// The gateway's operations wiring: its metrics collectors, its STATUS=
/// line, and the HTTP servers it runs beside the relay.
enum GatewayOperations {
    /// Relay, control-plane and kernel-path figures, read at scrape time.
    static func registerMetrics(engine: RelayEngine, plane: @escaping @Sendable () -> ControlPlane?) {
        ServiceMetrics.shared.bootstrap()
        ServiceMetrics.shared.addCollector { text in
            RelayMetrics.write(engine, into: &text)
            guard let plane = plane() else { return }
            let control = plane.control
            text.single("gateway_rules", .gauge, help: "Pushed rules held by the gateway.", control.pushedRules().count)
            text.single("gateway_ports_in_use", .gauge, help: "Rule ports in use from the port range.", control.portsInUse().count)
            if let kernel = control.kernelSummary() {
                text.single("gateway_kernel_forwards", .gauge, help: "Forwards in the kernel path's nftables table.", kernel.forwards)
                text.single("gateway_kernel_flows_total", .counter, help: "Connections and UDP flows the kernel path DNATed.", Int(clamping: kernel.traffic.flows))
                text.single("gateway_kernel_packets_total", .counter, help: "Packets of kernel-path rules (both directions).", Int(clamping: kernel.traffic.packets))
                text.single("gateway_kernel_bytes_total", .counter, help: "Bytes of kernel-path rules (both directions).", Int(clamping: kernel.traffic.bytes))
                text.single("gateway_kernel_offloaded_clients", .gauge, help: "Clients moved from the relay to the kernel path.", kernel.traffic.offloadedClients)
            }
        }
    }

    /// The STATUS= line: sessions, rules, flows.
    static func status(engine: RelayEngine, plane: ControlPlane?) -> String {
        let stats = engine.stats()
        var line = "\(stats.active) session(s), \(stats.accepted) accepted"
        if let plane { line += ", \(plane.control.pushedRules().count) pushed rule(s)" }
        return line
    }

}

/// A server (`Service`) run from the gateway's main thread (which
/// waits for signals, not for tasks): started in a Task of its own, waited
/// for until it is bound, stopped with a bounded wait.
final class ServerTask: Sendable {
    private let services: ServiceGroup
    private let server: Task<Void, any Error>
    /// The bound address, `host:port`.
    let address: String

    /// Runs `app`, whose `onServerRunning` stores its bound address in `bound`.
    /// - Parameter seconds: how long to wait for the bind (nil: until it binds or fails).
    /// - Throws: `ValidationFailure` with why it did not start (the caller names the key).
    init(_ app: some Service, bound: borrowing Mutex<String?>, seconds: UInt64? = nil, logger: Logger) throws {
        let services = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let failure = Mutex<String?>(nil)
        let task = Task {
            do { try await services.run() } catch {
                failure.withLock { $0 = "\(error)" }
                throw error
            }
        }
        self.services = services
        server = task
        let deadline = seconds.map { MonotonicClock.nowNanoseconds + $0 * 1_000_000_000 }
        while bound.withLock({ $0 }) == nil && failure.withLock({ $0 }) == nil
                && deadline.map({ MonotonicClock.nowNanoseconds < $0 }) ?? true {
            BlockingWait.sleep(milliseconds: 10)
        }
        guard let address = bound.withLock({ $0 }) else {
            let why = failure.withLock { $0 } ?? "it did not start within \(seconds ?? 0) s"
            Task { await services.triggerGracefulShutdown(); _ = try? await task.value }
            throw ValidationFailure(why)
        }
        self.address = address
    }

    /// Stops the server and waits for it (at most 10 s).
    func stop() {
        let done = DispatchSemaphore(value: 0)
        let (services, server) = (self.services, self.server)
        Task {
            await services.triggerGracefulShutdown()
            _ = try? await server.value
            done.signal()
        }
        _ = done.wait(timeout: .now() + 10)
    }
}

/// `metrics_listen`: `GET /metrics` and `GET /health` on an address of their
/// own, served by one thread of its own (`InlineHTTPServer`).
enum MetricsListener {
    static func start(listen: SystemLayer.SocketAddress, logger: Logger) throws -> ServerTask {
        let bound = Mutex<String?>(nil)
        do {
            let server = try InlineHTTPServer(
                host: "\(listen.ip)", port: Int(listen.port), tls: nil, threads: 1, maxBodyBytes: 0,
                tooLarge: { _, _ in InlineResponse(status: 413, body: Array(#"{"error":"requests here have no body"}"#.utf8)) },
                logger: logger, onBound: { address in bound.withLock { $0 = address } }) { request in
                switch (request.method, request.path) {
                case ("GET", "/metrics"):
                    return InlineResponse(status: 200, contentType: ServiceMetrics.contentType, body: ServiceMetrics.shared.exposition())
                case ("GET", "/health"):
                    return InlineResponse(status: 200, body: Array(#"{"code":200,"status":"success"}"#.utf8))
                default:
                    return InlineResponse(status: 404, body: Array(#"{"error":"only GET /metrics and GET /health are served here"}"#.utf8))
                }
            }
            return try ServerTask(server, bound: bound, logger: logger)
        } catch {
            throw ValidationFailure("metrics_listen: cannot serve on \(listen): \(error)")
        }
    }
}

struct ValidationFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
