import Synchronization
import Testing
@testable import EventLoop
import SystemLayer
import TestSupport

final class Recorder: TimerHandler, @unchecked Sendable {
    let fired = Mutex<[Int]>([])
    func timerFired(tag: Int, loop: EventLoop) { fired.withLock { $0.append(tag) } }
}

@Suite("Event loop", .offPool)
struct EventLoopTests {
    @Test("timers fire in deadline order; cancelled ones never fire")
    func timerHeap() {
        var heap = TimerHeap()
        let target = Recorder()
        _ = heap.schedule(deadline: 30, target: target, tag: 3)
        let cancelled = heap.schedule(deadline: 10, target: target, tag: 1)
        _ = heap.schedule(deadline: 20, target: target, tag: 2)
        _ = heap.schedule(deadline: 5, target: target, tag: 0)
        heap.cancel(cancelled)
        #expect(heap.nextDeadline() == 5)
        var order: [Int] = []
        while let entry = heap.popDue(now: 25) { order.append(entry.tag) }
        #expect(order == [0, 2])
        #expect(heap.nextDeadline() == 30)
        #expect(heap.count == 1)
    }

    @Test("many cancellations are swept out of the heap")
    func timerCompaction() {
        var heap = TimerHeap()
        let target = Recorder()
        let ids = (0..<1000).map { heap.schedule(deadline: UInt64($0), target: target, tag: $0) }
        for id in ids.dropLast() { heap.cancel(id) }
        #expect(heap.count == 1)
        #expect(heap.popDue(now: 10_000)?.tag == 999)
    }

    @Test("commands run on the loop's thread, timers fire, and the group stops")
    func commandsAndTimers() throws {
        let group = try EventLoopGroup(count: 2, name: "test")
        defer { group.shutdown() }
        let seen = Mutex<Set<Int>>([])
        group.onEveryLoop { loop in seen.withLock { _ = $0.insert(loop.id) } }
        #expect(seen.withLock { $0 } == [0, 1])

        let recorder = Recorder()
        let done = DoneSignal()
        group.loops[0].execute { loop in
            loop.schedule(afterNanoseconds: 20_000_000, target: recorder, tag: 7)
            let cancelled = loop.schedule(afterNanoseconds: 10_000_000, target: recorder, tag: 8)
            loop.cancel(cancelled)
            loop.schedule(afterNanoseconds: 40_000_000, target: DoneTimer(done), tag: 0)
        }
        done.wait()
        #expect(recorder.fired.withLock { $0 } == [7])
    }

    @Test("events for a descriptor go to its handler until it is deregistered")
    func registration() throws {
        let group = try EventLoopGroup(count: 1, name: "test")
        defer { group.shutdown() }
        let event = try EventFD()
        defer { event.close() }
        let handler = CountingHandler()
        group.onEveryLoop { loop in try! loop.register(event.fd, interest: [.readable, .edgeTriggered], handler: handler) }
        event.signal()
        #expect(eventually { handler.count.load(ordering: .relaxed) >= 1 })
        group.onEveryLoop { loop in loop.deregister(event.fd) }
        let before = handler.count.load(ordering: .relaxed)
        event.drain()
        event.signal()
        // Two full turns of the loop after the signal: an event for the
        // descriptor, had it still been registered, would have come with them.
        group.onEveryLoop { _ in }
        group.onEveryLoop { _ in }
        #expect(handler.count.load(ordering: .relaxed) == before)
    }
}

final class DoneTimer: TimerHandler {
    let done: DoneSignal
    init(_ done: DoneSignal) { self.done = done }
    func timerFired(tag: Int, loop: EventLoop) { done.signal() }
}

final class CountingHandler: EventHandler, @unchecked Sendable {
    let count = Atomic<Int>(0)
    func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop) {
        count.wrappingAdd(1, ordering: .relaxed)
    }
}
