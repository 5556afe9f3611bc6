import CSystemShim
import Glibc

/// Threads of their own for blocking work: file I/O and fsync, waits for the
/// relay loops, bcrypt, blocking sockets. Swift's cooperative pool is as wide
/// as the machine has cores (two here), and every server of the process
/// shares it; work that may block goes here instead.
///
/// The pool is elastic: a job takes an idle thread, or starts a new one while
/// there are fewer than `maxThreads`, or waits its turn in FIFO order. A
/// thread idle for `idleSeconds` ends. Its threads count as dedicated for
/// `BlockingCallCheck`.
///
/// It is also a `TaskExecutor`: `withTaskExecutorPreference(executor)` runs
/// an async body's synchronous stretches on these threads (the tests run
/// each test case on a one-thread executor this way).
public final class BlockingExecutor: TaskExecutor, @unchecked Sendable {
    /// The process-wide pool for the product's blocking work.
    public static let shared = BlockingExecutor(name: "blocking", maxThreads: 32)

    public let name: String
    public let maxThreads: Int
    private let idleSeconds: Int
    // @unchecked Sendable: every field below is read and written only under `lock`.
    private let lock = ConditionLock()
    private var queue: [Work] = []
    private var head = 0
    private var threads = 0
    private var idle = 0
    private var stopping = false

    private enum Work {
        case job(UnownedJob)
        case closure(@Sendable () -> Void)
    }

    /// - Parameters:
    ///   - name: the threads' name prefix (shown by `top -H`).
    ///   - maxThreads: at most this many threads at once (1 = a serial executor).
    ///   - idleSeconds: an idle thread ends after this long.
    public init(name: String, maxThreads: Int, idleSeconds: Int = 10) {
        precondition(maxThreads >= 1, "BlockingExecutor needs at least one thread")
        self.name = name
        self.maxThreads = maxThreads
        self.idleSeconds = idleSeconds
    }

    /// Whether the calling thread is one where blocking is allowed: a
    /// `BlockingExecutor` thread (a task that prefers such an executor runs
    /// there) or another dedicated thread, never a cooperative one.
    public static var onDedicatedThread: Bool { shim_thread_is_dedicated() != 0 }

    // MARK: Running work

    /// Runs `body` on one of the pool's threads and returns what it returns.
    /// - Throws: what `body` throws.
    public func run<T: Sendable, E: Error>(_ body: @escaping @Sendable () throws(E) -> T) async throws(E) -> T {
        let result: Result<T, E> = await withCheckedContinuation { continuation in
            submit(.closure {
                continuation.resume(returning: Result { () throws(E) -> T in try body() })
            })
        }
        return try result.get()
    }

    /// Runs `body` where blocking is allowed: right here when the calling
    /// thread is dedicated (a task that prefers a `BlockingExecutor` already
    /// runs on one of its threads: no hop), else on one of the pool's threads.
    /// - Throws: what `body` throws.
    public func runOffPool<T: Sendable, E: Error>(_ body: @escaping @Sendable () throws(E) -> T) async throws(E) -> T {
        if Self.onDedicatedThread { return try body() }
        return try await run(body)
    }

    /// Runs `body` on one of the pool's threads without waiting for it.
    public func execute(_ body: @escaping @Sendable () -> Void) {
        submit(.closure(body))
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        submit(.job(UnownedJob(job)))
    }

    /// Lets the threads end once the queue is empty; later work still runs
    /// (on a new thread). For executors made per test.
    public func shutdown() {
        lock.withLock {
            stopping = true
            lock.broadcast()
        }
    }

    /// Threads alive now (for tests and status).
    public var threadCount: Int { lock.withLock { threads } }

    private func submit(_ work: Work) {
        let startThread: Bool = lock.withLock {
            queue.append(work)
            if idle > 0 {
                lock.signal()
                return false
            }
            guard threads < maxThreads else { return false }
            threads += 1
            return true
        }
        if startThread { spawn() }
    }

    private func spawn() {
        let number = threadCount
        do {
            _ = try SystemThread.spawn(name: "\(name)-\(number)") { [self] in
                shim_mark_thread_dedicated()
                work()
            }
        } catch {
            // No thread could be made: the work waits for a thread that
            // exists; with none, it runs here rather than be lost (the
            // caller is then blocked, which beats a hang).
            let alone: Bool = lock.withLock { threads == 1 }
            if alone {
                while let next = take(waiting: false) { perform(next) }
            } else {
                lock.withLock { threads -= 1 }
            }
        }
    }

    /// The loop of one thread: take work, run it, end when idle too long.
    private func work() {
        while let next = take(waiting: true) { perform(next) }
    }

    private func perform(_ work: Work) {
        switch work {
        case .job(let job): job.runSynchronously(on: asUnownedTaskExecutor())
        case .closure(let body): body()
        }
    }

    /// The next piece of work; nil when the thread should end (it has then
    /// been taken off the count).
    private func take(waiting: Bool) -> Work? {
        lock.withLock {
            var deadline: timespec?
            while head == queue.count {
                if !waiting || stopping {
                    threads -= 1
                    return nil
                }
                if deadline == nil { deadline = ConditionLock.deadline(afterSeconds: idleSeconds) }
                idle += 1
                let signalled = lock.wait(until: deadline!)
                idle -= 1
                if !signalled && head == queue.count {
                    threads -= 1
                    return nil
                }
            }
            let next = queue[head]
            head += 1
            if head > 64 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
            return next
        }
    }
}

/// A pthread mutex with a condition variable: the waits `BlockingExecutor`
/// needs, which `Synchronization.Mutex` does not offer.
final class ConditionLock: @unchecked Sendable {
    // Safe: allocated once, initialised here, destroyed and freed in deinit;
    // pthread objects must not move, so they live behind these pointers.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Call with the lock held.
    func signal() { pthread_cond_signal(condition) }
    /// Call with the lock held.
    func broadcast() { pthread_cond_broadcast(condition) }

    /// Waits (lock held) for a signal or the monotonic `deadline`.
    /// - Returns: false when the deadline passed.
    func wait(until deadline: timespec) -> Bool {
        var deadline = deadline
        return pthread_cond_timedwait(condition, mutex, &deadline) != ETIMEDOUT
    }

    static func deadline(afterSeconds seconds: Int) -> timespec {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        now.tv_sec += seconds
        return now
    }
}
