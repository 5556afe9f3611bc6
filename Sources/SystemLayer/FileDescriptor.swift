import CSystemShim
import Glibc

/// An open file descriptor. A plain value: whoever holds it closes it once.
public struct FileDescriptor: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32

    public init(rawValue: Int32) { self.rawValue = rawValue }

    public var description: String { "fd \(rawValue)" }

    /// Closes the descriptor. EINTR is not retried: on Linux the descriptor is
    /// released even when close(2) is interrupted, and retrying could close a
    /// descriptor another thread just opened.
    public func close() {
        _ = Glibc.close(rawValue)
    }

    /// Reads into `buffer`.
    /// - Returns: `.done(0)` at end of file, `.done(n)` bytes read, or `.wouldBlock`.
    /// - Throws: `Errno` (e.g. ECONNRESET).
    @inlinable
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> IOResult<Int> {
        try Syscall.nonBlocking { Glibc.read(rawValue, buffer.baseAddress, buffer.count) }
    }

    /// Writes from `buffer`.
    /// - Returns: `.done(n)` bytes written (possibly fewer than asked), or `.wouldBlock`.
    /// - Throws: `Errno` (e.g. EPIPE, ECONNRESET).
    @inlinable
    public func write(_ buffer: UnsafeRawBufferPointer) throws(Errno) -> IOResult<Int> {
        try Syscall.nonBlocking { Glibc.write(rawValue, buffer.baseAddress, buffer.count) }
    }

    /// Writes all of `bytes`, for control-plane use on blocking descriptors.
    public func writeAll(_ bytes: [UInt8]) throws(Errno) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                Glibc.write(rawValue, raw.baseAddress! + offset, raw.count - offset)
            }
            if n >= 0 { offset += n; continue }
            let err = Errno.current
            if err != .interrupted { throw err }
        }
    }

    /// Opens a path read-only with O_CLOEXEC (used to hold a reserve descriptor).
    public static func openReadOnly(_ path: String) throws(Errno) -> FileDescriptor {
        let fd = try Syscall.run { Glibc.open(path, O_RDONLY | O_CLOEXEC) }
        return FileDescriptor(rawValue: fd)
    }
}

/// Process-wide resource figures used by admission control and tests.
public enum ProcessResources {
    /// The soft limit on open files (RLIMIT_NOFILE).
    public static var openFilesLimit: Int { Int(shim_open_files_limit()) }

    /// Sets the soft limit on open files.
    /// - Throws: `Errno` when the limit cannot be set (e.g. above the hard limit).
    public static func setOpenFilesLimit(_ limit: Int) throws(Errno) {
        _ = try Syscall.run { shim_set_open_files_limit(limit) }
    }

    /// The number of descriptors this process holds now, from /proc/self/fd.
    public static func openFileCount() -> Int {
        guard let dir = opendir("/proc/self/fd") else { return -1 }
        defer { closedir(dir) }
        var count = 0
        while readdir(dir) != nil { count += 1 }
        return count - 3 // ".", ".." and the directory's own descriptor
    }

    /// Resident set size in bytes, from /proc/self/statm.
    public static func residentBytes() -> Int {
        guard let file = fopen("/proc/self/statm", "r") else { return -1 }
        defer { fclose(file) }
        var size = 0, resident = 0
        guard withUnsafeMutablePointer(to: &size, { s in
            withUnsafeMutablePointer(to: &resident) { r in
                withVaList([s, r]) { vfscanf(file, "%ld %ld", $0) }
            }
        }) == 2 else { return -1 }
        return resident * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}

/// The monotonic clock, in nanoseconds.
public enum MonotonicClock {
    @inlinable
    public static var nowNanoseconds: UInt64 { shim_monotonic_ns() }
}

/// Facts about the machine.
public enum SystemInfo {
    public static var onlineCores: Int { Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) }
}

extension SystemInfo {
    public static var processID: Int32 { getpid() }
}

/// Unbuffered writes to the standard streams, safe from any thread.
public enum StandardStreams {
    public static func writeError(_ text: String) {
        try? FileDescriptor(rawValue: 2).writeAll(Array(text.utf8))
    }

    public static func writeOutput(_ text: String) {
        try? FileDescriptor(rawValue: 1).writeAll(Array(text.utf8))
    }
}
