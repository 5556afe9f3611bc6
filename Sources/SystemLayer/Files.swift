import CSystemShim
import Glibc

/// Small blocking file operations for state that must survive a crash:
/// whole-file reads and atomic replacement.
public enum StateFile {
    /// Reads the whole file at `path` (at most `limit` bytes).
    /// - Returns: the bytes, or nil when the file does not exist.
    /// - Throws: `Errno` for any other failure, or EFBIG beyond `limit`.
    public static func read(_ path: String, limit: Int = 16 << 20) throws(Errno) -> [UInt8]? {
        BlockingCallCheck.check("read of \(path)")
        let raw = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        if raw < 0 {
            let err = Errno.current
            if err.rawValue == ENOENT { return nil }
            throw err
        }
        let fd = FileDescriptor(rawValue: raw)
        defer { fd.close() }
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = try Syscall.run { chunk.withUnsafeMutableBytes { Glibc.read(raw, $0.baseAddress, $0.count) } }
            if n == 0 { break }
            data.append(contentsOf: chunk[0..<n])
            if data.count > limit { throw Errno(rawValue: EFBIG) }
        }
        return data
    }

    /// Replaces the file at `path` with `bytes` atomically: writes a
    /// temporary file beside it with `mode`, fsyncs it, renames it over
    /// `path` and, when `durable`, fsyncs the directory so the rename
    /// survives a crash. A reader sees the old file or the new one, never a
    /// mix.
    /// - Throws: `Errno` naming nothing itself; the caller adds the path.
    /// - Parameter directoryOwner: when root writes the file, it gets the
    ///   owner and group of its directory (an operator's command as root
    ///   must not leave a file the service's own user cannot read).
    public static func writeAtomically(_ path: String, _ bytes: [UInt8], mode: UInt32 = 0o644,
                                       durable: Bool = true, directoryOwner: Bool = false) throws(Errno) {
        BlockingCallCheck.check("write\(durable ? " and fsync" : "") of \(path)")
        let temporary = path + ".tmp-\(getpid())"
        let raw = try Syscall.run { Glibc.open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode_t(mode)) }
        let fd = FileDescriptor(rawValue: raw)
        do throws(Errno) {
            // O_CREAT's mode is filtered by the umask; set it exactly.
            _ = try Syscall.run { fchmod(raw, mode_t(mode)) }
            if directoryOwner && geteuid() == 0 {
                let slash = path.lastIndex(of: "/")
                let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
                var info = stat()
                if stat(directory, &info) == 0 && (info.st_uid != 0 || info.st_gid != 0) {
                    _ = try Syscall.run { fchown(raw, info.st_uid, info.st_gid) }
                }
            }
            try fd.writeAll(bytes)
            if durable { _ = try Syscall.run { fsync(raw) } }
            fd.close()
        } catch {
            fd.close()
            _ = unlink(temporary)
            throw error
        }
        do throws(Errno) {
            _ = try Syscall.run { Glibc.rename(temporary, path) }
        } catch {
            _ = unlink(temporary)
            throw error
        }
        if durable { try syncDirectory(of: path) }
    }

    /// fsyncs the directory holding `path`, so a rename or create in it is durable.
    public static func syncDirectory(of path: String) throws(Errno) {
        BlockingCallCheck.check("fsync of the directory of \(path)")
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let raw = try Syscall.run { Glibc.open(directory.isEmpty ? "/" : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        defer { _ = Glibc.close(raw) }
        _ = try Syscall.run { fsync(raw) }
    }

    /// Renames `from` to `to` (same filesystem).
    public static func rename(_ from: String, to: String) throws(Errno) {
        _ = try Syscall.run { Glibc.rename(from, to) }
    }

    /// Removes a file; a missing file is not an error.
    public static func remove(_ path: String) {
        _ = unlink(path)
    }

    /// Creates `path` (and its parents) as directories with `mode` when missing.
    public static func makeDirectories(_ path: String, mode: UInt32 = 0o700) throws(Errno) {
        var current = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            current += "/" + part
            if mkdir(current, mode_t(mode)) != 0 {
                let err = Errno.current
                if err.rawValue != EEXIST { throw err }
            }
        }
    }

    /// The permission bits of `path`, or nil when it cannot be read.
    public static func mode(_ path: String) -> UInt32? {
        var info = Glibc.stat()
        guard Glibc.lstat(path, &info) == 0 else { return nil }
        return UInt32(info.st_mode) & 0o7777
    }
}

extension ProcessSignal {
    /// Sends `signal` to process `pid`.
    /// - Returns: false when no such process exists or it may not be signalled.
    public static func send(_ signal: ProcessSignal, to pid: Int32) -> Bool {
        Glibc.kill(pid, signal.rawValue) == 0
    }

    /// True when process `pid` exists (signal 0 probe).
    public static func processExists(_ pid: Int32) -> Bool {
        pid > 0 && (Glibc.kill(pid, 0) == 0 || Errno.current.rawValue == EPERM)
    }
}

extension Socket {
    /// Binds an unconnected socket to a local `address` (a client choosing its
    /// source address before connect).
    /// - Throws: `SystemCallError` naming the address.
    public static func bind(_ fd: FileDescriptor, to address: SocketAddress) throws(SystemCallError) {
        do {
            _ = try Syscall.run { address.withSockAddr { Glibc.bind(fd.rawValue, $0, $1) } }
        } catch {
            throw SystemCallError("bind", error, context: "to \(address)")
        }
    }
}

extension SystemInfo {
    /// The addresses of this host's network interfaces (getifaddrs), IPv4 and IPv6.
    public static func interfaceAddresses() -> [IPAddress] {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return [] }
        defer { freeifaddrs(list) }
        var found: [IPAddress] = []
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = cursor {
            // Safe: getifaddrs filled a linked list that stays valid until freeifaddrs;
            // ifa_addr points at a sockaddr of the family it declares.
            if let address = entry.pointee.ifa_addr {
                let family = Int32(address.pointee.sa_family)
                if family == AF_INET || family == AF_INET6,
                   let socketAddress = SocketAddress(sockaddr: UnsafePointer(address),
                                                     length: socklen_t(family == AF_INET ? MemoryLayout<sockaddr_in>.size : MemoryLayout<sockaddr_in6>.size)) {
                    found.append(socketAddress.ip.unmapped)
                }
            }
            cursor = entry.pointee.ifa_next
        }
        return Array(Set(found))
    }
}

/// An exclusive advisory lock (`flock`) on a file, held while the value
/// lives and released when it is freed or the process ends (a crash
/// included: the kernel drops it with the descriptor). The holder's pid is
/// written in the file, for the message of whoever finds it held.
public final class ExclusiveFileLock: Sendable {
    public let path: String
    private let descriptor: FileDescriptor

    private init(path: String, descriptor: FileDescriptor) {
        self.path = path
        self.descriptor = descriptor
    }

    deinit { descriptor.close() }

    /// What `acquire` found.
    public enum Outcome: Sendable {
        case acquired(ExclusiveFileLock)
        /// Another open of the file holds it: another process, or another
        /// lock of this one. `pid` is what the holder wrote, when readable.
        case held(pid: Int32?)
    }

    /// Creates `path` (mode 0600) if missing and takes its lock without waiting.
    /// - Throws: `Errno` when the file cannot be opened or locked for another reason.
    public static func acquire(_ path: String) throws(Errno) -> Outcome {
        let descriptor = FileDescriptor(rawValue: try Syscall.run { Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600) })
        let locked: IOResult<Int32>
        do {
            locked = try Syscall.nonBlocking { shim_flock_exclusive_nonblocking(descriptor.rawValue) }
        } catch {
            descriptor.close()
            throw error
        }
        guard case .done = locked else {
            defer { descriptor.close() }
            return .held(pid: holder(of: descriptor))
        }
        // Fresh open: the offset is 0, so the pid replaces what an earlier holder wrote.
        _ = Glibc.ftruncate(descriptor.rawValue, 0)
        try? descriptor.writeAll(Array("\(getpid())\n".utf8))
        return .acquired(ExclusiveFileLock(path: path, descriptor: descriptor))
    }

    private static func holder(of descriptor: FileDescriptor) -> Int32? {
        var bytes = [UInt8](repeating: 0, count: 16)
        let count = bytes.withUnsafeMutableBytes { Glibc.pread(descriptor.rawValue, $0.baseAddress, $0.count, 0) }
        guard count > 0 else { return nil }
        return Int32(String(decoding: bytes[..<count].prefix { $0 >= 0x30 && $0 <= 0x39 }, as: UTF8.self))
    }
}
