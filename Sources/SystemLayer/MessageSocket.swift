import CSystemShim
import Glibc

/// One end of a Unix SOCK_SEQPACKET socket pair: whole messages, each with
/// up to `maxDescriptors` descriptors attached (SCM_RIGHTS). The hot upgrade
/// hands sockets from the running gateway to its successor over it.
/// Blocking, for the main thread and dedicated threads only.
public struct MessageSocket: Sendable {
    public let fd: FileDescriptor
    public static let maxDescriptors = Int(SHIM_MAX_PASSED_FDS)
    /// The largest message either side sends (a batch of connection records).
    public static let maxMessage = 256 * 1024

    public init(fd: FileDescriptor) { self.fd = fd }

    /// A connected pair (close-on-exec both).
    public static func pair() throws(Errno) -> (MessageSocket, MessageSocket) {
        var fds: [Int32] = [0, 0]
        _ = try Syscall.run { shim_seqpacket_pair(&fds) }
        let ends = (MessageSocket(fd: FileDescriptor(rawValue: fds[0])), MessageSocket(fd: FileDescriptor(rawValue: fds[1])))
        // Room for the biggest message (the default is ~200 KiB).
        for end in [ends.0, ends.1] {
            Socket.setBufferSizes(end.fd, receive: 2 * maxMessage, send: 2 * maxMessage)
        }
        return ends
    }

    /// Sends one message with `descriptors` attached (the receiver gets its own
    /// copies; ours stay open). Waits up to `timeoutMilliseconds` for room.
    public func send(_ bytes: [UInt8], descriptors: [FileDescriptor] = [], timeoutMilliseconds: Int32) throws(Errno) {
        precondition(descriptors.count <= Self.maxDescriptors, "too many descriptors for one message")
        BlockingCallCheck.check("MessageSocket.send")
        let raw = descriptors.map(\.rawValue)
        while true {
            do {
                _ = try Syscall.run { bytes.withUnsafeBytes { b in shim_send_fds(fd.rawValue, b.baseAddress, b.count, raw, Int32(raw.count)) } }
                return
            } catch .wouldBlock {
                guard BlockingWait.writable(fd, timeoutMilliseconds: timeoutMilliseconds) else { throw .timedOut }
            }
        }
    }

    /// Receives one message and its descriptors.
    /// - Returns: nil when the peer closed its end (or went away).
    /// - Throws: `Errno.timedOut` when nothing came within the timeout;
    ///   `Errno.messageTooLong` when the message or its descriptors were cut.
    public func receive(timeoutMilliseconds: Int32) throws(Errno) -> (bytes: [UInt8], descriptors: [FileDescriptor])? {
        BlockingCallCheck.check("MessageSocket.receive")
        guard BlockingWait.readable(fd, timeoutMilliseconds: timeoutMilliseconds) else { throw .timedOut }
        var buffer = [UInt8](repeating: 0, count: Self.maxMessage)
        var raw = [Int32](repeating: -1, count: Self.maxDescriptors)
        var count: Int32 = 0
        var truncated: Int32 = 0
        let n: Int
        do {
            n = try Syscall.run { buffer.withUnsafeMutableBytes { b in
                shim_recv_fds(fd.rawValue, b.baseAddress, b.count, &raw, Int32(raw.count), &count, &truncated) } }
        } catch .connectionReset {
            return nil
        }
        let descriptors = raw.prefix(Int(count)).map { FileDescriptor(rawValue: $0) }
        if truncated != 0 {
            descriptors.forEach { $0.close() }
            throw .messageTooLong
        }
        if n == 0 && descriptors.isEmpty { return nil }
        return (Array(buffer.prefix(n)), descriptors)
    }

    public func close() { fd.close() }
}

/// Starting another program with one descriptor handed to it.
public enum ChildProcessLauncher {
    /// Starts `path` with `arguments` (argv[0] included) and `environment`
    /// ("NAME=value"), with `pass` open in the child as descriptor `as`.
    /// - Returns: the child's pid.
    public static func spawn(_ path: String, arguments: [String], environment: [String],
                             passing pass: FileDescriptor, as childFD: Int32) throws(Errno) -> Int32 {
        var pid: Int32 = 0
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        _ = try Syscall.run { shim_spawn_passing_fd(path, argv, envp, pass.rawValue, childFD, &pid) }
        return pid
    }

    /// Runs `path` with `arguments` (argv[0] included) and `environment`
    /// ("NAME=value"; nil: ours), waits for it, and returns its exit code
    /// (128 + signal when killed) and the first `limit` bytes of its standard
    /// output. Its stderr is ours.
    /// Blocking: for dedicated threads (the blocking pool), never a loop.
    /// - Throws: `Errno` when it cannot be started.
    public static func output(of path: String, arguments: [String], environment: [String]? = nil,
                              limit: Int = 64 * 1024) throws(Errno) -> (status: Int32, output: [UInt8]) {
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { $0.map { strdup($0) } + [nil] }
        defer {
            argv.forEach { free($0) }
            envp?.forEach { free($0) }
        }
        var status: Int32 = 0
        var failure: Errno?
        // Not zero-filled first: only the pages the output reaches are touched.
        // Safe: the shim writes at most `limit` bytes and reports how many in `count`.
        let output = [UInt8](unsafeUninitializedCapacity: max(limit, 1)) { buffer, count in
            let rc = if let envp {
                shim_run_capture(path, argv, envp, buffer.baseAddress, max(limit, 0), &count, &status)
            } else {
                shim_run_capture(path, argv, nil, buffer.baseAddress, max(limit, 0), &count, &status)
            }
            if rc != 0 {
                failure = Errno.current
                count = 0
            }
        }
        if let failure { throw failure }
        return (status, output)
    }

    /// Whether `pid` (our child) has ended, without waiting.
    /// - Returns: its exit code (128 + signal when killed), or nil while it runs.
    public static func exitStatus(of pid: Int32) -> Int32? {
        var status: Int32 = 0
        let rc = shim_reap_child(pid, &status)
        if rc == pid { return status }
        // ECHILD: not ours, or already reaped: treat as ended.
        if rc < 0 && Errno.current == .noChild { return -1 }
        return nil
    }
}
