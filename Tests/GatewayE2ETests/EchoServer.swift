import Foundation
import Synchronization
import SystemLayer
import TestSupport

/// A thread-per-connection echo server on loopback for end-to-end tests.
final class EchoServer: @unchecked Sendable {
    let address: SocketAddress
    private let listener: FileDescriptor
    private let stopped = Atomic<Bool>(false)
    let connections = Atomic<Int>(0)

    init() throws {
        listener = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        address = Socket.localAddress(listener)!
        let thread = Thread { [self] in acceptLoop() }
        thread.start()
    }

    private func acceptLoop() {
        while !stopped.load(ordering: .relaxed) {
            guard BlockingWait.readable(listener, timeoutMilliseconds: 100) else { continue }
            guard case .done(let conn)? = try? Socket.accept(listener) else { continue }
            connections.wrappingAdd(1, ordering: .relaxed)
            let thread = Thread { [self] in serve(conn.fd) }
            thread.start()
        }
    }

    private func serve(_ fd: FileDescriptor) {
        defer { fd.close() }
        var buffer = [UInt8](repeating: 0, count: 65536)
        while !stopped.load(ordering: .relaxed) {
            guard BlockingWait.readable(fd, timeoutMilliseconds: 100) else { continue }
            let result = buffer.withUnsafeMutableBytes { try? fd.read(into: $0) }
            guard case .done(let n)? = result else {
                if case .wouldBlock? = result { continue }
                return
            }
            if n == 0 { return }
            do {
                var offset = 0
                while offset < n {
                    let r = try buffer.withUnsafeBytes { try fd.write(UnsafeRawBufferPointer(rebasing: $0[offset..<n])) }
                    if case .done(let w) = r { offset += w } else { BlockingWait.writable(fd, timeoutMilliseconds: 100) }
                }
            } catch { return }
        }
    }

    func stop() {
        stopped.store(true, ordering: .relaxed)
        listener.close()
    }
}

/// A small blocking client: connect, send, receive the echo.
struct EchoClient {
    let fd: FileDescriptor
    var resetOnArrival = false

    static func connect(_ address: SocketAddress) throws -> EchoClient {
        let fd = try Socket.makeTCP(family: address.family)
        do { _ = try Socket.connect(fd, to: address) } catch { fd.close(); throw error }
        guard BlockingWait.writable(fd, timeoutMilliseconds: TestDeadline.milliseconds) else { fd.close(); throw Errno.timedOut }
        switch Socket.pendingError(fd) {
        case nil: return EchoClient(fd: fd)
        case .connectionReset?: return EchoClient(fd: fd, resetOnArrival: true)
        case let error?: fd.close(); throw error
        }
    }

    /// Sends `text` and waits for it to come back; nil on EOF, reset or timeout.
    func roundTrip(_ text: String, milliseconds: Int32 = TestDeadline.milliseconds) -> String? {
        if resetOnArrival { return nil }
        let bytes = Array(text.utf8)
        guard (try? fd.writeAll(bytes)) != nil else { return nil }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while received.count < bytes.count {
            guard BlockingWait.readable(fd, timeoutMilliseconds: milliseconds) else { return nil }
            guard case .done(let n)? = buffer.withUnsafeMutableBytes({ try? fd.read(into: $0) }), n > 0 else { return nil }
            received += buffer[0..<n]
        }
        return String(decoding: received, as: UTF8.self)
    }

    /// True when the connection was closed (EOF or reset) within the time.
    func isClosed(milliseconds: Int32 = TestDeadline.milliseconds) -> Bool {
        if resetOnArrival { return true }
        guard BlockingWait.readable(fd, timeoutMilliseconds: milliseconds) else { return false }
        var buffer = [UInt8](repeating: 0, count: 16)
        let result = buffer.withUnsafeMutableBytes { try? fd.read(into: $0) }
        if case .done(let n)? = result { return n == 0 }
        return result == nil
    }

    func close() { fd.close() }
}

/// A UDP echo server on its own thread (end-to-end tests).
final class UDPEchoServer: @unchecked Sendable {
    let address: SocketAddress
    private let fd: FileDescriptor
    private let stopped = Atomic<Bool>(false)

    /// Binds 127.0.0.1:`port` (0: any free port).
    init(port: UInt16 = 0) throws {
        fd = try Socket.bindUDP(SocketAddress(ip: .v4(0x7f00_0001), port: port), reusePort: false)
        address = Socket.localAddress(fd)!
        let thread = Thread { [self] in run() }
        thread.start()
    }

    private func run() {
        while !stopped.load(ordering: .relaxed) {
            guard BlockingWait.readable(fd, timeoutMilliseconds: 100) else { continue }
            while case .done(let datagram)? = try? Socket.receiveDatagram(fd), let peer = datagram.peer {
                _ = try? Socket.sendDatagram(fd, datagram.bytes, to: peer)
            }
        }
        fd.close()
    }

    func stop() { stopped.store(true, ordering: .relaxed) }
}

/// Sends `text` to `relay` from a fresh UDP socket and returns the reply, if any.
func udpRoundTrip(_ text: String, via relay: SocketAddress, milliseconds: Int32 = 3000) throws -> String? {
    let fd = try Socket.bindUDP(SocketAddress("127.0.0.1:0")!, reusePort: false)
    defer { fd.close() }
    _ = try Socket.sendDatagram(fd, Array(text.utf8), to: relay)
    guard BlockingWait.readable(fd, timeoutMilliseconds: milliseconds),
          case .done(let reply)? = try? Socket.receiveDatagram(fd), reply.peer == relay else { return nil }
    return String(decoding: reply.bytes, as: UTF8.self)
}
