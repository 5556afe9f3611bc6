import EventLoop
import Foundation
import Synchronization
import SystemLayer
import TestSupport

/// A UDP echo server on its own thread: sends every datagram back to its
/// sender and remembers who sent (to check source ports).
final class DatagramEchoServer: @unchecked Sendable {
    let address: SocketAddress
    private let fd: FileDescriptor
    private let stopped = Atomic<Bool>(false)
    private let finished = DoneSignal()
    private let seen = Mutex<[SocketAddress: Int]>([:])

    init(port: UInt16 = 0) throws {
        fd = try Socket.bindUDP(SocketAddress(ip: .v4(0x7f00_0001), port: port), reusePort: false,
                                receiveBuffer: 4 << 20, sendBuffer: 4 << 20)
        address = Socket.localAddress(fd)!
        let thread = Thread { [self] in run() }
        thread.start()
    }

    private func run() {
        defer { finished.signal() }
        while !stopped.load(ordering: .relaxed) {
            guard BlockingWait.readable(fd, timeoutMilliseconds: 50) else { continue }
            while case .done(let datagram)? = try? Socket.receiveDatagram(fd) {
                guard let peer = datagram.peer else { continue }
                seen.withLock { $0[peer, default: 0] += 1 }
                _ = try? Socket.sendDatagram(fd, datagram.bytes, to: peer)
            }
        }
    }

    /// Senders seen so far and how many datagrams each sent.
    var senders: [SocketAddress: Int] { seen.withLock { $0 } }

    func stop() {
        stopped.store(true, ordering: .relaxed)
        finished.wait()
        fd.close()
    }
}

/// A test UDP client bound to an ephemeral loopback port.
struct DatagramClient {
    let fd: FileDescriptor

    init() throws {
        fd = try Socket.bindUDP(SocketAddress("127.0.0.1:0")!, reusePort: false, receiveBuffer: 4 << 20)
    }

    var address: SocketAddress { Socket.localAddress(fd)! }

    func send(_ bytes: [UInt8], to destination: SocketAddress) throws {
        while true {
            switch try Socket.sendDatagram(fd, bytes, to: destination) {
            case .done: return
            case .wouldBlock: BlockingWait.writable(fd, timeoutMilliseconds: 100)
            }
        }
    }

    /// The next datagram within `milliseconds`, or nil.
    func receive(milliseconds: Int32 = TestDeadline.milliseconds) -> ReceivedDatagram? {
        guard BlockingWait.readable(fd, timeoutMilliseconds: milliseconds) else { return nil }
        guard case .done(let datagram)? = try? Socket.receiveDatagram(fd) else { return nil }
        return datagram
    }

    /// Sends `bytes` and waits for them to come back through the relay.
    func echo(_ bytes: [UInt8], via relay: SocketAddress, milliseconds: Int32 = TestDeadline.milliseconds) throws -> Bool {
        try send(bytes, to: relay)
        guard let reply = receive(milliseconds: milliseconds) else { return false }
        return reply.bytes == bytes && reply.peer == relay
    }

    func close() { fd.close() }
}

/// Milliseconds left until `deadline` (monotonic nanoseconds), at least 0.
func remainingMilliseconds(until deadline: UInt64) -> Int32 {
    let now = MonotonicClock.nowNanoseconds
    return now >= deadline ? 0 : Int32((deadline - now) / 1_000_000)
}

