import Synchronization
import SystemLayer

/// Calls to one peer gathered into batches while earlier requests to it are
/// under way (issue 15: a burst of connects, or a reconnect storm, costs the
/// peer one request, one durable write and one change per batch rather than
/// per call).
///
/// A call that finds nothing waiting for its target and fewer than
/// `maxInFlight` requests to it under way is sent at once, alone, on its
/// caller's task: no hand-over, so a quiet service pays nothing for the
/// batching. Otherwise it waits; a sender task (started when a request slot
/// is free) takes every waiting call, up to `maxBatch`, and sends them as
/// one batch, each call getting its own outcome. A peer that cannot take
/// batches (`many` answers nil: one older than its client) gets the calls
/// one at a time, and only single calls for `unbatchedFor`.
public final class CallBatcher<Target: Hashable & Sendable, Call: Sendable, Outcome: Sendable>: Sendable {
    public let maxInFlight: Int
    public let maxBatch: Int
    public let unbatchedFor: UInt64
    /// How long a call may wait for a request slot: one that waited longer
    /// is answered by `expired` instead of sent (a peer that hangs would
    /// otherwise make calls wait for the requests ahead of them and then
    /// for their own); nil: no limit.
    public let maxWait: UInt64?
    private let clock: @Sendable () -> UInt64
    /// Calls with the same key never go in one batch (a peer that refuses
    /// an id named twice); nil: no such rule.
    private let key: (@Sendable (Call) -> String)?

    private struct Waiting {
        let call: Call
        let done: CheckedContinuation<Outcome, Never>
        /// When it started to wait (`clock`).
        let since: UInt64
    }

    private struct Queue {
        var waiting: [Waiting] = []
        /// Calls taken by a sender and not yet answered.
        var taken = 0
        var sending = 0
        var unbatchedUntil: UInt64 = 0

        var idle: Bool { waiting.isEmpty && taken == 0 && sending == 0 }
    }

    private let queues = Mutex<[Target: Queue]>([:])
    private let counters = Mutex<(batches: Int, batchedCalls: Int)>((0, 0))

    /// - Parameters:
    ///   - maxInFlight: requests to one target at once. Below it, calls go
    ///     alone as they come, so a closed loop of a few callers sees no
    ///     queueing (with 2, four callers measured about 10 % fewer connects
    ///     a second: the third and fourth waited a whole round trip);
    ///     beyond it, a burst goes in batches.
    ///   - maxBatch: calls in one batch, within what the peer takes.
    ///   - unbatchedFor: nanoseconds of single calls after a peer refused a batch.
    ///   - key: calls with equal keys go in different batches.
    ///   - maxWait: nanoseconds a call may wait before it is sent (the
    ///     callers' own request timeout, so a waiting call fails no later
    ///     than a call sent alone would have); nil: no limit.
    ///   - clock: nanoseconds, monotonic (tests move it).
    public init(maxInFlight: Int = 4, maxBatch: Int, unbatchedFor: UInt64 = 600 * 1_000_000_000,
                key: (@Sendable (Call) -> String)? = nil, maxWait: UInt64? = nil,
                clock: @escaping @Sendable () -> UInt64 = { MonotonicClock.nowNanoseconds }) {
        precondition(maxInFlight > 0 && maxBatch > 1)
        self.maxInFlight = maxInFlight
        self.maxBatch = maxBatch
        self.unbatchedFor = unbatchedFor
        self.key = key
        self.maxWait = maxWait
        self.clock = clock
    }

    /// Batches sent, and the calls they carried.
    public var batchFigures: (batches: Int, calls: Int) { counters.withLock { ($0.batches, $0.batchedCalls) } }

    /// Calls to the targets `matching` not yet answered: waiting, or taken by a sender.
    public func pendingCalls(matching: (Target) -> Bool) -> Int {
        queues.withLock { table in
            table.filter { matching($0.key) }.reduce(0) { $0 + $1.value.waiting.count + $1.value.taken }
        }
    }

    /// Sends `call` to `target`, alone or in a batch.
    /// - Parameters:
    ///   - one: sends one call alone.
    ///   - many: sends calls as one batch; one outcome per call, in order,
    ///     or nil when the peer does not take batches.
    ///   - expired: the outcome of a call that waited longer than `maxWait`
    ///     (with how long it waited, in nanoseconds), which is not sent.
    public func submit(_ call: Call, to target: Target,
                       one: @escaping @Sendable (Call) async -> Outcome,
                       many: @escaping @Sendable ([Call]) async -> [Outcome]?,
                       expired: @escaping @Sendable (Call, UInt64) -> Outcome) async -> Outcome {
        let direct = queues.withLock { table -> Bool in
            var queue = table[target, default: Queue()]
            guard queue.sending < maxInFlight, queue.waiting.isEmpty else { return false }
            queue.sending += 1
            queue.taken += 1
            table[target] = queue
            return true
        }
        if direct {
            let outcome = await one(call)
            // Calls that arrived meanwhile get this request slot: a sender takes them.
            let handOff = queues.withLock { table -> Bool in
                table[target]!.taken -= 1
                if !table[target]!.waiting.isEmpty { return true }
                table[target]!.sending -= 1
                forgetIfIdle(target, in: &table)
                return false
            }
            if handOff { Task { await self.drain(target, one: one, many: many, expired: expired) } }
            return outcome
        }
        let since = clock()
        return await withCheckedContinuation { done in
            let start = queues.withLock { table -> Bool in
                table[target, default: Queue()].waiting.append(Waiting(call: call, done: done, since: since))
                guard table[target]!.sending < maxInFlight else { return false }
                table[target]!.sending += 1
                return true
            }
            if start { Task { await self.drain(target, one: one, many: many, expired: expired) } }
        }
    }

    private func forgetIfIdle(_ target: Target, in table: inout [Target: Queue]) {
        if let queue = table[target], queue.idle, queue.unbatchedUntil <= clock() {
            table[target] = nil
        }
    }

    /// Sends what waits for `target` until nothing does, then gives its request slot back.
    private func drain(_ target: Target, one: @Sendable (Call) async -> Outcome,
                       many: @Sendable ([Call]) async -> [Outcome]?,
                       expired: @Sendable (Call, UInt64) -> Outcome) async {
        while true {
            let now = clock()
            var late: [Waiting] = []
            let (next, batching): ([Waiting], Bool) = queues.withLock { table in
                // Calls that waited longer than maxWait are answered, not sent.
                if let maxWait, var queue = table[target] {
                    let overdue = { (item: Waiting) in now &- item.since > maxWait }
                    late = queue.waiting.filter(overdue)
                    if !late.isEmpty {
                        queue.waiting.removeAll(where: overdue)
                        table[target] = queue
                    }
                }
                guard var queue = table[target], !queue.waiting.isEmpty else {
                    table[target]?.sending -= 1
                    forgetIfIdle(target, in: &table)
                    return ([], false)
                }
                let batching = queue.unbatchedUntil <= now
                var count = 1
                if batching {
                    var keys = Set<String>()
                    count = queue.waiting.prefix(maxBatch).prefix { item in
                        guard let key else { return true }
                        return keys.insert(key(item.call)).inserted
                    }.count
                }
                let taken = Array(queue.waiting.prefix(count))
                queue.waiting.removeFirst(count)
                queue.taken += count
                table[target] = queue
                return (taken, batching)
            }
            for item in late { item.done.resume(returning: expired(item.call, now &- item.since)) }
            guard !next.isEmpty else { return }
            func answer(_ item: Waiting, _ outcome: Outcome) {
                queues.withLock { $0[target]?.taken -= 1 }
                item.done.resume(returning: outcome)
            }
            if next.count == 1 || !batching {
                for item in next { answer(item, await one(item.call)) }
                continue
            }
            if let outcomes = await many(next.map(\.call)), outcomes.count == next.count {
                counters.withLock { $0.batches += 1; $0.batchedCalls += next.count }
                for (item, outcome) in zip(next, outcomes) { answer(item, outcome) }
            } else {
                queues.withLock { $0[target]?.unbatchedUntil = clock() + unbatchedFor }
                for item in next { answer(item, await one(item.call)) }
            }
        }
    }
}
