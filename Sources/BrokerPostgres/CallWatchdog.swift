import Synchronization

/// Gives up on calls that run longer than `limit`, with one timer for all of
/// them.
///
/// Each store call used to race its work against a child task sleeping for
/// the limit. That was a task group, two tasks and a dispatch timer per
/// query, and a cancelled sleep's timer still fires later: about a tenth of
/// the broker's CPU on PostgreSQL (perf, issue 15). Here a call is one task,
/// registered in a table; one ticker looks at the table every `tick` and
/// cancels what has run past its deadline. A call therefore gives up between
/// `limit` and `limit + tick` after it began.
final class CallWatchdog: Sendable {
    /// The call ran past its deadline and was cancelled.
    struct Expired: Error {}

    private struct Call {
        let deadline: ContinuousClock.Instant
        let cancel: @Sendable () -> Void
    }

    private struct Table {
        var next: UInt64 = 0
        var running: [UInt64: Call] = [:]
        var expired: Set<UInt64> = []
    }

    /// Shared with the ticker, which must not keep the watchdog alive.
    private final class State: Sendable {
        let table = Mutex(Table())
    }

    let limit: Duration
    private let state = State()
    private let ticker: Task<Void, Never>

    init(limit: Duration, tick: Duration = .seconds(1)) {
        self.limit = limit
        let state = self.state
        ticker = Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(for: tick)
                let now = ContinuousClock.now
                let late: [@Sendable () -> Void] = state.table.withLock { table in
                    var late: [@Sendable () -> Void] = []
                    for (id, call) in table.running where call.deadline <= now && !table.expired.contains(id) {
                        table.expired.insert(id)
                        late.append(call.cancel)
                    }
                    return late
                }
                for cancel in late { cancel() }
            }
        }
    }

    deinit { ticker.cancel() }

    /// Stops the ticker (calls made after this are never given up on).
    func stop() { ticker.cancel() }

    /// Runs `operation` as its own task, cancelled when it runs past `limit`
    /// or when the caller is cancelled.
    /// - Throws: `Expired` when the watchdog cancelled it; else what it threw.
    func run<T: Sendable>(_ operation: @escaping @Sendable () async throws -> T) async throws -> T {
        let task = Task { try await operation() }
        let deadline = ContinuousClock.now + limit
        let id = state.table.withLock { table in
            table.next &+= 1
            table.running[table.next] = Call(deadline: deadline, cancel: { task.cancel() })
            return table.next
        }
        let outcome = await withTaskCancellationHandler {
            await task.result
        } onCancel: {
            task.cancel()
        }
        let expired = state.table.withLock { table in
            table.running[id] = nil
            return table.expired.remove(id) != nil
        }
        switch outcome {
        case .success(let value): return value
        case .failure(let error): throw expired ? Expired() : error
        }
    }
}
