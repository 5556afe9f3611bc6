import EventLoop
import Synchronization
import SystemLayer

/// A target server for relay tests, on its own event loop: it reads a
/// `PayloadHeader`, then checks every byte the client sends against the
/// header's stream until EOF, while sending its own stream of `downLength`
/// bytes and then a FIN. Each half closes on its own, so both half-close
/// orders happen. Results are recorded by the header's index.
final class PayloadServer: @unchecked Sendable {
    struct Result: Equatable, Sendable {
        var received: UInt64
        var intact: Bool
    }

    let address: SocketAddress
    private let group: EventLoopGroup
    private let listener: FileDescriptor
    private let results = Mutex<[UInt64: Result]>([:])
    private let accepted = Atomic<Int>(0)

    init() throws {
        let fd = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        listener = fd
        address = Socket.localAddress(fd)!
        group = try EventLoopGroup(count: 1, name: "payload")
        let acceptor = Acceptor(server: self)
        let loop = group.loops[0]
        let done = DoneSignal()
        loop.execute { loop in
            try! loop.register(fd, interest: [.readable], handler: acceptor)
            done.signal()
        }
        done.wait()
    }

    var acceptedCount: Int { accepted.load(ordering: .relaxed) }

    func result(_ index: UInt64) -> Result? { results.withLock { $0[index] } }
    var resultCount: Int { results.withLock { $0.count } }

    func stop() {
        group.shutdown()
        listener.close()
    }

    fileprivate func record(_ index: UInt64, _ result: Result) { results.withLock { $0[index] = result } }
    fileprivate func countAccept() { accepted.wrappingAdd(1, ordering: .relaxed) }

    private final class Acceptor: EventHandler, @unchecked Sendable {
        unowned let server: PayloadServer
        init(server: PayloadServer) { self.server = server }

        func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop) {
            while case .done(let conn)? = try? Socket.accept(fd) {
                server.countAccept()
                let handler = Connection(fd: conn.fd, server: server)
                try? loop.register(conn.fd, interest: [.readable, .writable, .readHangUp, .edgeTriggered], handler: handler)
            }
        }
    }

    private final class Connection: EventHandler {
        let fd: FileDescriptor
        unowned let server: PayloadServer
        var header: [UInt8] = []
        var parsed: PayloadHeader?
        var up = PayloadStream(seed: 0)
        var down = PayloadStream(seed: 0)
        var received: UInt64 = 0
        var intact = true
        var sent: UInt64 = 0
        var readDone = false
        var writeDone = false
        var closed = false
        var pending: [UInt8] = []
        var pendingOffset = 0

        init(fd: FileDescriptor, server: PayloadServer) {
            self.fd = fd
            self.server = server
        }

        func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop) {
            guard !closed else { return }
            readSide(loop: loop)
            if !closed { writeSide(loop: loop) }
        }

        private func readSide(loop: EventLoop) {
            var buffer = [UInt8](repeating: 0, count: 65536)
            while !readDone {
                let result = buffer.withUnsafeMutableBytes { try? fd.read(into: $0) }
                switch result {
                case .done(0)?:
                    readDone = true
                    if let h = parsed { server.record(h.index, Result(received: received, intact: intact && received == h.upLength)) }
                case .done(let n)?:
                    var start = 0
                    if parsed == nil {
                        let take = min(PayloadHeader.size - header.count, n)
                        header.append(contentsOf: buffer[0..<take])
                        start = take
                        if header.count == PayloadHeader.size {
                            let h = PayloadHeader(header)
                            parsed = h
                            up = PayloadStream(seed: h.upSeed)
                            down = PayloadStream(seed: h.downSeed)
                        }
                    }
                    if start < n {
                        received += UInt64(n - start)
                        let ok = buffer.withUnsafeBytes { up.matches(UnsafeRawBufferPointer(rebasing: $0[start..<n])) }
                        intact = intact && ok
                    }
                case .wouldBlock?:
                    return
                case nil:
                    // Reset by the peer.
                    if let h = parsed { server.record(h.index, Result(received: received, intact: false)) }
                    close(loop: loop)
                    return
                }
            }
            finishIfDone(loop: loop)
        }

        private func writeSide(loop: EventLoop) {
            guard let h = parsed, !writeDone else { return finishIfDone(loop: loop) }
            while true {
                if pendingOffset == pending.count {
                    let remaining = h.downLength - sent
                    if remaining == 0 {
                        writeDone = true
                        Socket.shutdownWrite(fd)
                        break
                    }
                    let count = Int(min(remaining, 65536))
                    pending = [UInt8](repeating: 0, count: count)
                    pending.withUnsafeMutableBytes { down.fill($0) }
                    pendingOffset = 0
                    sent += UInt64(count)
                }
                let result = pending.withUnsafeBytes { raw in
                    try? fd.write(UnsafeRawBufferPointer(rebasing: raw[pendingOffset...]))
                }
                switch result {
                case .done(let n)?: pendingOffset += n
                case .wouldBlock?: return
                case nil: return close(loop: loop)
                }
            }
            finishIfDone(loop: loop)
        }

        private func finishIfDone(loop: EventLoop) {
            if readDone && writeDone { close(loop: loop) }
        }

        private func close(loop: EventLoop) {
            guard !closed else { return }
            closed = true
            loop.deregister(fd)
            fd.close()
        }
    }
}
