import SystemLayer

/// Drives many test clients on the calling thread with one epoll: each
/// connects, sends a header and `upLength` bytes of its stream, half-closes,
/// and checks the `downLength` bytes that come back, byte for byte.
struct ClientPlan {
    var upLength: UInt64
    var downLength: UInt64
    var seed: UInt64
}

struct ClientOutcome: Equatable {
    var connected = false
    var received: UInt64 = 0
    var intact = true
    var finished = false
    var error: Errno?
}

final class ClientDriver {
    private final class Client {
        let index: Int
        let fd: FileDescriptor
        let header: PayloadHeader
        var outgoing: [UInt8]
        var outgoingOffset = 0
        var up: PayloadStream
        var down: PayloadStream
        var sentBody: UInt64 = 0
        var writeDone = false
        var readDone = false
        var outcome = ClientOutcome()

        init(index: Int, fd: FileDescriptor, header: PayloadHeader) {
            self.index = index
            self.fd = fd
            self.header = header
            outgoing = header.bytes
            up = PayloadStream(seed: header.upSeed)
            down = PayloadStream(seed: header.downSeed)
        }
    }

    /// Runs every plan to the end or until `timeoutSeconds`.
    /// - Parameters:
    ///   - gate: consulted once every client is connected and has sent its
    ///     header; bodies are sent only once it returns true (used to prove
    ///     that all connections are open through the relay at once).
    static func run(_ plans: [ClientPlan], to target: SocketAddress, timeoutSeconds: Double = 60,
                    gate: (() -> Bool)? = nil) throws -> [ClientOutcome] {
        let epoll = try Epoll()
        var clients: [Client] = []
        for (i, plan) in plans.enumerated() {
            let fd = try Socket.makeTCP(family: target.family)
            let client = Client(index: i, fd: fd, header: PayloadHeader(index: UInt64(i), seed: plan.seed,
                                                                          upLength: plan.upLength, downLength: plan.downLength))
            clients.append(client)
            do throws(Errno) {
                _ = try Socket.connect(fd, to: target)
            } catch {
                client.outcome.error = error
                client.outcome.finished = true
                continue
            }
            try epoll.add(fd, interest: [.readable, .writable, .readHangUp, .edgeTriggered], token: UInt64(i))
        }
        var opened = gate == nil
        let deadline = MonotonicClock.nowNanoseconds + UInt64(timeoutSeconds * 1e9)
        var buffer = [UInt8](repeating: 0, count: 65536)
        var ready = Set<Int>()
        while clients.contains(where: { !$0.outcome.finished }) && MonotonicClock.nowNanoseconds < deadline {
            if !opened, clients.allSatisfy({ $0.outcome.connected || $0.outcome.finished }),
               clients.allSatisfy({ $0.outgoingOffset >= PayloadHeader.size || $0.outcome.finished }) {
                if gate!() {
                    opened = true
                    for client in clients where !client.outcome.finished { ready.insert(client.index) }
                }
            }
            _ = try epoll.wait(timeoutMilliseconds: 20) { token, _ in ready.insert(Int(token)) }
            for index in ready {
                let client = clients[index]
                if client.outcome.finished { continue }
                if !client.outcome.connected {
                    if let error = Socket.pendingError(client.fd) {
                        client.outcome.error = error
                        client.outcome.finished = true
                        continue
                    }
                    client.outcome.connected = true
                }
                pumpWrite(client, bodyAllowed: opened)
                if !client.outcome.finished && !client.readDone { pumpRead(client, &buffer) }
                if client.readDone && client.writeDone { client.outcome.finished = true }
            }
            ready.removeAll(keepingCapacity: true)
        }
        for client in clients { client.fd.close() }
        return clients.map(\.outcome)
    }

    private static func pumpWrite(_ client: Client, bodyAllowed: Bool) {
        while !client.writeDone && !client.outcome.finished {
            if client.outgoingOffset == client.outgoing.count {
                guard bodyAllowed else { return }
                let remaining = client.header.upLength - client.sentBody
                if remaining == 0 {
                    client.writeDone = true
                    Socket.shutdownWrite(client.fd)
                    return
                }
                let count = Int(min(remaining, UInt64(1 + Int.random(in: 0..<65536))))
                client.outgoing = [UInt8](repeating: 0, count: count)
                client.outgoing.withUnsafeMutableBytes { client.up.fill($0) }
                client.outgoingOffset = 0
                client.sentBody += UInt64(count)
            }
            let result: IOResult<Int>
            do {
                result = try client.outgoing.withUnsafeBytes { raw in
                    try client.fd.write(UnsafeRawBufferPointer(rebasing: raw[client.outgoingOffset...]))
                }
            } catch {
                client.outcome.error = error as? Errno
                client.outcome.finished = true
                return
            }
            guard case .done(let n) = result else { return }
            client.outgoingOffset += n
        }
    }

    private static func pumpRead(_ client: Client, _ buffer: inout [UInt8]) {
        while true {
            let result: IOResult<Int>
            do {
                result = try buffer.withUnsafeMutableBytes { raw in try client.fd.read(into: raw) }
            } catch {
                client.outcome.error = error as? Errno
                client.outcome.finished = true
                return
            }
            switch result {
            case .wouldBlock:
                return
            case .done(0):
                if client.outcome.received != client.header.downLength { client.outcome.intact = false }
                // The server's half is closed; ours may still be sending (a half-close).
                client.readDone = true
                return
            case .done(let n):
                client.outcome.received += UInt64(n)
                let ok = buffer.withUnsafeBytes { client.down.matches(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                if !ok { client.outcome.intact = false }
            }
        }
    }
}
