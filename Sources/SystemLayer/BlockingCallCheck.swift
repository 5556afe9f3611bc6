import CSystemShim
import Glibc

/// Catches blocking work on Swift's cooperative threads.
///
/// Swift runs every task on a pool as wide as the machine has cores (two
/// here). One task blocked in `poll`, `fsync`, a lock wait or a sleep takes a
/// whole thread away from every Hummingbird server, every GRDB call and every
/// test of the process; two of them stall it entirely. Each blocking
/// primitive of this layer (`BlockingWait`, `StateFile` writes and reads,
/// `AppendOnlyFile.sync`, `DoneSignal.wait` in the event loop) calls
/// `check(_:)` first: when the calling thread is running a Swift task, the
/// call is reported.
///
/// The mode comes from `RDG_BLOCKING_CHECK` (`off`, `log`, `trap`); debug
/// builds trap by default, so the test suite fails at the offending call with
/// its name and a backtrace; release builds are off by default (the check is
/// one thread-local read when on).
public enum BlockingCallCheck {
    public enum Mode: Sendable, Equatable {
        case off, log, trap
    }

    /// The mode in force, read once from the environment.
    public static let mode: Mode = {
        switch getenv("RDG_BLOCKING_CHECK").map({ String(cString: $0) }) {
        case "off"?, "0"?: return .off
        case "log"?: return .log
        case "trap"?, "1"?: return .trap
        default:
            #if DEBUG
            return .trap
            #else
            return .off
            #endif
        }
    }()

    /// Whether the calling thread is running a Swift task on a thread that
    /// tasks share (the cooperative pool, or an executor such as an event
    /// loop). The main thread is its own (a command-line tool may wait
    /// there), and so are `BlockingExecutor`'s threads.
    public static var onTaskThread: Bool {
        guard withUnsafeCurrentTask(body: { $0 != nil }) else { return false }
        return shim_is_main_thread() == 0 && shim_thread_is_dedicated() == 0
    }

    /// Marks the calling thread as one where blocking is allowed: a thread
    /// that runs no Swift tasks and serves one component alone (an
    /// `InlineHTTPServer`'s event loop). Idempotent.
    public static func markDedicated() { shim_mark_thread_dedicated() }

    /// Reports `what` (a blocking call about to be made) when it would block
    /// a thread that runs Swift tasks.
    /// - Parameter what: the call and why it blocks, e.g. `"fsync of rules.json"`.
    /// - Side effects: in `log` mode a stderr line, with the stack the first time a stack is seen; in
    ///   `trap` mode the process stops with the message.
    @inline(__always)
    public static func check(_ what: @autoclosure () -> String) {
        guard mode != .off, onTaskThread else { return }
        report(what())
    }

    @inline(never)
    static func report(_ what: String) {
        let message = "blocking call on a Swift concurrency thread: \(what); run it on a dedicated thread"
        switch mode {
        case .off: return
        case .log:
            // One report per calling stack (its first frames), with the stack.
            _ = shim_print_backtrace_once("warning: \(message)\n", 2, 10)
        case .trap:
            fatalError(message)
        }
    }
}
