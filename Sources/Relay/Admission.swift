import Synchronization

/// Why a client was turned away or a connection failed.
public enum RefusalReason: String, CaseIterable, Sendable {
    /// The global MaxConnections was reached.
    case globalLimit = "global_limit"
    /// The listener's MaxConnections was reached.
    case listenerLimit = "listener_limit"
    /// No rule on this listener admits the client's address.
    case notAllowed = "not_allowed"
    /// The process ran out of file descriptors.
    case descriptorsExhausted = "fd_exhausted"
    /// The gateway is draining for shutdown.
    case draining = "draining"
}

/// Counts a listener's open connections against its limit. Shared by the
/// loops (each has its own listening socket for the same address), so the
/// count is atomic; it is touched once per connection, never per byte.
public final class AdmissionGate: Sendable {
    public let address: String
    fileprivate let count = Atomic<Int>(0)
    private let limitValue: Atomic<Int>

    /// A gate of its own with no limit (a handed-over connection whose rule is gone).
    static func unlimited(_ address: String) -> AdmissionGate { AdmissionGate(address: address, limit: Int.max) }

    init(address: String, limit: Int) {
        self.address = address
        limitValue = Atomic(limit)
    }

    public var active: Int { count.load(ordering: .relaxed) }
    public var limit: Int { limitValue.load(ordering: .relaxed) }

    func setLimit(_ limit: Int) { limitValue.store(limit, ordering: .relaxed) }

    @inline(__always)
    func tryEnter() -> Bool {
        let now = count.wrappingAdd(1, ordering: .relaxed).newValue
        if now > limitValue.load(ordering: .relaxed) {
            count.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    @inline(__always)
    func leave() { count.wrappingSubtract(1, ordering: .relaxed) }
}

/// MaxConnections for the whole process and per listener, checked at accept,
/// before any upstream connect.
public final class AdmissionControl: Sendable {
    public let global: AdmissionGate

    public init(maxConnections: Int) {
        global = AdmissionGate(address: "global", limit: maxConnections)
    }

    /// Admits one connection on `listener`, or says why not. On success the
    /// caller must call `release(listener)` exactly once when it closes.
    @inline(__always)
    public func admit(_ listener: AdmissionGate) -> RefusalReason? {
        guard global.tryEnter() else { return .globalLimit }
        guard listener.tryEnter() else {
            global.leave()
            return .listenerLimit
        }
        return nil
    }

    /// Counts a connection handed over by a predecessor, even over a limit
    /// (it is established already); released as any other.
    func force(_ listener: AdmissionGate) {
        global.count.wrappingAdd(1, ordering: .relaxed)
        listener.count.wrappingAdd(1, ordering: .relaxed)
    }

    @inline(__always)
    public func release(_ listener: AdmissionGate) {
        listener.leave()
        global.leave()
    }
}
