/// Something a timer can wake. Timers call back with the tag they were set with.
public protocol TimerHandler: AnyObject {
    func timerFired(tag: Int, loop: EventLoop)
}

/// A timer that was set, for cancelling it.
public struct TimerID: Hashable, Sendable {
    let raw: UInt64
}

/// A min-heap of deadlines with lazy cancellation: a cancelled entry stays in
/// the heap, is skipped when it comes due, and is swept out when cancelled
/// entries outnumber live ones, so cancelled targets are not held for long.
struct TimerHeap {
    struct Entry {
        let deadline: UInt64
        let id: UInt64
        let target: TimerHandler
        let tag: Int
    }

    private var entries: [Entry] = []
    private var cancelled: Set<UInt64> = []
    private var nextID: UInt64 = 1

    var count: Int { entries.count - cancelled.count }

    mutating func schedule(deadline: UInt64, target: TimerHandler, tag: Int) -> TimerID {
        let id = nextID
        nextID += 1
        entries.append(Entry(deadline: deadline, id: id, target: target, tag: tag))
        siftUp(entries.count - 1)
        return TimerID(raw: id)
    }

    mutating func cancel(_ id: TimerID) {
        cancelled.insert(id.raw)
        if cancelled.count > 64 && cancelled.count * 2 > entries.count { compact() }
    }

    /// The earliest live deadline, if any.
    mutating func nextDeadline() -> UInt64? {
        while let first = entries.first, cancelled.contains(first.id) {
            cancelled.remove(first.id)
            popFirst()
        }
        return entries.first?.deadline
    }

    /// Removes and returns the first entry due at or before `now`, skipping cancelled ones.
    mutating func popDue(now: UInt64) -> Entry? {
        while let first = entries.first, first.deadline <= now {
            popFirst()
            if cancelled.remove(first.id) != nil { continue }
            return first
        }
        return nil
    }

    private mutating func compact() {
        entries.removeAll { cancelled.contains($0.id) }
        cancelled.removeAll(keepingCapacity: true)
        // Heapify.
        var i = entries.count / 2
        while i > 0 { i -= 1; siftDown(i) }
    }

    private mutating func popFirst() {
        let last = entries.removeLast()
        if !entries.isEmpty {
            entries[0] = last
            siftDown(0)
        }
    }

    private mutating func siftUp(_ index: Int) {
        var child = index
        while child > 0 {
            let parent = (child - 1) / 2
            if entries[child].deadline >= entries[parent].deadline { break }
            entries.swapAt(child, parent)
            child = parent
        }
    }

    private mutating func siftDown(_ index: Int) {
        var parent = index
        let n = entries.count
        while true {
            let left = 2 * parent + 1
            if left >= n { return }
            var smallest = left
            if left + 1 < n && entries[left + 1].deadline < entries[left].deadline { smallest = left + 1 }
            if entries[parent].deadline <= entries[smallest].deadline { return }
            entries.swapAt(parent, smallest)
            parent = smallest
        }
    }
}
