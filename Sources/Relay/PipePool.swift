import Synchronization
import SystemLayer

/// The cap on pipes across all loops, so that a burst of busy connections
/// cannot take every descriptor the process has.
public final class PipeBudget: Sendable {
    private let inUse = Atomic<Int>(0)
    public let limit: Int

    public init(limit: Int) { self.limit = limit }

    public var count: Int { inUse.load(ordering: .relaxed) }

    func take() -> Bool {
        if inUse.wrappingAdd(1, ordering: .relaxed).newValue > limit {
            inUse.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    func give() { inUse.wrappingSubtract(1, ordering: .relaxed) }

    /// Counts a pipe that came with a handed-over connection, even over the cap
    /// (its bytes must be delivered).
    func force() { inUse.wrappingAdd(1, ordering: .relaxed) }
}

/// A loop's pipes. A connection holds a pipe only while bytes are in flight
/// in that direction; an idle connection holds none. A few idle pipes are kept
/// for reuse; the rest are closed so their descriptors go back to the process.
final class PipePool {
    private var idle: [Pipe] = []
    private let budget: PipeBudget
    private let pipeSize: Int
    private let maxIdle: Int
    private(set) var inUse = 0

    init(budget: PipeBudget, pipeSize: Int, maxIdle: Int) {
        self.budget = budget
        self.pipeSize = pipeSize
        self.maxIdle = maxIdle
        idle.reserveCapacity(maxIdle)
    }

    var idleCount: Int { idle.count }

    /// A pipe, or nil when the global cap is reached or no descriptor is left
    /// (the caller then copies through memory instead).
    @inline(__always)
    func take() -> Pipe? {
        if let pipe = idle.popLast() {
            inUse += 1
            return pipe
        }
        guard budget.take() else { return nil }
        guard let pipe = try? Pipe.make(size: pipeSize) else {
            budget.give()
            return nil
        }
        inUse += 1
        return pipe
    }

    /// Returns an empty pipe. A pipe that may still hold bytes must be
    /// `discard`ed instead.
    @inline(__always)
    func give(_ pipe: Pipe) {
        inUse -= 1
        if idle.count < maxIdle {
            idle.append(pipe)
        } else {
            pipe.close()
            budget.give()
        }
    }

    /// Takes a pipe that came with a handed-over connection, holding bytes.
    func adopt(_ pipe: Pipe) {
        inUse += 1
        budget.force()
    }

    /// Closes a pipe that may hold stale bytes (its connection was reset).
    func discard(_ pipe: Pipe) {
        inUse -= 1
        pipe.close()
        budget.give()
    }

    /// Closes every idle pipe.
    func drainIdle() {
        for pipe in idle {
            pipe.close()
            budget.give()
        }
        idle.removeAll()
    }
}
