import Glibc
import SystemLayer

/// `hold`: opens `count` connections with at most `parallel` handshakes in
/// flight, sends a small message on each and waits for its echo (so each one
/// is relayed end to end), then reads the resident memory of the processes
/// under test while every connection sits idle. Afterwards it checks that the
/// held connections still relay (a second echo on each) and closes them.
final class HoldClient {
    private enum State: UInt8 { case waiting, connecting, sending, receiving, held, dropped, failed }

    private struct Slot {
        var fd: Int32 = -1
        var generation: UInt32 = 0
        var state: State = .waiting
        var startedAt: UInt64 = 0
        var sent = 0
        var received = 0
        var attempts = 0
    }

    private let epoll: Epoll
    private let target: SocketAddress
    private let message: UnsafeMutableRawBufferPointer
    private let scratch: UnsafeMutableRawBufferPointer
    private var slots: [Slot]
    private var generation: UInt32 = 0
    private(set) var held = 0
    private(set) var dropped = 0
    private(set) var errors = ErrorTally()
    private var inFlight = 0
    private var verifying = false
    private var answered = 0
    private var queue: [Int] = []
    private var queueHead = 0
    private let attemptTimeoutNs: UInt64 = 10_000_000_000
    private let maxAttempts = 3

    init(target: SocketAddress, count: Int, messageSize: Int) {
        do { epoll = try Epoll(batchSize: 256) } catch { fail("epoll: \(error)") }
        self.target = target
        message = makePayload(messageSize)
        scratch = .allocate(byteCount: 64 * 1024, alignment: 16)
        slots = Array(repeating: Slot(), count: count)
    }

    /// Opens every slot's connection. Returns when all are held or have failed `maxAttempts` times.
    func openAll(parallel: Int, deadlineSeconds: Double) {
        queue = Array(slots.indices)
        queueHead = 0
        exchangeLoop(parallel: parallel, deadlineSeconds: deadlineSeconds, phase: "open") { index in self.connect(index) }
    }

    /// Sends one more message on every held connection and waits for its echo.
    /// - Returns: how many answered.
    func verifyAll(parallel: Int, deadlineSeconds: Double) -> Int {
        queue = slots.indices.filter { slots[$0].state == .held }
        queueHead = 0
        let before = held
        verifying = true
        answered = 0
        exchangeLoop(parallel: parallel, deadlineSeconds: deadlineSeconds, phase: "verify") { index in
            self.slots[index].sent = 0
            self.slots[index].received = 0
            self.slots[index].startedAt = nowNs()
            self.slots[index].state = .sending
            self.inFlight += 1
            self.send(index)
        }
        // Connections that never answered within the deadline are counted as lost.
        for index in slots.indices where slots[index].state == .sending || slots[index].state == .receiving {
            drop(index, "verify-timeout")
        }
        verifying = false
        note("hold: verify: \(answered) of \(before) held connections answered")
        return answered
    }

    /// Processes events for `seconds`, noticing connections the peer closed.
    func idle(seconds: Double) {
        let until = nowNs() + UInt64(seconds * 1e9)
        while nowNs() < until { poll(timeoutMs: 20) }
    }

    func closeAll() {
        for index in slots.indices where slots[index].fd >= 0 {
            closeRaw(slots[index].fd)
            slots[index].fd = -1
        }
    }

    private func exchangeLoop(parallel: Int, deadlineSeconds: Double, phase: String, start: (Int) -> Void) {
        let deadline = nowNs() + UInt64(deadlineSeconds * 1e9)
        var lastScan = nowNs()
        var lastReport = nowNs()
        while true {
            while inFlight < parallel && queueHead < queue.count {
                let index = queue[queueHead]
                queueHead += 1
                start(index)
            }
            if inFlight == 0 && queueHead >= queue.count { break }
            let now = nowNs()
            if now >= deadline {
                note("hold: \(phase): deadline reached with \(inFlight) exchanges in flight and \(queue.count - queueHead) not started")
                break
            }
            poll(timeoutMs: 10)
            if now &- lastScan > 100_000_000 {
                lastScan = now
                for index in slots.indices where slots[index].fd >= 0 {
                    let state = slots[index].state
                    if (state == .connecting || state == .sending || state == .receiving) && now &- slots[index].startedAt > attemptTimeoutNs {
                        attemptFailed(index, "timeout")
                    }
                }
            }
            if now &- lastReport > 2_000_000_000 {
                lastReport = now
                note("hold: \(phase): \(held) held, \(inFlight) in flight, errors \(errors.summary)")
            }
        }
    }

    private func poll(timeoutMs: Int32) {
        do {
            _ = try epoll.wait(timeoutMilliseconds: timeoutMs) { token, events in handle(token: token, events: events) }
        } catch {
            fail("epoll_wait: \(error)")
        }
    }

    private func connect(_ index: Int) {
        generation &+= 1
        slots[index].generation = generation
        slots[index].sent = 0
        slots[index].received = 0
        slots[index].attempts += 1
        slots[index].startedAt = nowNs()
        inFlight += 1
        let fd: FileDescriptor
        do { fd = try Socket.makeTCP(family: target.family) } catch {
            attemptFailed(index, "socket-\(error.symbol)")
            return
        }
        slots[index].fd = fd.rawValue
        slots[index].state = .connecting
        do {
            _ = try Socket.connect(fd, to: target)
            try epoll.add(fd, interest: .writable, token: makeToken(index: index, generation: generation))
        } catch {
            attemptFailed(index, "connect-\(error.symbol)")
        }
    }

    private func handle(token: UInt64, events: EpollEvents) {
        let index = Int(token & 0xffff_ffff)
        guard index < slots.count, slots[index].generation == UInt32(token >> 32), slots[index].fd >= 0 else { return }
        switch slots[index].state {
        case .connecting:
            if let error = Socket.pendingError(FileDescriptor(rawValue: slots[index].fd)) {
                attemptFailed(index, "connect-\(error.symbol)")
                return
            }
            Socket.setNoDelay(FileDescriptor(rawValue: slots[index].fd))
            slots[index].state = .sending
            send(index)
        case .sending:
            send(index)
        case .receiving:
            receive(index)
        case .held:
            // An idle relayed connection should never become readable: this is EOF or a reset.
            var byte: UInt8 = 0
            let n = Glibc.read(slots[index].fd, &byte, 1)
            if n == 0 { drop(index, "closed-by-peer") } else if n < 0 && Errno.current != .wouldBlock { drop(index, "reset-while-idle") }
        case .waiting, .dropped, .failed:
            return
        }
    }

    private func send(_ index: Int) {
        let fd = FileDescriptor(rawValue: slots[index].fd)
        while slots[index].sent < message.count {
            let written: IOResult<Int>
            do { written = try fd.write(UnsafeRawBufferPointer(rebasing: message[slots[index].sent...])) } catch {
                attemptFailed(index, "send-\(error.symbol)")
                return
            }
            guard case .done(let n) = written else {
                try? epoll.modify(fd, interest: .writable, token: makeToken(index: index, generation: slots[index].generation))
                return
            }
            slots[index].sent += n
        }
        slots[index].state = .receiving
        do {
            try epoll.modify(fd, interest: .readable, token: makeToken(index: index, generation: slots[index].generation))
        } catch {
            attemptFailed(index, "epoll-\(error.symbol)")
        }
    }

    private func receive(_ index: Int) {
        let fd = FileDescriptor(rawValue: slots[index].fd)
        while slots[index].received < message.count {
            let read: IOResult<Int>
            do { read = try fd.read(into: UnsafeMutableRawBufferPointer(rebasing: scratch[0..<(message.count - slots[index].received)])) } catch {
                attemptFailed(index, "recv-\(error.symbol)")
                return
            }
            guard case .done(let n) = read else { return }
            if n == 0 {
                attemptFailed(index, "eof-after-\(slots[index].received)")
                return
            }
            let base = slots[index].received
            for i in 0..<n where scratch[i] != payloadByte(base + i) {
                attemptFailed(index, "wrong-bytes")
                return
            }
            slots[index].received += n
        }
        slots[index].state = .held
        inFlight -= 1
        if verifying { answered += 1 } else { held += 1 }
    }

    /// An attempt (connect or exchange) failed: close, and retry the connect unless it is used up.
    private func attemptFailed(_ index: Int, _ kind: String) {
        if verifying {
            drop(index, kind)
            return
        }
        errors.add(kind)
        inFlight -= 1
        if slots[index].fd >= 0 { closeRaw(slots[index].fd) }
        slots[index].fd = -1
        if slots[index].attempts < maxAttempts {
            slots[index].state = .waiting
            queue.append(index)
        } else {
            slots[index].state = .failed
        }
    }

    private func drop(_ index: Int, _ kind: String) {
        errors.add(kind)
        switch slots[index].state {
        case .held:
            held -= 1
        case .sending, .receiving:
            inFlight -= 1
            if verifying { held -= 1 }
        default:
            break
        }
        dropped += 1
        closeRaw(slots[index].fd)
        slots[index].fd = -1
        slots[index].state = .dropped
    }
}

func runHold(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ["target", "count", "pid", "parallel", "message-size", "settle", "verify", "linger", "deadline"])
    let target = options.address("target")
    let count = options.int("count", default: 1000)
    let parallel = max(1, options.int("parallel", default: 32))
    let messageSize = max(1, options.int("message-size", default: 32))
    let settle = options.double("settle", default: 2)
    let verify = options.string("verify") ?? "yes"
    let linger = options.double("linger", default: 0)
    let deadline = options.double("deadline", default: 300)
    let pids: [Int32] = (options.string("pid") ?? "").split(separator: ",").map { text in
        guard let pid = Int32(String(text.filter { $0 != " " })) else { fail("--pid: not a process id: \(text)") }
        return pid
    }
    guard !pids.isEmpty else { fail("--pid PID[,PID...] is required") }
    let limit = ProcessResources.openFilesLimit
    if count + 16 > limit { fail("--count \(count) needs \(count + 16) descriptors; the limit is \(limit)") }
    ignoreSigpipe()

    // Baseline: the processes with no connection from us.
    BlockingWait.sleep(milliseconds: 300)
    let before = summedResidentKiB(pids)
    let fdsBefore = pids.map(openDescriptors(pid:)).reduce(0, +)
    note("hold: target \(target), \(count) connections, \(parallel) in parallel; baseline RSS \(before) KiB, \(fdsBefore) fds in pids \(pids.map(String.init).joined(separator: ","))")

    let client = HoldClient(target: target, count: count, messageSize: messageSize)
    let openStart = nowNs()
    client.openAll(parallel: parallel, deadlineSeconds: deadline)
    let openSeconds = Double(nowNs() - openStart) / 1e9
    note("hold: opened \(client.held) in \(fixed(openSeconds, 2)) s; settling \(settle) s")
    client.idle(seconds: settle)
    let after = summedResidentKiB(pids)
    let fdsAfter = pids.map(openDescriptors(pid:)).reduce(0, +)
    let heldWhileMeasured = client.held
    var alive = heldWhileMeasured
    if verify != "no" { alive = client.verifyAll(parallel: parallel, deadlineSeconds: 60) }
    if linger > 0 { client.idle(seconds: linger) }
    let perConnection = heldWhileMeasured > 0 ? Double(after - before) * 1024 / Double(heldWhileMeasured) : 0
    print("held=\(heldWhileMeasured) rss_before_kb=\(before) rss_after_kb=\(after) per_conn_bytes=\(Int(perConnection.rounded())) "
        + "alive_after=\(alive) requested=\(count) fds_before=\(fdsBefore) fds_after=\(fdsAfter) open_s=\(fixed(openSeconds, 2)) "
        + "errors=\(client.errors.total) error_kinds=\(client.errors.summary)")
    client.closeAll()
    exit(heldWhileMeasured == count && alive == count ? 0 : 1)
}
