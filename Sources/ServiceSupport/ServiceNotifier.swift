import NIOCore
import NIOPosix
import Synchronization
import SystemLayer

/// What a daemon tells its service manager (`sd_notify` through
/// `Systemd.notify`): READY=1 once its listeners are open and its state is
/// restored, STATUS= lines, RELOADING=1/READY=1 around a SIGHUP reload,
/// STOPPING=1 when it drains, and WATCHDOG=1 (sent by `ServiceHeartbeat`).
/// Without a manager (no `NOTIFY_SOCKET`) every call does nothing.
public struct ServiceNotifier: Sendable {
    let send: @Sendable (String) -> Void
    /// Waits until the manager read what was sent (true without a manager).
    let barrier: @Sendable () -> Bool

    /// The real one, through libsystemd.
    public static let systemd = ServiceNotifier(send: { Systemd.notify($0) },
                                                barrier: { Systemd.notifySocket == nil || Systemd.notifyBarrier() })

    /// `send` receives each message (for tests).
    public init(send: @escaping @Sendable (String) -> Void, barrier: @escaping @Sendable () -> Bool = { true }) {
        self.send = send
        self.barrier = barrier
    }

    public func ready(status: String) { send("READY=1\nSTATUS=\(Self.clean(status))") }
    public func status(_ status: String) { send("STATUS=\(Self.clean(status))") }
    /// `MONOTONIC_USEC` lets systemd tell this reload from an older one (Type=notify-reload).
    public func reloading() { send("RELOADING=1\nMONOTONIC_USEC=\(MonotonicClock.nowNanoseconds / 1000)") }
    public func reloaded(status: String) { ready(status: status) }
    public func stopping(status: String) { send("STOPPING=1\nSTATUS=\(Self.clean(status))") }
    public func watchdog() { send("WATCHDOG=1") }
    /// A successor process carries on (hot upgrade): systemd follows `pid`
    /// from now on (the main process may say so under NotifyAccess=main).
    public func mainPID(_ pid: Int32, status: String) { send("MAINPID=\(pid)\nSTATUS=\(Self.clean(status))") }

    /// A status is one line.
    static func clean(_ text: String) -> String {
        String(text.map { $0 == "\n" ? " " : $0 })
    }
}

/// Pings the service manager's watchdog only while every event loop of the
/// process still runs commands: each round, every probe is asked to run a
/// tiny task on its loop (a relay loop, a NIO loop, Swift's cooperative
/// pool); WATCHDOG=1 goes out when all of them have answered. A loop that
/// is stuck (a blocking call, a livelock) stops the pings, and systemd,
/// after `WatchdogSec=`, restarts the process. The same thread refreshes
/// the STATUS= line.
public final class ServiceHeartbeat: Sendable {
    /// Runs `answer` on the probed loop (from any thread).
    public typealias Probe = @Sendable (_ answer: @escaping @Sendable () -> Void) -> Void

    public struct Loop: Sendable {
        public let name: String
        public let probe: Probe
        public init(name: String, probe: @escaping Probe) {
            self.name = name
            self.probe = probe
        }
    }

    private let loops: [Loop]
    private let periodNanoseconds: UInt64
    private let watchdogOn: Bool
    private let notifier: ServiceNotifier
    private let status: (@Sendable () -> String)?
    private let onStall: @Sendable ([String]) -> Void
    private let stopped = Atomic<Bool>(false)
    /// The last round each loop answered.
    private final class Slot: Sendable {
        let round = Atomic<UInt64>(0)
    }
    private let answered: [Slot]
    private let thread = Mutex<ThreadHandle?>(nil)

    /// - Parameters:
    ///   - watchdogMicroseconds: systemd's `WATCHDOG_USEC` (nil: no watchdog;
    ///     only STATUS= is refreshed). Pings go out twice per interval.
    ///   - statusEverySeconds: how often STATUS= is refreshed without a watchdog.
    ///   - onStall: called with the names of the loops that did not answer in
    ///     a round (once per stall, not per round).
    public init(loops: [Loop], watchdogMicroseconds: UInt64?, notifier: ServiceNotifier,
                statusEverySeconds: UInt64 = 5, status: (@Sendable () -> String)? = nil,
                onStall: @escaping @Sendable ([String]) -> Void = { _ in }) {
        self.loops = loops
        self.watchdogOn = watchdogMicroseconds != nil
        if let usec = watchdogMicroseconds {
            periodNanoseconds = max(usec * 1000 / 2, 10_000_000)
        } else {
            periodNanoseconds = statusEverySeconds * 1_000_000_000
        }
        self.notifier = notifier
        self.status = status
        self.onStall = onStall
        answered = loops.map { _ in Slot() }
    }

    /// Starts the heartbeat thread.
    public func start() throws(Errno) {
        let handle = try SystemThread.spawn(name: "heartbeat") { [self] in run() }
        thread.withLock { $0 = handle }
    }

    /// Stops the thread (no more pings) and waits for it.
    public func stop() {
        stopped.store(true, ordering: .releasing)
        if let handle = thread.withLock({ h -> ThreadHandle? in defer { h = nil }; return h }) {
            handle.join()
        }
    }

    private func run() {
        var round: UInt64 = 0
        var stalled = false
        while !stopped.load(ordering: .acquiring) {
            round &+= 1
            let start = MonotonicClock.nowNanoseconds
            if watchdogOn {
                for (i, loop) in loops.enumerated() {
                    let mark = round
                    let slot = i
                    loop.probe { [self] in answered[slot].round.store(mark, ordering: .releasing) }
                }
                // Ping as soon as every loop has answered this round.
                var late: [String] = []
                while !stopped.load(ordering: .acquiring) {
                    late = loops.indices.filter { answered[$0].round.load(ordering: .acquiring) != round }.map { loops[$0].name }
                    if late.isEmpty || MonotonicClock.nowNanoseconds &- start >= periodNanoseconds { break }
                    BlockingWait.sleep(milliseconds: 5)
                }
                if stopped.load(ordering: .acquiring) { break }
                if late.isEmpty {
                    notifier.watchdog()
                    stalled = false
                } else if !stalled {
                    stalled = true
                    onStall(late)
                }
            }
            if let status { notifier.status(status()) }
            while !stopped.load(ordering: .acquiring) && MonotonicClock.nowNanoseconds &- start < periodNanoseconds {
                BlockingWait.sleep(milliseconds: 20)
            }
        }
    }
}

extension ServiceHeartbeat.Loop {
    /// The loops every daemon of the package runs besides its own: SwiftNIO's
    /// shared event loops (Hummingbird's servers, the HTTP clients) and
    /// Swift's cooperative pool (the async handlers).
    public static func sharedLoops() -> [ServiceHeartbeat.Loop] {
        var loops: [ServiceHeartbeat.Loop] = []
        for (i, loop) in MultiThreadedEventLoopGroup.singleton.makeIterator().enumerated() {
            loops.append(ServiceHeartbeat.Loop(name: "NIO loop \(i)") { answer in loop.execute { answer() } })
        }
        loops.append(ServiceHeartbeat.Loop(name: "Swift concurrency pool") { answer in Task { answer() } })
        return loops
    }
}

/// The version line of every binary: `--version` prints it.
public enum ProductVersion {
    public static var line: String { "\(BuildInfo.version) (commit \(BuildInfo.commit))" }
}
