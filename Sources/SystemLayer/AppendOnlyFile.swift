import CSystemShim
import Glibc

/// A file written only at its end: a journal of records, each appended with
/// one write(2) and made durable by `sync()` (fdatasync). The descriptor is
/// closed when the last reference goes, so a thread may still `sync()` a
/// journal that another has just replaced.
///
/// Appends from several threads must be serialized by the owner (records
/// must not interleave); `sync()` may run on any thread at any time.
public final class AppendOnlyFile: Sendable {
    public let path: String
    private let fd: FileDescriptor

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

    /// Appends `bytes` at the end of the file (page cache; not yet durable).
    /// - Throws: `Errno` (ENOSPC, EIO, ...); part of the bytes may have been written.
    public func append(_ bytes: [UInt8]) throws(Errno) {
        try fd.writeAll(bytes)
    }

    /// Makes every byte appended so far durable (fdatasync).
    /// - Throws: `Errno` (EIO, ...).
    public func sync() throws(Errno) {
        BlockingCallCheck.check("fdatasync of \(path)")
        _ = try Syscall.run { fdatasync(fd.rawValue) }
    }
}
