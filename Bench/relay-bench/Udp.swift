import Glibc
import Synchronization
import SystemLayer

// UDP load: `udpecho` (the target of the round-trip test), `udpflood`
// (packets/s delivered and loss at unlimited offered rate) and `udpping`
// (one datagram in flight, round-trip percentiles).

/// `udpecho --listen HOST:PORT[,...]`: sends every datagram back to its
/// sender, batch in, batch out, on one level-triggered epoll.
func runUDPEcho(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ["listen"])
    let addresses = options.required("listen").split(separator: ",").map { text -> SocketAddress in
        guard let address = SocketAddress(String(text)) else { fail("--listen: not a numeric HOST:PORT: \(text)") }
        return address
    }
    let epoll: Epoll
    do { epoll = try Epoll(batchSize: 64) } catch { fail("epoll: \(error)") }
    var sockets: [FileDescriptor] = []
    for (index, address) in addresses.enumerated() {
        do {
            let fd = try Socket.bindUDP(address, reusePort: false, receiveBuffer: 4 << 20, sendBuffer: 4 << 20)
            try epoll.add(fd, interest: .readable, token: UInt64(index))
            sockets.append(fd)
        } catch {
            fail("udp echo on \(address): \(error)")
        }
    }
    note("udpecho: \(sockets.count) socket(s)")
    let rx = DatagramBatch(capacity: 64, bufferSize: 2048)
    let tx = DatagramBatch(capacity: 64, bufferSize: 0)
    while true {
        do {
            _ = try epoll.wait(timeoutMilliseconds: -1) { token, _ in
                let fd = sockets[Int(token)]
                for _ in 0..<16 {
                    guard case .done(let count)? = try? rx.receive(on: fd) else { return }
                    tx.reset()
                    for i in 0..<count { _ = tx.append(from: rx, index: i, to: rx.peer(i), source: nil) }
                    var start = 0
                    while start < count, case .done(let n)? = try? tx.send(on: fd, from: start) { start += max(n, 1) }
                    if count < rx.capacity { return }
                }
            }
        } catch {
            fail("epoll_wait: \(error)")
        }
    }
}

/// What the sink of a flood counted.
private final class SinkCounts: Sendable {
    let datagrams = Atomic<Int>(0)
    let bytes = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
}

/// `udpflood --target HOST:PORT --sink HOST:PORT --size N --duration S`:
/// one thread sends `size`-byte datagrams to `target` as fast as sendmmsg
/// allows; another receives them at `sink` (where the relay forwards to)
/// and counts. Datagrams still in flight 0.3 s after the sender stops count
/// as lost.
func runUDPFlood(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ["target", "sink", "size", "duration", "warmup", "batch", "gso", "sink-netns"])
    let target = options.address("target")
    let sinkAddress = options.address("sink")
    let size = options.int("size", default: 64)
    let duration = options.double("duration", default: 5)
    let warmup = options.double("warmup", default: 0.5)
    let batch = max(1, min(64, options.int("batch", default: 32)))
    // --gso yes: each batch leaves as one UDP GSO send (one trip through the
    // sender's stack); the receiving socket still gets single datagrams.
    var gso = options.string("gso") == "yes"
    guard size <= DatagramBatch.maxPayload else { fail("--size must be at most \(DatagramBatch.maxPayload)") }
    guard duration > 0 else { fail("--duration must be > 0") }

    let sink: FileDescriptor
    let sender: FileDescriptor
    do {
        // --sink-netns NAME: the sink lives behind the relay, in another
        // network namespace (Bench/kernel-bench); this process sends from its own.
        if let namespace = options.string("sink-netns") {
            sink = try SystemThread.inNetworkNamespace(path: "/var/run/netns/\(namespace)") {
                try Socket.bindUDP(sinkAddress, reusePort: false, receiveBuffer: 4 << 20)
            }
        } else {
            sink = try Socket.bindUDP(sinkAddress, reusePort: false, receiveBuffer: 4 << 20)
        }
        sender = try Socket.connectUDP(to: target, sendBuffer: 4 << 20)
    } catch {
        fail("udpflood sockets: \(error)")
    }
    let counts = SinkCounts()
    let sinkThread: ThreadHandle
    do {
        sinkThread = try SystemThread.spawn(name: "udpflood-sink") {
            let rx = DatagramBatch(capacity: 64, bufferSize: max(size, 1) + 64)
            while true {
                if BlockingWait.readable(sink, timeoutMilliseconds: 20) {
                    while case .done(let n)? = try? rx.receive(on: sink) {
                        var bytes = 0
                        for i in 0..<n { bytes += rx.length(i) }
                        counts.datagrams.wrappingAdd(n, ordering: .relaxed)
                        counts.bytes.wrappingAdd(bytes, ordering: .relaxed)
                    }
                } else if counts.stop.load(ordering: .relaxed) {
                    return
                }
            }
        }
    } catch {
        fail("cannot start the sink thread: \(error)")
    }

    let payload = makePayload(size)
    let tx = DatagramBatch(capacity: batch, bufferSize: 0)
    func send(until deadline: UInt64) -> (sent: Int, errors: ErrorTally) {
        var sent = 0
        var errors = ErrorTally()
        let slice = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(payload)[0..<size])
        while nowNs() < deadline {
            tx.reset()
            for _ in 0..<batch { _ = tx.append(buffer: slice) }
            var start = 0
            while start < batch {
                do {
                    switch try tx.sendFlow(on: sender, from: start, gso: &gso) {
                    case .done(let n):
                        sent += n
                        start += max(n, 1)
                    case .wouldBlock:
                        BlockingWait.writable(sender, timeoutMilliseconds: 10)
                        start = batch
                    }
                } catch {
                    // ECONNREFUSED: an ICMP unreachable came back (no relay yet).
                    errors.add("\(error)")
                    start = batch
                }
            }
        }
        return (sent, errors)
    }
    note("udpflood: \(target) -> sink \(sinkAddress), \(size) B, batches of \(batch)\(gso ? " (GSO)" : ""), warmup \(warmup) s, \(duration) s measured")
    // Warm-up: the relay opens its flow; then counting starts from zero.
    let warm = send(until: nowNs() + UInt64(warmup * 1e9))
    BlockingWait.sleep(milliseconds: 300)
    let warmReceived = counts.datagrams.load(ordering: .relaxed)
    let warmBytes = counts.bytes.load(ordering: .relaxed)
    let begin = nowNs()
    let measured = send(until: begin + UInt64(duration * 1e9))
    let elapsed = Double(nowNs() - begin) / 1e9
    BlockingWait.sleep(milliseconds: 300)
    counts.stop.store(true, ordering: .relaxed)
    sinkThread.join()
    let received = counts.datagrams.load(ordering: .relaxed) - warmReceived
    let bytes = counts.bytes.load(ordering: .relaxed) - warmBytes
    let loss = measured.sent > 0 ? max(0, 100 * (1 - Double(received) / Double(measured.sent))) : 100
    var errors = warm.errors
    errors.merge(measured.errors)
    print("delivered_pps=\(fixed(Double(received) / elapsed, 0)) sent_pps=\(fixed(Double(measured.sent) / elapsed, 0)) "
        + "loss_pct=\(fixed(loss, 2)) delivered_mbps=\(fixed(Double(bytes) * 8 / elapsed / 1e6, 1)) sent=\(measured.sent) "
        + "received=\(received) warmup_sent=\(warm.sent) warmup_received=\(warmReceived) errors=\(errors.total) "
        + "error_kinds=\(errors.summary) gso=\(gso ? "yes" : "no") size=\(size) duration_s=\(fixed(elapsed, 2))")
    exit(received > 0 ? 0 : 1)
}

/// `udpping --target HOST:PORT --size N --duration S`: one datagram in
/// flight; each reply is checked and its round trip recorded. A datagram
/// unanswered within `--timeout` ms counts as lost and the next one goes.
func runUDPPing(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ["target", "size", "duration", "warmup", "timeout"])
    let target = options.address("target")
    let size = max(8, options.int("size", default: 64))
    let duration = options.double("duration", default: 5)
    let warmup = options.double("warmup", default: 0.5)
    let timeout = Int32(options.int("timeout", default: 1000))
    guard size <= DatagramBatch.maxPayload else { fail("--size must be at most \(DatagramBatch.maxPayload)") }
    let fd: FileDescriptor
    do { fd = try Socket.connectUDP(to: target) } catch { fail("udpping socket: \(error)") }
    var message = [UInt8](repeating: 0, count: size)
    for i in 8..<size { message[i] = payloadByte(i) }
    var latencies: [UInt32] = []
    latencies.reserveCapacity(1 << 20)
    var lost = 0, wrong = 0
    var sequence: UInt64 = 0
    note("udpping: \(target), \(size) B, warmup \(warmup) s, \(duration) s measured")
    let measureFrom = nowNs() + UInt64(warmup * 1e9)
    let end = measureFrom + UInt64(duration * 1e9)
    while true {
        let start = nowNs()
        if start >= end { break }
        sequence &+= 1
        withUnsafeBytes(of: sequence.littleEndian) { for i in 0..<8 { message[i] = $0[i] } }
        guard case .done? = try? Socket.sendDatagram(fd, message, to: nil) else {
            lost += start >= measureFrom ? 1 : 0
            BlockingWait.sleep(milliseconds: 1)
            continue
        }
        var answered = false
        while BlockingWait.readable(fd, timeoutMilliseconds: timeout) {
            guard case .done(let reply)? = try? Socket.receiveDatagram(fd, max: size + 64) else { break }
            if reply.bytes == message {
                answered = true
                break
            }
            wrong += 1  // a late reply to an earlier datagram: wait on
        }
        let now = nowNs()
        guard start >= measureFrom else { continue }
        if answered {
            latencies.append(UInt32(min((now - start) / 1000, UInt64(UInt32.max))))
        } else {
            lost += 1
        }
    }
    latencies.sort()
    let mean = latencies.isEmpty ? 0 : Double(latencies.reduce(0) { $0 + UInt64($1) }) / Double(latencies.count)
    print("rtt_p50_us=\(percentile(latencies, 50)) rtt_p99_us=\(percentile(latencies, 99)) rtt_p999_us=\(percentile(latencies, 99.9)) "
        + "rtt_mean_us=\(fixed(mean, 1)) round_trips=\(latencies.count) lost=\(lost) late=\(wrong) size=\(size) duration_s=\(fixed(duration, 2))")
    exit(latencies.isEmpty ? 1 : 0)
}
