import CSystemShim
import Glibc
import Synchronization

/// A file written only at its end: a journal of records, each appended with
/// one write(2) and made durable by `makeDurable()` on what `append`
/// answered (fdatasync, shared by the threads waiting at once: group
/// commit). The descriptor is closed when the last reference goes, so a
/// thread may still make an append durable in a journal that another has
/// just replaced. The rules journal (gateway) and the prepared grants'
/// journal (Security Gateway) use it.
///
/// The file is filled with zeros ahead of the records (64 KiB at a time),
/// and records overwrite them: an
/// fdatasync of bytes written inside the file need not also write its
/// inode, as one that grows the file must (on this machine's disk: -30 %
/// latency and -38 % CPU per synced append, measured). So a journal's
/// records are its bytes before the first zero byte (`records(in:)`);
/// records never hold one (they are text). Whatever follows a zero byte
/// was never made durable, so a crash cannot have acknowledged it. A file
/// this type creates has its directory entry made durable with the first
/// sync.
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
    /// Where the next record goes, and how far zeros are written ahead of it.
    private let space: Mutex<Space>

    private struct Space {
        var end: Int
        var filled: Int
    }

    /// Guarded by `durability`.
    private final class Progress: @unchecked Sendable {
        var appended: UInt64 = 0
        var synced: UInt64 = 0
        var syncing = false
        /// The last fdatasync that failed, and the appends it was to cover.
        var failure: (through: UInt64, error: Errno)?
        /// The file was created by this instance: its directory entry is
        /// made durable by the first sync.
        var directoryUnsynced = false
    }

    /// The zeros written ahead of the records at a time. The fdatasync after
    /// a fill writes them and the inode: 64 KiB keeps that one sync short
    /// (larger fills made it a stall of milliseconds for the whole group),
    /// and it comes once per few hundred records instead of at every one.
    static let fillStep = 64 << 10

    /// Opens `path` for appending after its last record, creating it with
    /// `mode` (exactly, whatever the umask) when missing.
    /// - Throws: `Errno` (the caller names the path).
    public init(path: String, mode: UInt32 = 0o600) throws(Errno) {
        var created = true
        var raw = Glibc.open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode_t(mode))
        if raw < 0 && errno == EEXIST {
            created = false
            raw = Glibc.open(path, O_RDWR | O_CLOEXEC)
        }
        if raw < 0 { throw Errno.current }
        let end: Int, size: Int
        do throws(Errno) {
            _ = try Syscall.run { fchmod(raw, mode_t(mode)) }
            var info = stat()
            _ = try Syscall.run { fstat(raw, &info) }
            size = Int(info.st_size)
            end = try Self.endOfRecords(raw, size: size)
        } catch {
            _ = Glibc.close(raw)
            throw error
        }
        self.path = path
        fd = FileDescriptor(rawValue: raw)
        space = Mutex(Space(end: end, filled: size))
        progress.directoryUnsynced = created
    }

    deinit { fd.close() }

    /// The records in a journal file's bytes: those before its first zero
    /// byte (the rest is space filled ahead of the appends).
    public static func records(in bytes: [UInt8]) -> ArraySlice<UInt8> {
        bytes[..<(bytes.firstIndex(of: 0) ?? bytes.endIndex)]
    }

    /// Where the records of an existing file end: after its last byte that
    /// is not zero (read backwards, 64 KiB at a time).
    private static func endOfRecords(_ raw: Int32, size: Int) throws(Errno) -> Int {
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        var upTo = size
        while upTo > 0 {
            let start = max(0, upTo - chunk.count)
            var got = 0
            while got < upTo - start {
                let n = try Syscall.run {
                    chunk.withUnsafeMutableBytes { pread(raw, $0.baseAddress! + got, upTo - start - got, off_t(start + got)) }
                }
                if n == 0 { return upTo }   // shorter than fstat said: a concurrent truncation, take what is there
                got += n
            }
            if let last = chunk[0..<got].lastIndex(where: { $0 != 0 }) { return start + last + 1 }
            upTo = start
        }
        return 0
    }

    /// Writes `bytes[..<count]` at `offset`.
    private func write(_ bytes: [UInt8], count: Int, at offset: Int) throws(Errno) {
        let failure: Errno? = bytes.withUnsafeBytes { raw in
            var done = 0
            while done < count {
                let n = pwrite(fd.rawValue, raw.baseAddress! + done, count - done, off_t(offset + done))
                if n >= 0 { done += n; continue }
                let err = Errno.current
                if err != .interrupted { return err }
            }
            return nil
        }
        if let failure { throw failure }
    }

    /// One page of zeros, the source of every fill: `pwritev` repeats it, so
    /// filling takes no buffer of the fill's size (a large allocation freed would
    /// also raise glibc's mmap threshold and stay in the heap). Never written.
    nonisolated(unsafe) private static let zeroPage = UnsafeRawPointer(calloc(1, 4096)!)

    /// Fills zeros after `s.filled` so that at least `needed` bytes are
    /// filled. Best effort: where it fails (a full disk), the record's own
    /// write grows the file instead.
    private func fill(_ s: inout Space, toHold needed: Int) {
        let target = (max(needed, s.filled + Self.fillStep) + 4095) & ~4095
        // s.filled is a multiple of 4096 unless the file was written whole
        // elsewhere (a snapshot): the first iovec then ends at a page boundary.
        var vectors: [iovec] = []
        vectors.reserveCapacity(256)
        while s.filled < target {
            vectors.removeAll(keepingCapacity: true)
            var planned = 0
            while vectors.count < 256 && s.filled + planned < target {
                let length = min(4096 - (s.filled + planned) % 4096, target - s.filled - planned)
                vectors.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: Self.zeroPage), iov_len: length))
                planned += length
            }
            let written = vectors.withUnsafeBufferPointer { pwritev(fd.rawValue, $0.baseAddress, Int32($0.count), off_t(s.filled)) }
            if written < 0 && errno == EINTR { continue }
            guard written > 0 else { return }
            s.filled += written
        }
    }

    /// One append, to be made durable with `makeDurable()`.
    public struct Appended: Sendable {
        public let file: AppendOnlyFile
        public let sequence: UInt64

        /// Waits until this append (and every one before it) is durable; see `sync(through:)`.
        public func makeDurable() throws(Errno) { try file.sync(through: sequence) }
    }

    /// Appends `bytes` (which must hold no zero byte) after the last record
    /// with one write (page cache; not yet durable): `makeDurable()` on the
    /// answer waits for it.
    /// - Throws: `Errno` (ENOSPC, EIO, ...); part of the bytes may have been
    ///   written, and the next append starts where this one did.
    public func append(_ bytes: [UInt8]) throws(Errno) -> Appended {
        try space.withLock { s throws(Errno) in
            if s.end + bytes.count > s.filled { fill(&s, toHold: s.end + bytes.count) }
            try write(bytes, count: bytes.count, at: s.end)
            s.end += bytes.count
            s.filled = max(s.filled, s.end)
        }
        let sequence = durability.withLock {
            progress.appended += 1
            return progress.appended
        }
        return Appended(file: self, sequence: sequence)
    }

    /// The number of the last append known durable (0: none yet).
    public var syncedThrough: UInt64 { durability.withLock { progress.synced } }

    /// Makes the appends up to number `sequence` durable. Threads waiting at
    /// once share one fdatasync (group commit): while one syncs, the others
    /// wait for it, and are done when it covered their append.
    /// - Throws: `Errno` of the fdatasync that was to cover `sequence`.
    public func sync(through sequence: UInt64) throws(Errno) {
        BlockingCallCheck.check("fdatasync of \(path)")
        while true {
            enum Next { case done, failed(Errno), wait, sync(UInt64, directory: Bool) }
            let next: Next = durability.withLock {
                if progress.synced >= sequence { return .done }
                if let failure = progress.failure, failure.through >= sequence { return .failed(failure.error) }
                if progress.syncing {
                    _ = durability.wait(until: ConditionLock.deadline(afterSeconds: 1))
                    return .wait
                }
                progress.syncing = true
                return .sync(progress.appended, directory: progress.directoryUnsynced)
            }
            switch next {
            case .done: return
            case .failed(let error): throw error
            case .wait: continue
            case .sync(let target, let directory):
                var failed: Errno? = fdatasync(fd.rawValue) == 0 ? nil : Errno.current
                if failed == nil && directory {
                    do throws(Errno) { try StateFile.syncDirectory(of: path) } catch { failed = error }
                }
                durability.withLock {
                    progress.syncing = false
                    if directory && failed == nil { progress.directoryUnsynced = false }
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
