import Logging
import ServiceLifecycle
import SystemLayer

/// A daemon's link to its service manager: READY=1 once its listeners are
/// bound, the heartbeat (watchdog pings, STATUS=) while it runs,
/// RELOADING=1/READY=1 around a reload, STOPPING=1 when it drains. The
/// ServiceGroup daemons (broker, Security Gateway, Connection Manager) run it
/// as a Service, which says STOPPING=1 when the group's graceful shutdown
/// begins; the gateway, whose main thread waits for signals, calls
/// `stopping` itself.
public final class ServiceManagerLink: Service, Sendable {
    private let notifier: ServiceNotifier
    private let heartbeat: ServiceHeartbeat?
    private let status: @Sendable () -> String
    private let logger: Logger

    /// - Parameters:
    ///   - loops: the daemon's own event loops (relay loops); NIO's and
    ///     Swift's pool are added.
    ///   - status: the STATUS= line (runs on the heartbeat thread; may block briefly).
    public init(loops: [ServiceHeartbeat.Loop] = [], notifier: ServiceNotifier = .systemd, logger: Logger,
                status: @escaping @Sendable () -> String) {
        self.notifier = notifier
        self.status = status
        self.logger = logger
        if Systemd.notifySocket != nil {
            heartbeat = ServiceHeartbeat(loops: loops + ServiceHeartbeat.Loop.sharedLoops(),
                                         watchdogMicroseconds: Systemd.watchdogMicroseconds, notifier: notifier,
                                         status: status,
                                         onStall: { late in logger.critical("watchdog: no answer from \(late.joined(separator: ", ")); pings withheld") })
        } else {
            heartbeat = nil
        }
    }

    /// The listeners are bound and the state restored.
    public func ready() {
        notifier.ready(status: status())
        do { try heartbeat?.start() } catch { logger.error("watchdog: cannot start the heartbeat thread: \(error)") }
    }

    public func reloading() { notifier.reloading() }
    public func reloaded() { notifier.reloaded(status: status()) }
    public func stopping(status: String) { notifier.stopping(status: status) }

    /// Waits for the graceful shutdown, then says STOPPING=1. The heartbeat
    /// goes on while the daemon drains; `finish()` ends it.
    public func run() async throws {
        try? await gracefulShutdown()
        notifier.stopping(status: "stopping: " + status())
    }

    /// A successor took over (hot upgrade): the service manager follows
    /// it, and this process's heartbeat ends (the successor has its own).
    public func handedOver(to pid: Int32) {
        notifier.mainPID(pid, status: "handed over to pid \(pid)")
        heartbeat?.stop()
        if !notifier.barrier() { logger.warning("upgrade: the service manager did not confirm MAINPID=\(pid) within 5 s") }
    }

    /// The daemon is about to exit.
    public func finish() {
        heartbeat?.stop()
    }
}
