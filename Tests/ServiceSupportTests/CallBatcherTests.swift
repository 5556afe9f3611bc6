import ServiceSupport
import Synchronization
import Testing
import TestSupport

/// `CallBatcher` without sockets: the peer is a pair of closures the test
/// holds back and counts.
@Suite("Call batcher", .offPool)
struct CallBatcherTests {
    /// A peer that answers each call with its value times ten, holding every
    /// request while `held` is set, and records what it was sent.
    final class Peer: Sendable {
        let held = Mutex(false)
        let singles = Mutex<[Int]>([])
        let batches = Mutex<[[Int]]>([])
        let takesBatches: Bool

        init(takesBatches: Bool = true) { self.takesBatches = takesBatches }

        private func hold() async {
            while held.withLock({ $0 }) { try? await Task.sleep(for: .milliseconds(1)) }
        }

        func one(_ call: Int) async -> Int {
            singles.withLock { $0.append(call) }
            await hold()
            return call * 10
        }

        func many(_ calls: [Int]) async -> [Int]? {
            guard takesBatches else { return nil }
            batches.withLock { $0.append(calls) }
            await hold()
            return calls.map { $0 * 10 }
        }
    }

    /// Starts `calls` at once while the peer holds its answers, waits until
    /// all are pending, releases the peer and returns each call's outcome.
    static func burst(_ batcher: CallBatcher<String, Int, Int>, _ peer: Peer, _ calls: [Int]) async throws -> [Int: Int] {
        peer.held.withLock { $0 = true }
        let task = Task {
            await withTaskGroup(of: (Int, Int).self) { group in
                for call in calls {
                    group.addTask { (call, await batcher.submit(call, to: "peer", one: peer.one, many: peer.many, expired: { _, _ in -1 })) }
                }
                var outcomes: [Int: Int] = [:]
                for await (call, outcome) in group { outcomes[call] = outcome }
                return outcomes
            }
        }
        try await waitUntilAsync("all \(calls.count) calls pending") { batcher.pendingCalls { $0 == "peer" } == calls.count }
        peer.held.withLock { $0 = false }
        return await task.value
    }

    @Test("calls one after another each go alone, on the caller's task; nothing stays queued")
    func quietCallsGoAlone() async {
        let batcher = CallBatcher<String, Int, Int>(maxBatch: 8)
        let peer = Peer()
        for call in 1...5 {
            #expect(await batcher.submit(call, to: "peer", one: peer.one, many: peer.many, expired: { _, _ in -1 }) == call * 10)
        }
        #expect(peer.singles.withLock { $0 } == [1, 2, 3, 4, 5])
        #expect(peer.batches.withLock { $0 }.isEmpty)
        #expect(batcher.pendingCalls { _ in true } == 0)
    }

    @Test("a burst: at most two requests at once, the waiting calls in batches of at most maxBatch, each call its own outcome")
    func burstIsBatched() async throws {
        let batcher = CallBatcher<String, Int, Int>(maxInFlight: 2, maxBatch: 4)
        let peer = Peer()
        let outcomes = try await Self.burst(batcher, peer, Array(1...12))
        #expect(outcomes.count == 12 && outcomes.allSatisfy { $0.value == $0.key * 10 }, "\(outcomes)")
        let singles = peer.singles.withLock { $0 }, batches = peer.batches.withLock { $0 }
        #expect(singles.count + batches.reduce(0) { $0 + $1.count } == 12, "every call sent once: \(singles) \(batches)")
        #expect(batches.allSatisfy { (2...4).contains($0.count) }, "\(batches)")
        // Only two requests were under way while the twelve waited: the rest went in batches.
        #expect(batches.reduce(0) { $0 + $1.count } >= 10, "\(batches)")
        #expect(batcher.batchFigures.batches == batches.count)
        #expect(batcher.pendingCalls { _ in true } == 0)
    }

    @Test("a call that waited longer than maxWait is answered as expired, not sent; those that did not are sent")
    func waitingCallsExpire() async throws {
        let now = Mutex<UInt64>(1_000_000_000)
        let batcher = CallBatcher<String, Int, Int>(maxInFlight: 2, maxBatch: 8, maxWait: 5_000,
                                                   clock: { now.withLock { $0 } })
        let peer = Peer()
        peer.held.withLock { $0 = true }
        let first = Task {
            await withTaskGroup(of: (Int, Int).self) { group in
                for call in 1...6 {
                    group.addTask { (call, await batcher.submit(call, to: "peer", one: peer.one, many: peer.many,
                                                               expired: { _, waited in -Int(waited) })) }
                }
                var outcomes: [Int: Int] = [:]
                for await (call, outcome) in group { outcomes[call] = outcome }
                return outcomes
            }
        }
        try await waitUntilAsync("six calls pending") { batcher.pendingCalls { _ in true } == 6 }
        // The four that wait now have waited 6,000 ns when a slot frees.
        now.withLock { $0 += 6_000 }
        peer.held.withLock { $0 = false }
        let outcomes = await first.value
        let sent = peer.singles.withLock { $0 } + peer.batches.withLock { $0 }.flatMap { $0 }
        #expect(sent.count == 2, "only the two under way were sent: \(sent)")
        #expect(outcomes.filter { $0.value == $0.key * 10 }.count == 2)
        #expect(outcomes.filter { $0.value == -6_000 }.count == 4, "\(outcomes)")
        #expect(batcher.pendingCalls { _ in true } == 0)
    }

    @Test("calls with the same key never share a batch")
    func keysSplitBatches() async throws {
        let batcher = CallBatcher<String, Int, Int>(maxInFlight: 2, maxBatch: 16, key: { String($0 % 3) })
        let peer = Peer()
        let outcomes = try await Self.burst(batcher, peer, Array(1...9))
        #expect(outcomes.count == 9 && outcomes.allSatisfy { $0.value == $0.key * 10 })
        for batch in peer.batches.withLock({ $0 }) {
            #expect(Set(batch.map { $0 % 3 }).count == batch.count, "\(batch)")
        }
    }

    @Test("a peer without batches: the waiting calls go one at a time, and no batch is tried again for unbatchedFor")
    func peerWithoutBatches() async throws {
        let batcher = CallBatcher<String, Int, Int>(maxInFlight: 2, maxBatch: 8)
        let peer = Peer(takesBatches: false)
        let first = try await Self.burst(batcher, peer, Array(1...6))
        #expect(first.count == 6 && first.allSatisfy { $0.value == $0.key * 10 })
        #expect(peer.singles.withLock { $0.count } == 6, "each call sent alone once")
        let second = try await Self.burst(batcher, peer, Array(11...16))
        #expect(second.count == 6 && second.allSatisfy { $0.value == $0.key * 10 })
        #expect(peer.singles.withLock { $0.count } == 12)
        #expect(batcher.batchFigures.batches == 0)
    }
}
