import Glibc

/// When a journal's change is answered (`rules_sync`, the gateway's config):
/// once it is on the disk, or once it is written (the page cache) with the
/// disk's sync made by a background thread right after.
public enum JournalSync: String, Sendable, CaseIterable {
    /// fdatasync before the answer (concurrent changes share one): an
    /// answered change survives a crash of the process or of the machine.
    case eachChange = "each_change"
    /// The answer after the write; `BackgroundSync` makes it durable at once
    /// (one fdatasync for what was written meanwhile). An answered change
    /// survives a crash of the process (kill -9, a hot upgrade); a crash of
    /// the machine may lose what was answered during the last sync.
    case background
}

/// Makes journal appends durable on a thread of its own (`JournalSync.background`):
/// `request` returns at once, and the thread syncs every file with appends
/// requested, each with one fdatasync covering everything appended to it so
/// far, again and again until none is left. The thread ends after a second
/// without work and starts again at the next request. With a gathering
/// time, the thread waits that long after it finds work before it syncs, so
/// that one fdatasync covers the appends of that time (fewer syncs at a high
/// rate, each append durable that much later).
public final class BackgroundSync: Sendable {
    private let name: String
    private let gatherMicroseconds: UInt32
    private let onFailure: @Sendable (_ file: AppendOnlyFile, _ error: Errno) -> Void
    private let lock = ConditionLock()
    private let box = Box()

    /// Guarded by `lock`.
    private final class Box: @unchecked Sendable {
        /// The latest append requested per file not yet taken by the thread.
        var waiting: [ObjectIdentifier: AppendOnlyFile.Appended] = [:]
        var running = false
        var syncing = 0
    }

    /// - Parameters:
    ///   - name: the thread's name (up to 15 bytes show in `top -H`).
    ///   - gatherMicroseconds: how long the thread waits, once it has work,
    ///     before it syncs (0: at once).
    ///   - onFailure: called on the thread when an fdatasync fails, with the
    ///     file: the appends it was to cover are not known durable.
    public init(name: String, gatherMicroseconds: UInt32 = 0,
                onFailure: @escaping @Sendable (_ file: AppendOnlyFile, _ error: Errno) -> Void) {
        self.name = name
        self.gatherMicroseconds = gatherMicroseconds
        self.onFailure = onFailure
    }

    /// Asks for `appended` (and every earlier append to its file) to be made durable soon.
    public func request(_ appended: AppendOnlyFile.Appended) {
        let start: Bool = lock.withLock {
            let key = ObjectIdentifier(appended.file)
            if let known = box.waiting[key], known.sequence >= appended.sequence { return false }
            box.waiting[key] = appended
            lock.broadcast()
            if box.running { return false }
            box.running = true
            return true
        }
        guard start else { return }
        do throws(Errno) {
            try SystemThread.spawn(name: name) { [self] in run() }.detach()
        } catch {
            // No thread: sync here, as `JournalSync.eachChange` would.
            lock.withLock { box.running = false }
            drain()
        }
    }

    /// Requests not yet synced (waiting or being synced): 0 once everything
    /// requested is durable or has failed.
    public var outstanding: Int { lock.withLock { box.waiting.count + box.syncing } }

    /// Waits (blocking) until everything requested so far has been synced or
    /// has failed, up to `timeoutMilliseconds`: at a stop, so that a stopped
    /// service leaves nothing only in the page cache.
    /// - Returns: false at the deadline.
    @discardableResult
    public func flush(timeoutMilliseconds: Int = 30_000) -> Bool {
        if outstanding == 0 { return true }
        BlockingCallCheck.check("flush of \(name)")
        return BlockingWait.until(timeoutMilliseconds: timeoutMilliseconds) { outstanding == 0 }
    }

    private func run() {
        while true {
            let more: Bool = lock.withLock {
                if box.waiting.isEmpty { _ = lock.wait(until: ConditionLock.deadline(afterSeconds: 1)) }
                if box.waiting.isEmpty { box.running = false; return false }
                return true
            }
            if !more { return }
            if gatherMicroseconds > 0 { usleep(gatherMicroseconds) }
            drain()
        }
    }

    /// Syncs what is waiting now.
    private func drain() {
        let taken: [AppendOnlyFile.Appended] = lock.withLock {
            let all = Array(box.waiting.values)
            box.waiting = [:]
            box.syncing += all.count
            return all
        }
        for appended in taken {
            do throws(Errno) {
                try appended.makeDurable()
            } catch {
                onFailure(appended.file, error)
            }
            lock.withLock { box.syncing -= 1 }
        }
    }
}
