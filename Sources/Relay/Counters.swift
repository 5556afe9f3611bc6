import Synchronization

/// Per-loop event counters. Each loop writes only its own instance (relaxed
/// atomics on an uncontended line); readers sum the loops' instances.
final class LoopCounters: Sendable {
    let accepted = Atomic<Int>(0)
    let established = Atomic<Int>(0)
    let closed = Atomic<Int>(0)
    let active = Atomic<Int>(0)
    let connectRefused = Atomic<Int>(0)
    let connectTimedOut = Atomic<Int>(0)
    let connectOtherFailure = Atomic<Int>(0)
    let resets = Atomic<Int>(0)
    let idleClosed = Atomic<Int>(0)
    let revoked = Atomic<Int>(0)
    let spliceFallbacks = Atomic<Int>(0)
    let bytesClientToTarget = Atomic<Int>(0)
    let bytesTargetToClient = Atomic<Int>(0)
    let refusedGlobalLimit = Atomic<Int>(0)
    let refusedListenerLimit = Atomic<Int>(0)
    let refusedNotAllowed = Atomic<Int>(0)
    let refusedDescriptors = Atomic<Int>(0)
    let refusedDraining = Atomic<Int>(0)
    /// Refusals by an inspector (inspect-first rules), by its reason label.
    /// Touched once per refused connection, so a lock is cheap enough.
    let inspectionRefusals = Mutex<[String: Int]>([:])

    init() {}

    func countInspectionRefusal(_ reason: String) {
        inspectionRefusals.withLock { $0[reason, default: 0] += 1 }
    }

    @inline(__always)
    func bump(_ counter: borrowing Atomic<Int>, by amount: Int = 1) {
        counter.wrappingAdd(amount, ordering: .relaxed)
    }

    func refusal(_ reason: RefusalReason) -> Int {
        switch reason {
        case .globalLimit: refusedGlobalLimit.load(ordering: .relaxed)
        case .listenerLimit: refusedListenerLimit.load(ordering: .relaxed)
        case .notAllowed: refusedNotAllowed.load(ordering: .relaxed)
        case .descriptorsExhausted: refusedDescriptors.load(ordering: .relaxed)
        case .draining: refusedDraining.load(ordering: .relaxed)
        }
    }

    func countRefusal(_ reason: RefusalReason) {
        switch reason {
        case .globalLimit: bump(refusedGlobalLimit)
        case .listenerLimit: bump(refusedListenerLimit)
        case .notAllowed: bump(refusedNotAllowed)
        case .descriptorsExhausted: bump(refusedDescriptors)
        case .draining: bump(refusedDraining)
        }
    }
}

/// A point-in-time sum of every loop's counters.
public struct RelayStats: Sendable, Equatable, CustomStringConvertible {
    public var accepted = 0
    public var established = 0
    public var closed = 0
    public var active = 0
    public var refused: [RefusalReason: Int] = [:]
    public var connectRefused = 0
    public var connectTimedOut = 0
    public var connectOtherFailure = 0
    public var resets = 0
    public var idleClosed = 0
    public var revoked = 0
    public var spliceFallbacks = 0
    public var bytesClientToTarget = 0
    public var bytesTargetToClient = 0
    public var pipesOpen = 0
    /// Connections an inspector refused, by its reason label.
    public var inspectionRefusals: [String: Int] = [:]

    public var totalRefused: Int { refused.values.reduce(0, +) }
    public var failed: Int { connectRefused + connectTimedOut + connectOtherFailure }

    public var description: String {
        let refusals = RefusalReason.allCases.map { "\($0.rawValue)=\(refused[$0, default: 0])" }.joined(separator: " ")
        return "accepted=\(accepted) established=\(established) active=\(active) closed=\(closed) "
            + "failed=\(failed) (refused=\(connectRefused) timeout=\(connectTimedOut) other=\(connectOtherFailure)) "
            + "resets=\(resets) idle_closed=\(idleClosed) revoked=\(revoked) refusals: \(refusals) "
            + (inspectionRefusals.isEmpty ? "" : "inspection refusals: " + inspectionRefusals.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ") + " ")
            + "bytes c->t=\(bytesClientToTarget) t->c=\(bytesTargetToClient) pipes_open=\(pipesOpen)"
    }
}

/// Bytes each way.
/// One rule's TCP figures on one loop: looked up by rule id once per rule
/// change (the listener keeps them beside its rules, each connection keeps
/// its rule's), so accepting and closing a connection adds to them without
/// hashing a String (issue 15). Touched only from the loop's thread.
final class TCPRuleCounters {
    var accepted = 0
    /// Bytes of the rule's closed connections.
    var closed = ByteCounts()
}

struct ByteCounts: Sendable {
    var toTarget = 0
    var toClient = 0

    mutating func add(toTarget: Int, toClient: Int) {
        self.toTarget &+= toTarget
        self.toClient &+= toClient
    }
}

/// TCP figures for one rule, summed over the loops (`RelayEngine.tcpTraffic`).
public struct TCPRuleTraffic: Sendable, Equatable {
    /// Connections accepted since the rule was installed.
    public var accepted = 0
    /// Connections open now (relaying or being inspected).
    public var active = 0
    public var bytesToTarget = 0
    public var bytesToClient = 0

    mutating func add(_ other: TCPRuleTraffic) {
        accepted += other.accepted
        active += other.active
        bytesToTarget &+= other.bytesToTarget
        bytesToClient &+= other.bytesToClient
    }
}
