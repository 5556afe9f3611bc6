import Synchronization
import SystemLayer

/// Something that receives readiness events for the descriptors it registered.
public protocol EventHandler: AnyObject {
    /// Called on the loop's thread with the events for `fd`.
    func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop)
}

/// One event-loop thread: it owns an epoll descriptor, a command queue woken
/// by an eventfd, a timer heap and the handlers registered with it.
///
/// Everything but `execute(_:)`, `stop()` and `id` must be called on the
/// loop's own thread, from a handler, a timer or a command. That is what
/// keeps the data path free of locks.
public final class EventLoop: @unchecked Sendable {
    public typealias Command = @Sendable (EventLoop) -> Void

    /// The loop's index within its group.
    public let id: Int

    private let epoll: Epoll
    private let wakeup: EventFD
    private let commands = Mutex<[Command]>([])
    private let stopRequested = Atomic<Bool>(false)

    /// Handlers by descriptor number, with the generation that tags their
    /// epoll events so that an event for a descriptor closed and reused in the
    /// same batch is dropped rather than delivered to the wrong handler.
    private var slots: [Slot] = []
    private var generation: UInt32 = 0
    private var timers = TimerHeap()
    private var runningCommands: [Command] = []
    /// The time at the top of this iteration, for handlers that need "now" cheaply.
    public private(set) var now: UInt64 = MonotonicClock.nowNanoseconds

    private struct Slot {
        var handler: EventHandler?
        var generation: UInt32
    }

    private static let wakeupToken: UInt64 = UInt64(UInt32.max) << 32

    /// Creates a loop; `run()` must then be called on the thread that will own it.
    /// - Throws: `Errno` when the epoll or eventfd descriptor cannot be created.
    public init(id: Int) throws(Errno) {
        self.id = id
        epoll = try Epoll()
        wakeup = try EventFD()
        try epoll.add(wakeup.fd, interest: [.readable, .edgeTriggered], token: EventLoop.wakeupToken)
    }

    deinit {
        wakeup.close()
    }

    // MARK: Thread-safe

    /// Queues `command` to run on the loop's thread and wakes the loop.
    public func execute(_ command: @escaping Command) {
        let wasEmpty = commands.withLock { queue in
            queue.append(command)
            return queue.count == 1
        }
        if wasEmpty { wakeup.signal() }
    }

    /// Asks the loop to return from `run()` after the current iteration.
    public func stop() {
        stopRequested.store(true, ordering: .releasing)
        wakeup.signal()
    }

    // MARK: Loop thread only

    /// Runs until `stop()`.
    public func run() {
        while !stopRequested.load(ordering: .acquiring) {
            var timeout: Int32 = -1
            if let deadline = timers.nextDeadline() {
                let current = MonotonicClock.nowNanoseconds
                timeout = deadline <= current ? 0 : Int32(clamping: (deadline - current + 999_999) / 1_000_000)
            }
            var sawWakeup = false
            do {
                _ = try epoll.wait(timeoutMilliseconds: timeout) { token, events in
                    if token == EventLoop.wakeupToken {
                        sawWakeup = true
                        return
                    }
                    dispatch(token: token, events: events)
                }
            } catch {
                // epoll_wait fails only on a programming error (EBADF, EINVAL);
                // there is nothing to serve without it.
                fatalError("epoll_wait failed on loop \(id): \(error)")
            }
            now = MonotonicClock.nowNanoseconds
            runDueTimers()
            if sawWakeup { runCommands() }
        }
        runCommands()
    }

    @inline(__always)
    private func dispatch(token: UInt64, events: EpollEvents) {
        let fd = Int(truncatingIfNeeded: token & 0xffff_ffff)
        let tokenGeneration = UInt32(truncatingIfNeeded: token >> 32)
        guard fd < slots.count, slots[fd].generation == tokenGeneration, let handler = slots[fd].handler else { return }
        handler.handle(events: events, fd: FileDescriptor(rawValue: Int32(fd)), loop: self)
    }

    private func runCommands() {
        wakeup.drain()
        var batch = runningCommands
        runningCommands = []
        commands.withLock { queue in swap(&queue, &batch) }
        for command in batch { command(self) }
        batch.removeAll(keepingCapacity: true)
        runningCommands = batch
        return
    }

    private func runDueTimers() {
        while let entry = timers.popDue(now: now) {
            entry.target.timerFired(tag: entry.tag, loop: self)
        }
    }

    /// Registers `fd` with `interest`; its events go to `handler` until `deregister`.
    /// - Throws: `Errno` from epoll_ctl.
    public func register(_ fd: FileDescriptor, interest: EpollEvents, handler: EventHandler) throws(Errno) {
        let index = Int(fd.rawValue)
        if index >= slots.count {
            // To the smallest power of two above `index` (at least 64): doubling
            // from the first descriptor's number overshot by up to half (5,000
            // Security Gateway sessions: 24,576 slots a loop for 15,034 descriptors).
            let size = max(64, 1 << (Int.bitWidth - index.leadingZeroBitCount))
            slots.append(contentsOf: repeatElement(Slot(handler: nil, generation: 0), count: size - slots.count))
        }
        generation = generation == UInt32.max - 1 ? 1 : generation + 1
        slots[index] = Slot(handler: handler, generation: generation)
        do {
            try epoll.add(fd, interest: interest, token: token(fd, generation))
        } catch {
            slots[index].handler = nil
            throw error
        }
    }

    /// Changes the interest of a registered descriptor.
    public func modify(_ fd: FileDescriptor, interest: EpollEvents) throws(Errno) {
        let index = Int(fd.rawValue)
        guard index < slots.count, slots[index].handler != nil else { throw Errno.badFileDescriptor }
        try epoll.modify(fd, interest: interest, token: token(fd, slots[index].generation))
    }

    /// Stops delivering events for `fd`. Call before closing it.
    public func deregister(_ fd: FileDescriptor) {
        let index = Int(fd.rawValue)
        guard index < slots.count, slots[index].handler != nil else { return }
        epoll.remove(fd)
        slots[index].handler = nil
        slots[index].generation = 0
    }

    /// Forgets `fd` without an epoll_ctl call, for a descriptor about to be
    /// closed: closing the last reference removes it from epoll, and the
    /// generation in its token drops any event for it still in this batch.
    @inline(__always)
    public func forget(_ fd: FileDescriptor) {
        let index = Int(fd.rawValue)
        guard index < slots.count else { return }
        slots[index].handler = nil
        slots[index].generation = 0
    }

    @inline(__always)
    private func token(_ fd: FileDescriptor, _ generation: UInt32) -> UInt64 {
        UInt64(generation) << 32 | UInt64(UInt32(bitPattern: fd.rawValue))
    }

    /// Calls `target.timerFired(tag:loop:)` once `delayNanoseconds` have passed.
    @discardableResult
    public func schedule(afterNanoseconds delay: UInt64, target: TimerHandler, tag: Int = 0) -> TimerID {
        timers.schedule(deadline: MonotonicClock.nowNanoseconds &+ delay, target: target, tag: tag)
    }

    /// Cancels a timer that has not fired yet (a fired one is ignored).
    public func cancel(_ timer: TimerID) {
        timers.cancel(timer)
    }

    /// Live timers, for tests and status.
    public var timerCount: Int { timers.count }
}

/// A group of loops, one thread each.
public final class EventLoopGroup: Sendable {
    public let loops: [EventLoop]
    private let threads: Mutex<[ThreadHandle]>

    /// Starts `count` loops on threads named `name-0`, `name-1`, ...
    /// - Throws: `Errno` when a loop or thread cannot be created.
    public init(count: Int, name: String = "loop") throws(Errno) {
        var loops: [EventLoop] = []
        for i in 0..<max(1, count) { loops.append(try EventLoop(id: i)) }
        self.loops = loops
        var handles: [ThreadHandle] = []
        for loop in loops {
            handles.append(try SystemThread.spawn(name: "\(name)-\(loop.id)") { loop.run() })
        }
        threads = Mutex(handles)
    }

    /// Stops every loop and waits for the threads to end.
    public func shutdown() {
        for loop in loops { loop.stop() }
        let handles = threads.withLock { handles in
            defer { handles.removeAll() }
            return handles
        }
        for handle in handles { handle.join() }
    }

    /// Runs `body` on every loop and waits for all of them to finish it.
    public func onEveryLoop(_ body: @escaping @Sendable (EventLoop) -> Void) {
        let done = DoneSignal(count: loops.count)
        for loop in loops {
            loop.execute { loop in
                body(loop)
                done.signal()
            }
        }
        done.wait()
    }
}

/// A countdown another thread can wait on: `wait()` returns once `signal()`
/// has been called `count` times.
public final class DoneSignal: Sendable {
    private let remaining: Mutex<Int>
    private let event: EventFD?

    public init(count: Int = 1) {
        remaining = Mutex(count)
        // Out of descriptors, fall back to polling the counter.
        event = try? EventFD()
    }

    deinit { event?.close() }

    public func signal() {
        let reachedZero = remaining.withLock { value in
            value -= 1
            return value == 0
        }
        if reachedZero { event?.signal() }
    }

    /// Blocks until the count has reached zero.
    public func wait() {
        BlockingCallCheck.check("wait for the event loops (DoneSignal)")
        while remaining.withLock({ $0 }) > 0 {
            if let event { BlockingWait.readable(event.fd, timeoutMilliseconds: 100) } else { BlockingWait.sleep(milliseconds: 1) }
        }
    }
}
