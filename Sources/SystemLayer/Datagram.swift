import CSystemShim
import Glibc

/// A batch of datagram slots for recvmmsg/sendmmsg, allocated once and
/// reused, so relaying a datagram allocates nothing. A receive batch owns a
/// buffer per slot; a send batch refers to a receive batch's buffers.
///
/// Not thread-safe: each event loop owns its batches.
public final class DatagramBatch {
    // The C batch; never leaves this class.
    private let raw: OpaquePointer

    /// The largest UDP payload over IPv4 (65,535 - 8 - 20).
    public static let maxPayload = 65_507

    /// - Parameters:
    ///   - capacity: slots (1-64).
    ///   - bufferSize: bytes per slot for a receive batch; 0 for a send batch.
    public init(capacity: Int, bufferSize: Int) {
        guard let batch = shim_dgram_batch_create(Int32(capacity), Int32(bufferSize)) else {
            fatalError("cannot allocate a datagram batch of \(capacity) x \(bufferSize) bytes")
        }
        raw = batch
    }

    deinit { shim_dgram_batch_destroy(raw) }

    public var capacity: Int { Int(shim_dgram_batch_capacity(raw)) }

    // MARK: Receiving

    /// Receives up to `capacity` datagrams with one recvmmsg(2).
    /// - Returns: `.done(n)` datagrams (n ≥ 1), or `.wouldBlock`.
    /// - Throws: `Errno` (ECONNREFUSED on a connected socket after an ICMP port unreachable).
    public func receive(on fd: FileDescriptor) throws(Errno) -> IOResult<Int> {
        try Syscall.nonBlocking { Int(shim_dgram_recv(fd.rawValue, raw)) }
    }

    /// The length of received datagram `i` (0 is a valid, empty datagram).
    @inline(__always)
    public func length(_ i: Int) -> Int { Int(shim_dgram_length(raw, Int32(i))) }

    /// True when datagram `i` was longer than its buffer and was cut.
    public func truncated(_ i: Int) -> Bool { shim_dgram_truncated(raw, Int32(i)) != 0 }

    /// The sender of received datagram `i`.
    @inline(__always)
    public func peer(_ i: Int) -> SocketAddress? {
        var length: socklen_t = 0
        guard let pointer = shim_dgram_peer(raw, Int32(i), &length) else { return nil }
        return SocketAddress(sockaddr: pointer, length: length)
    }

    /// The local address received datagram `i` was sent to (needs `Socket.enablePacketInfo`).
    public func localDestination(_ i: Int) -> IPAddress? {
        var storage = sockaddr_storage()
        guard shim_dgram_local(raw, Int32(i), &storage) == 1 else { return nil }
        // Safe: storage holds an AF_INET/AF_INET6 address written by the shim.
        return withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                SocketAddress(sockaddr: $0, length: socklen_t(MemoryLayout<sockaddr_storage>.size))?.ip
            }
        }
    }

    /// A copy of received datagram `i`'s bytes (for tests and diagnostics, not the relay path).
    public func bytes(_ i: Int) -> [UInt8] {
        let count = length(i)
        guard count > 0 else { return [] }
        // The receive buffer of slot i starts at data + i * buffer_size; the
        // shim exposes it through a one-slot send batch to keep pointers inside.
        let probe = DatagramBatch(capacity: 1, bufferSize: 0)
        _ = probe.append(from: self, index: i, to: nil, source: nil)
        return probe.firstPayloadCopy(count)
    }

    // MARK: Sending

    /// Empties a send batch.
    public func reset() { shim_dgram_tx_reset(raw) }

    /// The payload length of queued slot `i` of a send batch.
    @inline(__always)
    public func queuedLength(_ i: Int) -> Int { Int(shim_dgram_tx_length(raw, Int32(i))) }

    /// Datagrams queued in a send batch.
    public var pending: Int { Int(shim_dgram_tx_count(raw)) }

    /// Queues datagram `index` of `rx` (no copy), to `destination` (nil on a
    /// connected socket), from local address `source` when given.
    /// - Returns: false when the batch is full.
    @inline(__always)
    public func append(from rx: DatagramBatch, index: Int, to destination: SocketAddress?, source: IPAddress?) -> Bool {
        let slot = Int32(index)
        if let source {
            var storage = SocketAddress(ip: source, port: 0).storage
            if let destination {
                return destination.withSockAddr { shim_dgram_tx_add(raw, rx.raw, slot, $0, $1, &storage) } == 1
            }
            return shim_dgram_tx_add(raw, rx.raw, slot, nil, 0, &storage) == 1
        }
        if let destination {
            return destination.withSockAddr { shim_dgram_tx_add(raw, rx.raw, slot, $0, $1, nil) } == 1
        }
        return shim_dgram_tx_add(raw, rx.raw, slot, nil, 0, nil) == 1
    }

    /// Queues `buffer` for a connected socket (load generators).
    /// - Precondition: `buffer` stays valid and unchanged until `send` returns.
    /// - Returns: false when the batch is full.
    public func append(buffer: UnsafeRawBufferPointer) -> Bool {
        shim_dgram_tx_add_buffer(raw, buffer.baseAddress, buffer.count) == 1
    }

    /// Sends queued datagrams from `start` on, all bound for one destination:
    /// runs of equal-sized datagrams go as one UDP GSO send while `gso` is
    /// true (cleared when the system refuses GSO), the rest with sendmmsg(2).
    /// - Returns: `.done(n)` slots sent (call again from `start + n` for the rest), or `.wouldBlock`.
    @inline(__always)
    public func sendFlow(on fd: FileDescriptor, from start: Int, gso: inout Bool) throws(Errno) -> IOResult<Int> {
        var flag: Int32 = gso ? 1 : 0
        defer { gso = flag != 0 }
        return try Syscall.nonBlocking { Int(shim_dgram_send_flow(fd.rawValue, raw, Int32(start), &flag)) }
    }

    /// Sends the queued datagrams from `start` on with one sendmmsg(2).
    /// - Returns: `.done(n)` datagrams sent (possibly fewer than queued), or `.wouldBlock`.
    /// - Throws: `Errno` for the first datagram that failed (ENOBUFS, ECONNREFUSED, ...).
    public func send(on fd: FileDescriptor, from start: Int = 0) throws(Errno) -> IOResult<Int> {
        try Syscall.nonBlocking { Int(shim_dgram_send(fd.rawValue, raw, Int32(start))) }
    }

    private func firstPayloadCopy(_ count: Int) -> [UInt8] {
        // Slot 0 of this send batch points at the receive buffer.
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { buffer in
            _ = shim_dgram_copy_first(raw, buffer.baseAddress, count)
        }
        return out
    }
}

extension Socket {
    /// Opens a UDP socket bound to `address`.
    /// - Parameters:
    ///   - reusePort: SO_REUSEPORT, so each loop can bind the same port.
    ///   - packetInfo: ask for each datagram's destination address (for a
    ///     wildcard bind, so that replies leave from the address the client used).
    ///   - receiveBuffer, sendBuffer: SO_RCVBUF/SO_SNDBUF (0: the kernel's default).
    /// - Throws: `SystemCallError` naming the call and the address.
    public static func bindUDP(_ address: SocketAddress, reusePort: Bool, packetInfo: Bool = false,
                               receiveBuffer: Int = 0, sendBuffer: Int = 0) throws(SystemCallError) -> FileDescriptor {
        let fd: FileDescriptor
        do { fd = try makeUDP(family: address.family) } catch { throw SystemCallError("socket", error, context: "for udp \(address)") }
        do {
            // No SO_REUSEADDR: on UDP it lets unrelated sockets share a port
            // (even an ephemeral one), so datagrams would go to either.
            if reusePort { _ = try Syscall.run { shim_setsockopt_int(fd.rawValue, SOL_SOCKET, SHIM_SO_REUSEPORT, 1) } }
            if !address.ip.isIPv4 { _ = try Syscall.run { shim_setsockopt_int(fd.rawValue, SHIM_IPPROTO_IPV6, SHIM_IPV6_V6ONLY, 1) } }
            if packetInfo { _ = try Syscall.run { shim_enable_pktinfo(fd.rawValue, address.family) } }
        } catch {
            fd.close()
            throw SystemCallError("setsockopt", error, context: "on udp \(address)")
        }
        setBufferSizes(fd, receive: receiveBuffer, send: sendBuffer)
        do {
            _ = try Syscall.run { address.withSockAddr { Glibc.bind(fd.rawValue, $0, $1) } }
        } catch {
            fd.close()
            throw SystemCallError("bind", error, context: "to udp \(address)")
        }
        return fd
    }

    /// Binds a UDP socket without SO_REUSEPORT to see whether `address` is free, then closes it.
    public static func probeFreeUDP(_ address: SocketAddress) throws(SystemCallError) {
        let fd = try bindUDP(address, reusePort: false)
        fd.close()
    }

    /// Opens a UDP socket connected to `target`, from an ephemeral port or
    /// from `sourcePort` (bound with SO_REUSEPORT so several flows can share
    /// it; the kernel delivers each reply to the socket connected to its sender).
    /// - Throws: `Errno` (EMFILE, EADDRINUSE when another process holds `sourcePort`, ...).
    public static func connectUDP(to target: SocketAddress, sourcePort: UInt16? = nil,
                                  receiveBuffer: Int = 0, sendBuffer: Int = 0) throws(Errno) -> FileDescriptor {
        let fd = try makeUDP(family: target.family)
        do {
            setBufferSizes(fd, receive: receiveBuffer, send: sendBuffer)
            if let sourcePort {
                _ = try Syscall.run { shim_setsockopt_int(fd.rawValue, SOL_SOCKET, SHIM_SO_REUSEPORT, 1) }
                let local = SocketAddress(ip: target.ip.isIPv4 ? .v4(0) : .v6(0, 0), port: sourcePort)
                _ = try Syscall.run { local.withSockAddr { Glibc.bind(fd.rawValue, $0, $1) } }
            }
            _ = try Syscall.run { target.withSockAddr { Glibc.connect(fd.rawValue, $0, $1) } }
        } catch {
            fd.close()
            throw error
        }
        return fd
    }

    /// Sends one datagram (tests and control use; the relay uses `DatagramBatch`).
    public static func sendDatagram(_ fd: FileDescriptor, _ bytes: [UInt8], to destination: SocketAddress?) throws(Errno) -> IOResult<Int> {
        try Syscall.nonBlocking {
            bytes.withUnsafeBytes { raw in
                if let destination {
                    return destination.withSockAddr { Glibc.sendto(fd.rawValue, raw.baseAddress, raw.count, 0, $0, $1) }
                }
                return Glibc.send(fd.rawValue, raw.baseAddress, raw.count, 0)
            }
        }
    }

    /// Receives one datagram of up to `max` bytes and its sender.
    public static func receiveDatagram(_ fd: FileDescriptor, max: Int = 65536) throws(Errno) -> IOResult<ReceivedDatagram> {
        var buffer = [UInt8](repeating: 0, count: max)
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        // Safe: buffer and storage outlive the call and are as large as told.
        let result = try Syscall.nonBlocking {
            buffer.withUnsafeMutableBytes { raw in
                withUnsafeMutablePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.recvfrom(fd.rawValue, raw.baseAddress, raw.count, 0, $0, &length)
                    }
                }
            }
        }
        guard case .done(let n) = result else { return .wouldBlock }
        let peer = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress(sockaddr: $0, length: length) }
        }
        return .done(ReceivedDatagram(bytes: Array(buffer[0..<n]), peer: peer))
    }
}

/// One datagram read by `Socket.receiveDatagram`.
public struct ReceivedDatagram: Equatable, Sendable {
    public let bytes: [UInt8]
    public let peer: SocketAddress?
}
