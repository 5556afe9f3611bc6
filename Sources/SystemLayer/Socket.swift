import CSystemShim
import Glibc

/// What a non-blocking connect(2) did.
public enum ConnectProgress: Equatable, Sendable {
    /// Connected at once (loopback can do that).
    case connected
    /// EINPROGRESS: wait for writability, then read `Socket.pendingError`.
    case inProgress
}

/// TCP keepalive and TCP_USER_TIMEOUT settings: how a quiet but live session
/// is told from a dead peer without a byte-idle timer.
public struct Liveness: Equatable, Sendable {
    /// Seconds of silence before the first probe.
    public var keepaliveIdle: Int
    /// Seconds between probes.
    public var keepaliveInterval: Int
    /// Unanswered probes before the connection is declared dead.
    public var keepaliveCount: Int
    /// Milliseconds that sent data may stay unacknowledged before the kernel
    /// gives up (0 = kernel default).
    public var userTimeoutMilliseconds: Int

    public init(keepaliveIdle: Int = 60, keepaliveInterval: Int = 10, keepaliveCount: Int = 6,
                userTimeoutMilliseconds: Int = 120_000) {
        self.keepaliveIdle = keepaliveIdle
        self.keepaliveInterval = keepaliveInterval
        self.keepaliveCount = keepaliveCount
        self.userTimeoutMilliseconds = userTimeoutMilliseconds
    }
}

/// Socket calls on non-blocking, close-on-exec descriptors.
public enum Socket {
    /// Creates a non-blocking TCP socket for `family` (AF_INET or AF_INET6).
    /// - Throws: `Errno` (EMFILE when out of descriptors).
    public static func makeTCP(family: Int32) throws(Errno) -> FileDescriptor {
        FileDescriptor(rawValue: try Syscall.run { shim_socket(family, SHIM_SOCK_STREAM, 0) })
    }

    /// Creates a non-blocking UDP socket for `family`.
    public static func makeUDP(family: Int32) throws(Errno) -> FileDescriptor {
        FileDescriptor(rawValue: try Syscall.run { shim_socket(family, SHIM_SOCK_DGRAM, 0) })
    }

    /// Opens a listening TCP socket on `address`.
    /// - Parameters:
    ///   - reusePort: set SO_REUSEPORT so that each event loop can hold its own
    ///     socket for the same port and the kernel spreads connections among them.
    ///   - backlog: the accept queue length.
    /// - Throws: `SystemCallError` naming the call and the address.
    public static func listen(on address: SocketAddress, reusePort: Bool, backlog: Int32 = 4096) throws(SystemCallError) -> FileDescriptor {
        let fd: FileDescriptor
        do { fd = try makeTCP(family: address.family) } catch { throw SystemCallError("socket", error, context: "for \(address)") }
        do {
            _ = try Syscall.run { shim_setsockopt_int(fd.rawValue, SOL_SOCKET, SHIM_SO_REUSEADDR, 1) }
            if reusePort {
                _ = try Syscall.run { shim_setsockopt_int(fd.rawValue, SOL_SOCKET, SHIM_SO_REUSEPORT, 1) }
            }
            if !address.ip.isIPv4 {
                _ = try Syscall.run { shim_setsockopt_int(fd.rawValue, SHIM_IPPROTO_IPV6, SHIM_IPV6_V6ONLY, 1) }
            }
        } catch {
            fd.close()
            throw SystemCallError("setsockopt", error, context: "on \(address)")
        }
        do {
            _ = try Syscall.run { address.withSockAddr { Glibc.bind(fd.rawValue, $0, $1) } }
        } catch {
            fd.close()
            throw SystemCallError("bind", error, context: "to \(address)")
        }
        do {
            _ = try Syscall.run { Glibc.listen(fd.rawValue, backlog) }
        } catch {
            fd.close()
            throw SystemCallError("listen", error, context: "on \(address)")
        }
        return fd
    }

    /// A listening TCP socket passed by the service manager (socket
    /// activation), made non-blocking and close-on-exec for the relay.
    /// - Returns: the address it listens on; nil when `fd` is not a
    ///   listening stream socket (a datagram socket, a FIFO, ...).
    public static func adoptListener(_ fd: FileDescriptor) -> SocketAddress? {
        guard intOption(fd, level: SOL_SOCKET, name: SO_TYPE) == SHIM_SOCK_STREAM,
              intOption(fd, level: SOL_SOCKET, name: SHIM_SO_ACCEPTCONN) == 1,
              let address = localAddress(fd) else { return nil }
        let flags = Glibc.fcntl(fd.rawValue, F_GETFL)
        guard flags >= 0, Glibc.fcntl(fd.rawValue, F_SETFL, flags | O_NONBLOCK) == 0,
              Glibc.fcntl(fd.rawValue, F_SETFD, FD_CLOEXEC) == 0 else { return nil }
        return address
    }

    /// Another descriptor for the same socket (close-on-exec): each relay
    /// loop registers its own descriptor of one passed listener.
    public static func duplicate(_ fd: FileDescriptor) throws(Errno) -> FileDescriptor {
        FileDescriptor(rawValue: try Syscall.run { Glibc.fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 0) })
    }

    /// Binds a socket without SO_REUSEPORT to see whether `address` is free, then closes it.
    /// - Throws: `SystemCallError` (EADDRINUSE when another process holds the port).
    public static func probeFree(_ address: SocketAddress) throws(SystemCallError) {
        let fd = try listen(on: address, reusePort: false, backlog: 1)
        fd.close()
    }

    /// Accepts one connection.
    /// - Returns: the new non-blocking descriptor and the peer's address, or `.wouldBlock`.
    /// - Throws: `Errno` (EMFILE/ENFILE when out of descriptors; ECONNABORTED).
    public static func accept(_ listener: FileDescriptor) throws(Errno) -> IOResult<AcceptedConnection> {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        // Safe: storage is large enough for any address and outlives the calls.
        let result = try withUnsafeMutablePointer(to: &storage) { pointer throws(Errno) in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa throws(Errno) in
                try Syscall.nonBlocking { shim_accept4(listener.rawValue, sa, &length) }
            }
        }
        guard case .done(let raw) = result else { return .wouldBlock }
        let peer = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress(sockaddr: $0, length: length) }
        }
        return .done(AcceptedConnection(fd: FileDescriptor(rawValue: raw),
                                        peer: peer ?? SocketAddress(ip: .v4(0), port: 0)))
    }

    /// Starts a non-blocking connect.
    /// - Returns: `.connected` or `.inProgress`.
    /// - Throws: `Errno` for an immediate failure (ECONNREFUSED, ENETUNREACH, ...).
    public static func connect(_ fd: FileDescriptor, to address: SocketAddress) throws(Errno) -> ConnectProgress {
        let rc = address.withSockAddr { Glibc.connect(fd.rawValue, $0, $1) }
        if rc == 0 { return .connected }
        let err = Errno.current
        // EINTR on a non-blocking connect means it continues in the background.
        if err == .inProgress || err == .interrupted { return .inProgress }
        throw err
    }

    /// The error that ended a non-blocking connect (SO_ERROR), or nil when it succeeded.
    public static func pendingError(_ fd: FileDescriptor) -> Errno? {
        var value: Int32 = 0
        if shim_getsockopt_int(fd.rawValue, SOL_SOCKET, SHIM_SO_ERROR, &value) != 0 { return Errno.current }
        return value == 0 ? nil : Errno(rawValue: value)
    }

    /// Turns off Nagle's algorithm.
    public static func setNoDelay(_ fd: FileDescriptor) {
        _ = shim_setsockopt_int(fd.rawValue, SHIM_IPPROTO_TCP, SHIM_TCP_NODELAY, 1)
    }

    /// Applies keepalive and TCP_USER_TIMEOUT. Failures are ignored: these are
    /// best-effort tuning on a socket that works without them.
    public static func apply(_ liveness: Liveness, to fd: FileDescriptor) {
        _ = shim_setsockopt_int(fd.rawValue, SOL_SOCKET, SHIM_SO_KEEPALIVE, 1)
        _ = shim_setsockopt_int(fd.rawValue, SHIM_IPPROTO_TCP, SHIM_TCP_KEEPIDLE, Int32(liveness.keepaliveIdle))
        _ = shim_setsockopt_int(fd.rawValue, SHIM_IPPROTO_TCP, SHIM_TCP_KEEPINTVL, Int32(liveness.keepaliveInterval))
        _ = shim_setsockopt_int(fd.rawValue, SHIM_IPPROTO_TCP, SHIM_TCP_KEEPCNT, Int32(liveness.keepaliveCount))
        if liveness.userTimeoutMilliseconds > 0 {
            _ = shim_setsockopt_int(fd.rawValue, SHIM_IPPROTO_TCP, SHIM_TCP_USER_TIMEOUT, Int32(liveness.userTimeoutMilliseconds))
        }
    }

    /// Reads an integer socket option (used by tests to check what was applied).
    public static func intOption(_ fd: FileDescriptor, level: Int32, name: Int32) -> Int32? {
        var value: Int32 = 0
        return shim_getsockopt_int(fd.rawValue, level, name, &value) == 0 ? value : nil
    }

    /// Sets SO_RCVBUF / SO_SNDBUF (0 leaves the kernel's autotuning alone).
    public static func setBufferSizes(_ fd: FileDescriptor, receive: Int, send: Int) {
        if receive > 0 { _ = shim_setsockopt_int(fd.rawValue, SOL_SOCKET, SHIM_SO_RCVBUF, Int32(receive)) }
        if send > 0 { _ = shim_setsockopt_int(fd.rawValue, SOL_SOCKET, SHIM_SO_SNDBUF, Int32(send)) }
    }

    /// Makes the next close(2) send a RST instead of a FIN.
    public static func setResetOnClose(_ fd: FileDescriptor) {
        _ = shim_set_linger_zero(fd.rawValue)
    }

    /// Sends a FIN: no more data will be written, reading goes on.
    public static func shutdownWrite(_ fd: FileDescriptor) {
        _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_WR))
    }

    /// The address a socket is bound to.
    public static func localAddress(_ fd: FileDescriptor) -> SocketAddress? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        // Safe: storage is large enough for any address and outlives the call.
        return withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                getsockname(fd.rawValue, sa, &length) == 0 ? SocketAddress(sockaddr: sa, length: length) : nil
            }
        }
    }

    // Option constants for tests and callers that check settings.
    public static let levelTCP = SHIM_IPPROTO_TCP
    public static let levelSocket = SOL_SOCKET
    public static let optionKeepAlive = SHIM_SO_KEEPALIVE
    public static let optionKeepIdle = SHIM_TCP_KEEPIDLE
    public static let optionUserTimeout = SHIM_TCP_USER_TIMEOUT
    public static let optionNoDelay = SHIM_TCP_NODELAY
    public static let optionAcceptConn = SHIM_SO_ACCEPTCONN
}

/// A connection taken from a listener's accept queue.
public struct AcceptedConnection: Equatable, Sendable {
    public let fd: FileDescriptor
    public let peer: SocketAddress
}
