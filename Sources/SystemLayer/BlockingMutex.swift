import Glibc

/// A lock around a value for state that is held across blocking work (a
/// wait for the relay loops, a journal write): a plain pthread mutex, so a
/// thread that finds it taken sleeps at once.
///
/// `Synchronization.Mutex` on Linux spins first and then sleeps on a
/// priority-inheritance futex. For a lock whose holder is itself waiting,
/// on a process pinned to one CPU, the spinning only takes the CPU the
/// holder's wake-up needs: with four clients pushing rules, 4.4 % of the
/// gateway's CPU was `_MutexHandle._lockSlow` under `GatewayControl`'s
/// state lock (perf, issue 15). Short, never-blocking critical sections
/// keep `Mutex`.
public final class BlockingMutex<Value>: @unchecked Sendable {
    // @unchecked Sendable: `value` is read and written only with `mutex`
    // held. Safe pointer use: allocated once here, never moved (pthread
    // objects must not move), destroyed and freed in deinit.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    @exclusivity(unchecked) private var value: Value

    public init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the lock held and the value to read or change.
    public func withLock<Result, E: Error>(_ body: (inout Value) throws(E) -> Result) throws(E) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
