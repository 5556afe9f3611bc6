import CSystemShim
import Glibc

/// A file written only at its end: a journal of records, each appended with
/// one write(2) and made durable by `makeDurable()` on what `append`
/// answered (fdatasync, shared by the threads waiting at once: group
/// commit). The descriptor is closed when the last reference goes, so a
/// thread may still make an append durable in a journal that another has
/// just replaced. The rules journal (gateway) and the prepared grants'
/// journal (Security Gateway) use it.
///
/// Appends from several threads must be serialized by the owner (records
/// must not interleave); waits may run on any thread at any time.
public final class AppendOnlyFile: Sendable {
    public let path: String
    private let fd: FileDescriptor
    /// Group commit (`sync(through:)`): appends are numbered; one fdatasync
    /// covers every append made before it started.
    private let durability = ConditionLock()
    private let progress = Progress()

    /// Guarded by `durability`.
    private final class Progress: @unchecked Sendable {
        var appended: UInt64 = 0
        var synced: UInt64 = 0
        var syncing = false
        /// The last fdatasync that failed, and the appends it was to cover.
        var failure: (through: UInt64, error: Errno)?
    }

    /// Opens `path` for appending, creating it with `mode` (exactly, whatever
    /// the umask) when missing.
    /// - Throws: `Errno` (the caller names the path).
    public init(path: String, mode: UInt32 = 0o600) throws(Errno) {
        let raw = try Syscall.run { Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, mode_t(mode)) }
        do throws(Errno) {
            _ = try Syscall.run { fchmod(raw, mode_t(mode)) }
        } catch {
            _ = Glibc.close(raw)
            throw error
        }
        self.path = path
        fd = FileDescriptor(rawValue: raw)
    }

    deinit { fd.close() }

    /// One append, to be made durable with `makeDurable()`.
    public struct Appended: Sendable {
        public let file: AppendOnlyFile
        public let sequence: UInt64

        /// Waits until this append (and every one before it) is durable; see `sync(through:)`.
        public func makeDurable() throws(Errno) { try file.sync(through: sequence) }
    }

    /// Appends `bytes` at the end of the file with one write (page cache; not
    /// yet durable): `makeDurable()` on the answer waits for it.
    /// - Throws: `Errno` (ENOSPC, EIO, ...); part of the bytes may have been written.
    public func append(_ bytes: [UInt8]) throws(Errno) -> Appended {
        try fd.writeAll(bytes)
        let sequence = durability.withLock {
            progress.appended += 1
            return progress.appended
        }
        return Appended(file: self, sequence: sequence)
    }

    /// Makes the appends up to number `sequence` durable. Threads waiting at
    /// once share one fdatasync (group commit): while one syncs, the others
    /// wait for it, and are done when it covered their append.
    /// - Throws: `Errno` of the fdatasync that was to cover `sequence`.
    public func sync(through sequence: UInt64) throws(Errno) {
        BlockingCallCheck.check("fdatasync of \(path)")
        while true {
            enum Next { case done, failed(Errno), wait, sync(UInt64) }
            let next: Next = durability.withLock {
                if progress.synced >= sequence { return .done }
                if let failure = progress.failure, failure.through >= sequence { return .failed(failure.error) }
                if progress.syncing {
                    _ = durability.wait(until: ConditionLock.deadline(afterSeconds: 1))
                    return .wait
                }
                progress.syncing = true
                return .sync(progress.appended)
            }
            switch next {
            case .done: return
            case .failed(let error): throw error
            case .wait: continue
            case .sync(let target):
                let failed: Errno? = fdatasync(fd.rawValue) == 0 ? nil : Errno.current
                durability.withLock {
                    progress.syncing = false
                    if let failed {
                        if failed != .interrupted { progress.failure = (target, failed) }
                    } else {
                        progress.synced = max(progress.synced, target)
                    }
                    durability.broadcast()
                }
                if let failed, failed != .interrupted { throw failed }
            }
        }
    }
}
