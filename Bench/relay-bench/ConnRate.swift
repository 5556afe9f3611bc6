import Glibc
import SystemLayer

/// What one connection-rate worker measured.
struct ConnRateResult: Sendable {
    var completed = 0
    var latenciesMicroseconds: [UInt32] = []
    var errors = ErrorTally()
}

/// `connrate`: `concurrency` slots on one epoll; each slot repeatedly connects,
/// sends `size` bytes, reads them back (checking every byte), and closes.
/// Latency runs from just before connect(2) to the last byte received.
final class ConnRateWorker {
    private enum State: UInt8 { case idle, connecting, sending, receiving }

    private struct Slot {
        var fd: Int32 = -1
        var generation: UInt32 = 0
        var state: State = .idle
        var startedAt: UInt64 = 0
        var sent = 0
        var received = 0
        var retryAt: UInt64 = 0
    }

    private let epoll: Epoll
    private let target: SocketAddress
    private let size: Int
    private let payload: UnsafeMutableRawBufferPointer
    private let scratch: UnsafeMutableRawBufferPointer
    private var slots: [Slot]
    private var generation: UInt32 = 0
    private var result = ConnRateResult()
    private var measureFrom: UInt64 = 0
    private var measureUntil: UInt64 = 0
    private var idleSlots = 0
    private let timeoutNs: UInt64

    init(target: SocketAddress, concurrency: Int, size: Int, timeoutSeconds: Double) {
        do { epoll = try Epoll(batchSize: 256) } catch { fail("epoll: \(error)") }
        self.target = target
        self.size = size
        payload = makePayload(size)
        scratch = .allocate(byteCount: max(size, 64 * 1024), alignment: 16)
        slots = Array(repeating: Slot(), count: concurrency)
        timeoutNs = UInt64(timeoutSeconds * 1e9)
        result.latenciesMicroseconds.reserveCapacity(1 << 18)
    }

    /// Runs for `warmup` seconds unmeasured, then `duration` seconds measured.
    func run(warmup: Double, duration: Double) -> ConnRateResult {
        let begin = nowNs()
        measureFrom = begin + UInt64(warmup * 1e9)
        measureUntil = measureFrom + UInt64(duration * 1e9)
        for index in slots.indices { start(index, now: begin) }
        var lastScan = begin
        while true {
            let now = nowNs()
            if now >= measureUntil { break }
            if now &- lastScan >= 10_000_000 || idleSlots > 0 && now &- lastScan >= 1_000_000 {
                scan(now: now)
                lastScan = now
            }
            let remainingMs = Int32(min(10, max(1, (measureUntil - now) / 1_000_000)))
            do {
                _ = try epoll.wait(timeoutMilliseconds: idleSlots > 0 ? 1 : remainingMs) { token, events in
                    handle(token: token, events: events)
                }
            } catch {
                fail("epoll_wait: \(error)")
            }
        }
        for index in slots.indices where slots[index].fd >= 0 {
            closeRaw(slots[index].fd)
            slots[index].fd = -1
        }
        return result
    }

    private func start(_ index: Int, now: UInt64) {
        generation &+= 1
        slots[index].generation = generation
        slots[index].sent = 0
        slots[index].received = 0
        let fd: FileDescriptor
        do { fd = try Socket.makeTCP(family: target.family) } catch {
            failSlot(index, "socket-\(error.symbol)", now: now)
            return
        }
        Socket.setNoDelay(fd)
        slots[index].fd = fd.rawValue
        slots[index].startedAt = nowNs()
        do {
            _ = try Socket.connect(fd, to: target)
        } catch {
            failSlot(index, "connect-\(error.symbol)", now: now)
            return
        }
        slots[index].state = .connecting
        do {
            try epoll.add(fd, interest: .writable, token: makeToken(index: index, generation: generation))
        } catch {
            failSlot(index, "epoll-\(error.symbol)", now: now)
        }
    }

    /// Counts an error (if inside the measured window), closes the slot's socket, and retries after 1 ms.
    private func failSlot(_ index: Int, _ kind: String, now: UInt64) {
        if now >= measureFrom && now < measureUntil { result.errors.add(kind) }
        if slots[index].fd >= 0 { closeRaw(slots[index].fd) }
        slots[index].fd = -1
        slots[index].state = .idle
        slots[index].retryAt = now + 1_000_000
        idleSlots += 1
    }

    private func scan(now: UInt64) {
        for index in slots.indices {
            switch slots[index].state {
            case .idle:
                if now >= slots[index].retryAt {
                    idleSlots -= 1
                    start(index, now: now)
                }
            default:
                if now &- slots[index].startedAt > timeoutNs { failSlot(index, "timeout", now: now) }
            }
        }
    }

    private func handle(token: UInt64, events: EpollEvents) {
        let index = Int(token & 0xffff_ffff)
        guard index < slots.count, slots[index].generation == UInt32(token >> 32), slots[index].fd >= 0 else { return }
        switch slots[index].state {
        case .idle:
            return
        case .connecting:
            if let error = Socket.pendingError(FileDescriptor(rawValue: slots[index].fd)) {
                failSlot(index, "connect-\(error.symbol)", now: nowNs())
                return
            }
            slots[index].state = .sending
            send(index)
        case .sending:
            // Full duplex: echoed bytes are read while the rest is still being sent,
            // so that payloads larger than the socket buffers cannot deadlock.
            if events.contains(.readable) || events.contains(.hangUp) || events.contains(.error) {
                receive(index)
                guard slots[index].fd >= 0, slots[index].generation == UInt32(token >> 32), slots[index].state == .sending else { return }
            }
            if events.contains(.writable) { send(index) }
        case .receiving:
            receive(index)
        }
    }

    private func send(_ index: Int) {
        let fd = FileDescriptor(rawValue: slots[index].fd)
        let token = makeToken(index: index, generation: slots[index].generation)
        while slots[index].sent < size {
            let written: IOResult<Int>
            do { written = try fd.write(UnsafeRawBufferPointer(rebasing: payload[slots[index].sent..<size])) } catch {
                failSlot(index, "send-\(error.symbol)", now: nowNs())
                return
            }
            guard case .done(let n) = written else {
                // Socket buffer full: wait for room, and read the echo meanwhile.
                do { try epoll.modify(fd, interest: [.readable, .writable], token: token) } catch {
                    failSlot(index, "epoll-\(error.symbol)", now: nowNs())
                }
                return
            }
            slots[index].sent += n
        }
        slots[index].state = .receiving
        do {
            try epoll.modify(fd, interest: .readable, token: token)
        } catch {
            failSlot(index, "epoll-\(error.symbol)", now: nowNs())
        }
    }

    private func receive(_ index: Int) {
        let fd = FileDescriptor(rawValue: slots[index].fd)
        while true {
            let read: IOResult<Int>
            do { read = try fd.read(into: scratch) } catch {
                failSlot(index, "recv-\(error.symbol)", now: nowNs())
                return
            }
            guard case .done(let n) = read else { return }
            if n == 0 {
                failSlot(index, "eof-after-\(slots[index].received)", now: nowNs())
                return
            }
            let base = slots[index].received
            if base + n > size {
                failSlot(index, "too-many-bytes", now: nowNs())
                return
            }
            for i in 0..<n where scratch[i] != payloadByte(base + i) {
                failSlot(index, "wrong-bytes", now: nowNs())
                return
            }
            slots[index].received = base + n
            if slots[index].received == size { break }
        }
        guard slots[index].received == size else { return }
        let now = nowNs()
        if now >= measureFrom && now < measureUntil {
            result.completed += 1
            let micros = (now &- slots[index].startedAt) / 1000
            result.latenciesMicroseconds.append(UInt32(min(micros, UInt64(UInt32.max))))
        }
        closeRaw(slots[index].fd)
        slots[index].fd = -1
        start(index, now: now)
    }
}

/// Holds each worker thread's result until the threads are joined.
private final class ResultBoard: @unchecked Sendable {
    /// One element per thread; each thread writes only its own.
    let results: UnsafeMutablePointer<ConnRateResult>
    let count: Int
    init(count: Int) {
        self.count = count
        results = .allocate(capacity: count)
        results.initialize(repeating: ConnRateResult(), count: count)
    }
}

func runConnRate(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ["target", "concurrency", "duration", "size", "threads", "warmup", "timeout"])
    let target = options.address("target")
    let concurrency = max(1, options.int("concurrency", default: 64))
    let duration = options.double("duration", default: 10)
    let size = max(1, options.int("size", default: 64))
    let threads = max(1, min(concurrency, options.int("threads", default: 1)))
    let warmup = options.double("warmup", default: 0.5)
    let timeout = options.double("timeout", default: 10)
    guard duration > 0 else { fail("--duration must be > 0") }
    ignoreSigpipe()
    note("connrate: target \(target), concurrency \(concurrency), \(size) B, \(threads) thread(s), warmup \(warmup) s, \(duration) s measured")

    let board = ResultBoard(count: threads)
    var handles: [ThreadHandle] = []
    for t in 0..<threads {
        let share = concurrency / threads + (t < concurrency % threads ? 1 : 0)
        do {
            handles.append(try SystemThread.spawn(name: "connrate-\(t)") {
                let worker = ConnRateWorker(target: target, concurrency: share, size: size, timeoutSeconds: timeout)
                board.results[t] = worker.run(warmup: warmup, duration: duration)
            })
        } catch {
            fail("cannot start thread: \(error)")
        }
    }
    for handle in handles { handle.join() }

    var total = ConnRateResult()
    for r in UnsafeBufferPointer(start: board.results, count: board.count) {
        total.completed += r.completed
        total.latenciesMicroseconds += r.latenciesMicroseconds
        total.errors.merge(r.errors)
    }
    total.latenciesMicroseconds.sort()
    let lat = total.latenciesMicroseconds
    let mean = lat.isEmpty ? 0 : Double(lat.reduce(0) { $0 + UInt64($1) }) / Double(lat.count)
    if total.errors.total > 0 { note("connrate: errors \(total.errors.summary)") }
    print("conns_per_s=\(fixed(Double(total.completed) / duration, 1)) p50_us=\(percentile(lat, 50)) p99_us=\(percentile(lat, 99)) "
        + "p999_us=\(percentile(lat, 99.9)) mean_us=\(fixed(mean, 1)) completed=\(total.completed) errors=\(total.errors.total) "
        + "error_kinds=\(total.errors.summary) duration_s=\(fixed(duration, 2)) concurrency=\(concurrency) size=\(size)")
    exit(total.completed > 0 ? 0 : 1)
}
