import CSystemShim
import Glibc

/// OS threads and process signals.
public enum SystemThread {
    private final class Box: @unchecked Sendable {
        let body: () -> Void
        let name: String
        init(name: String, body: @escaping () -> Void) { self.name = name; self.body = body }
    }

    /// Starts a thread named `name` (up to 15 bytes show in `top -H`).
    /// - Returns: a handle to join the thread with.
    /// - Throws: `Errno` when the thread cannot be created.
    public static func spawn(name: String, _ body: @escaping @Sendable () -> Void) throws(Errno) -> ThreadHandle {
        let box = Unmanaged.passRetained(Box(name: name, body: body))
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            // Safe: the pointer is the retained Box passed below; taken back exactly once.
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            _ = shim_pthread_set_name(String(box.name.prefix(15)))
            box.body()
            return nil
        }, box.toOpaque())
        if rc != 0 {
            box.release()
            throw Errno(rawValue: rc)
        }
        return ThreadHandle(thread: thread)
    }
}

extension SystemThread {
    /// Moves the calling thread into the network namespace at `path` (such as
    /// `/var/run/netns/NAME`): sockets it opens from now on belong there.
    /// Other threads are not affected. For tests and tools that work in a
    /// namespace of their own.
    /// - Throws: `Errno` (EPERM without CAP_SYS_ADMIN, ENOENT).
    public static func enterNetworkNamespace(path: String) throws(Errno) {
        let fd = try Syscall.run { Glibc.open(path, O_RDONLY | O_CLOEXEC) }
        defer { _ = Glibc.close(fd) }
        _ = try Syscall.run { shim_enter_network_namespace(fd) }
    }

    /// Runs `body` with the calling thread in the network namespace at
    /// `path`, then moves it back: sockets `body` opens stay in that
    /// namespace (a benchmark's receiver behind a gateway, its sender in front).
    public static func inNetworkNamespace<T>(path: String, _ body: () throws -> T) throws -> T {
        let home = try Syscall.run { Glibc.open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC) }
        defer { _ = Glibc.close(home) }
        try enterNetworkNamespace(path: path)
        defer { _ = shim_enter_network_namespace(home) }
        return try body()
    }
}

/// A started thread that must be joined once.
public struct ThreadHandle: @unchecked Sendable {
    let thread: pthread_t

    /// Waits for the thread to finish.
    public func join() {
        pthread_join(thread, nil)
    }

    /// Lets the thread's resources go when it ends, for a thread nobody joins.
    public func detach() {
        pthread_detach(thread)
    }
}

/// The process signals the gateway reacts to.
public enum ProcessSignal: Int32, Sendable {
    case hangUp = 1      // SIGHUP: reload
    case interrupt = 2   // SIGINT: fast stop
    case user1 = 10      // SIGUSR1: status dump
    case user2 = 12      // SIGUSR2: hot upgrade (the gateway)
    case terminate = 15  // SIGTERM: graceful drain

    /// Blocks the handled signals (and SIGPIPE) in the calling thread. Call it
    /// first in `main`, before any thread starts, so every thread inherits the
    /// mask and only `wait()` receives them.
    public static func blockAll() {
        _ = shim_block_process_signals()
    }

    /// Waits for the next handled signal.
    public static func wait() -> ProcessSignal? {
        let raw = shim_wait_signal()
        return ProcessSignal(rawValue: raw)
    }

    /// Sends `signal` to this process (tests use it).
    public static func raise(_ signal: ProcessSignal) {
        _ = shim_raise_process(signal.rawValue)
    }
}

/// Blocking waits for threads that are not event loops (the main thread, tests).
public enum BlockingWait {
    /// Waits until `fd` is readable or the timeout passes.
    /// - Returns: true when readable.
    @discardableResult
    public static func readable(_ fd: FileDescriptor, timeoutMilliseconds: Int32) -> Bool {
        if timeoutMilliseconds != 0 { BlockingCallCheck.check("poll for readable (\(timeoutMilliseconds) ms)") }
        var entry = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        return Glibc.poll(&entry, 1, timeoutMilliseconds) > 0
    }

    /// Waits until `fd` is writable or the timeout passes.
    @discardableResult
    public static func writable(_ fd: FileDescriptor, timeoutMilliseconds: Int32) -> Bool {
        if timeoutMilliseconds != 0 { BlockingCallCheck.check("poll for writable (\(timeoutMilliseconds) ms)") }
        var entry = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
        return Glibc.poll(&entry, 1, timeoutMilliseconds) > 0
    }

    public static func sleep(milliseconds: Int) {
        BlockingCallCheck.check("sleep \(milliseconds) ms")
        _ = usleep(UInt32(milliseconds * 1000))
    }

    /// Polls `condition` every `everyMilliseconds` until it holds or
    /// `timeoutMilliseconds` have passed (a state another thread or process
    /// changes without telling: a background write ending, a process exiting).
    /// - Returns: true when it held, false at the deadline.
    public static func until(timeoutMilliseconds: Int, everyMilliseconds: Int = 5, _ condition: () -> Bool) -> Bool {
        let deadline = MonotonicClock.nowNanoseconds + UInt64(timeoutMilliseconds) * 1_000_000
        while !condition() {
            guard MonotonicClock.nowNanoseconds < deadline else { return false }
            sleep(milliseconds: everyMilliseconds)
        }
        return true
    }
}
