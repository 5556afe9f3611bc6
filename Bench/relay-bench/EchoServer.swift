import Glibc
import SystemLayer

/// `echo --listen HOST:PORT[,HOST:PORT...]`: a single-threaded, level-triggered
/// epoll echo server. It writes back whatever it reads; when the peer's
/// window is full it keeps the rest and stops reading until it is flushed.
/// Several listen addresses let every proxy under test use its own target
/// port, so TIME_WAIT entries left by one run never collide with the next.
final class EchoServer {
    private struct Connection {
        var generation: UInt32 = 0
        var open = false
        /// Bytes read but not yet written back (only after a short write).
        var pending: [UInt8] = []
    }

    private static let listenerFlag: UInt64 = 1 << 63

    private let epoll: Epoll
    private let listeners: [FileDescriptor]
    private let capacity: Int
    private let connections: UnsafeMutablePointer<Connection>
    private let buffer: UnsafeMutableRawBufferPointer
    private var generation: UInt32 = 0
    private var openCount = 0
    private var acceptedTotal = 0
    private var warnedAcceptError = false

    init(addresses: [SocketAddress]) {
        do { epoll = try Epoll(batchSize: 256) } catch { fail("epoll: \(error)") }
        var opened: [FileDescriptor] = []
        for address in addresses {
            do { opened.append(try Socket.listen(on: address, reusePort: false, backlog: 4096)) } catch { fail("\(error)") }
        }
        listeners = opened
        capacity = max(ProcessResources.openFilesLimit, 1024) + 16
        connections = .allocate(capacity: capacity)
        connections.initialize(repeating: Connection(), count: capacity)
        buffer = .allocate(byteCount: 64 * 1024, alignment: 16)
        for (index, listener) in listeners.enumerated() {
            do { try epoll.add(listener, interest: .readable, token: EchoServer.listenerFlag | UInt64(index)) } catch { fail("epoll_ctl: \(error)") }
        }
    }

    func run() -> Never {
        note("echo: listening on \(listeners.count) address(es), descriptor limit \(ProcessResources.openFilesLimit)")
        while true {
            do {
                _ = try epoll.wait(timeoutMilliseconds: -1) { token, events in
                    if token & EchoServer.listenerFlag != 0 {
                        acceptAll(listeners[Int(token & 0xffff)])
                    } else {
                        handle(fd: Int32(truncatingIfNeeded: token & 0xffff_ffff), generation: UInt32(token >> 32), events: events)
                    }
                }
            } catch {
                fail("epoll_wait: \(error)")
            }
        }
    }

    private func acceptAll(_ listener: FileDescriptor) {
        for _ in 0..<256 {
            let result: IOResult<AcceptedConnection>
            do { result = try Socket.accept(listener) } catch {
                if !warnedAcceptError {
                    note("echo: accept failed: \(error) (open connections: \(openCount))")
                    warnedAcceptError = true
                }
                if error.isDescriptorExhaustion { BlockingWait.sleep(milliseconds: 1) }
                return
            }
            guard case .done(let connection) = result else { return }
            let fd = connection.fd.rawValue
            guard Int(fd) < capacity else { connection.fd.close(); continue }
            generation &+= 1
            connections[Int(fd)] = Connection(generation: generation, open: true, pending: [])
            Socket.setNoDelay(connection.fd)
            openCount += 1
            acceptedTotal += 1
            do {
                try epoll.add(connection.fd, interest: .readable, token: makeToken(index: Int(fd), generation: generation))
            } catch {
                close(fd)
                continue
            }
        }
    }

    private func handle(fd: Int32, generation: UInt32, events: EpollEvents) {
        let index = Int(fd)
        guard index >= 0, index < capacity, connections[index].open, connections[index].generation == generation else { return }
        if !connections[index].pending.isEmpty {
            flush(fd)
            return
        }
        echo(fd)
    }

    private func echo(_ fd: Int32) {
        let descriptor = FileDescriptor(rawValue: fd)
        for _ in 0..<4 {
            let result: IOResult<Int>
            do { result = try descriptor.read(into: buffer) } catch { close(fd); return }
            guard case .done(let count) = result else { return }
            if count == 0 { close(fd); return }
            var offset = 0
            while offset < count {
                let written: IOResult<Int>
                do { written = try descriptor.write(UnsafeRawBufferPointer(rebasing: buffer[offset..<count])) } catch { close(fd); return }
                switch written {
                case .done(let n):
                    offset += n
                case .wouldBlock:
                    connections[Int(fd)].pending = Array(buffer[offset..<count])
                    try? epoll.modify(descriptor, interest: .writable, token: makeToken(index: Int(fd), generation: connections[Int(fd)].generation))
                    return
                }
            }
            if count < buffer.count { return }
        }
    }

    private func flush(_ fd: Int32) {
        let descriptor = FileDescriptor(rawValue: fd)
        var pending = connections[Int(fd)].pending
        connections[Int(fd)].pending = []
        var offset = 0
        while offset < pending.count {
            let written: IOResult<Int>
            do {
                written = try pending.withUnsafeBytes { raw throws(Errno) in
                    try descriptor.write(UnsafeRawBufferPointer(rebasing: raw[offset...]))
                }
            } catch { close(fd); return }
            switch written {
            case .done(let n):
                offset += n
            case .wouldBlock:
                pending.removeFirst(offset)
                connections[Int(fd)].pending = pending
                return
            }
        }
        try? epoll.modify(descriptor, interest: .readable, token: makeToken(index: Int(fd), generation: connections[Int(fd)].generation))
    }

    private func close(_ fd: Int32) {
        connections[Int(fd)].open = false
        connections[Int(fd)].pending = []
        openCount -= 1
        closeRaw(fd)
    }
}

func runEcho(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ["listen"])
    let addresses = options.required("listen").split(separator: ",").map { text -> SocketAddress in
        guard let address = SocketAddress(String(text)) else { fail("--listen: not a numeric HOST:PORT: \(text)") }
        return address
    }
    EchoServer(addresses: addresses).run()
}
