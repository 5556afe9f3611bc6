import Foundation
import Synchronization
import SystemLayer
import Testing

/// Runs every test case of a suite on a thread of its own, off Swift's
/// cooperative pool.
///
/// The tests block: they wait on sockets, pipes, processes and polls. Swift
/// Testing runs test functions, synchronous ones included, as tasks on the
/// cooperative pool, which has as many threads as the machine has cores (two
/// here). Two blocked tests then stall every Hummingbird server, GRDB call
/// and relay control call of the process, and an unrelated test times out.
/// With this trait a test case's synchronous stretches run on a one-thread
/// `BlockingExecutor` made for it; the servers it starts
/// (`Task { ... }`, which does not inherit the preference) stay on the pool.
///
/// At most `TestParallelism.limit` test cases run at once
/// (`RDG_TEST_PARALLEL`, default 4), so the machine is not flooded with
/// threads, descriptors and relays.
public struct OffPoolTrait: SuiteTrait, TestTrait, TestScoping {
    public var isRecursive: Bool { true }

    public func provideScope(for test: Test, testCase: Test.Case?,
                             performing function: @Sendable () async throws -> Void) async throws {
        // A suite's own scope holds no slot: its test cases take theirs.
        guard testCase != nil else { return try await function() }
        await TestParallelism.gate.enter()
        let executor = BlockingExecutor(name: "test", maxThreads: 1, idleSeconds: 1)
        defer {
            executor.shutdown()
            TestParallelism.gate.leave()
        }
        try await withTaskExecutorPreference(executor) {
            try await function()
        }
    }
}

extension Trait where Self == OffPoolTrait {
    /// Runs each test case on a thread of its own (see `OffPoolTrait`).
    public static var offPool: Self { OffPoolTrait() }
}

/// How many test cases run at once.
public enum TestParallelism {
    public static let limit: Int = {
        if let text = ProcessInfo.processInfo.environment["RDG_TEST_PARALLEL"], let n = Int(text), n >= 1 { return n }
        return 4
    }()

    static let gate = AsyncGate(slots: limit)
}

/// A counting semaphore for tasks: `enter` suspends (never blocks a thread)
/// until a slot is free; waiters go in FIFO order.
final class AsyncGate: Sendable {
    private struct State {
        var free: Int
        var waiting: [CheckedContinuation<Void, Never>] = []
    }
    private let state: Mutex<State>

    init(slots: Int) { state = Mutex(State(free: slots)) }

    func enter() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let admitted = state.withLock { s -> Bool in
                if s.free > 0 { s.free -= 1; return true }
                s.waiting.append(continuation)
                return false
            }
            if admitted { continuation.resume() }
        }
    }

    func leave() {
        let next = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if s.waiting.isEmpty { s.free += 1; return nil }
            return s.waiting.removeFirst()
        }
        next?.resume()
    }
}
