import CSystemd
import Glibc

/// The service manager's side channels, through libsystemd: readiness and
/// watchdog notifications (`sd_notify`), socket activation
/// (`sd_listen_fds`) and the journal (`sd_journal_sendv`). Each call is a
/// no-op returning `false` when the process does not run under systemd
/// (no `NOTIFY_SOCKET`, no journal).
public enum Systemd {
    /// Sends `state` (newline-separated `KEY=value` assignments, such as
    /// `READY=1\nSTATUS=...`) to the service manager.
    /// - Returns: whether a manager was there to receive it.
    @discardableResult
    public static func notify(_ state: String) -> Bool {
        sd_notify(0, state) > 0
    }

    /// Waits (up to `timeoutMicroseconds`) until the service manager has
    /// read every notification sent before (`sd_notify_barrier`): a process
    /// that said MAINPID= of its successor exits only once that is known,
    /// or systemd could take its exit for the service's end.
    /// - Returns: whether the barrier was passed.
    @discardableResult
    public static func notifyBarrier(timeoutMicroseconds: UInt64 = 5_000_000) -> Bool {
        guard notifySocket != nil else { return false }
        BlockingCallCheck.check("sd_notify_barrier")
        return sd_notify_barrier(0, timeoutMicroseconds) >= 0
    }

    /// Whether `NOTIFY_SOCKET` names a manager to notify.
    public static var notifySocket: String? {
        getenv("NOTIFY_SOCKET").map { String(cString: $0) }
    }

    /// The watchdog interval systemd expects pings within (`WatchdogSec=`),
    /// in microseconds; nil when the watchdog is off for this process.
    public static var watchdogMicroseconds: UInt64? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return usec
    }

    /// A socket systemd passed (socket activation), with the name its
    /// `FileDescriptorName=` gave it (or "unknown").
    public struct PassedSocket: Sendable {
        public let fd: FileDescriptor
        public let name: String
    }

    /// The sockets systemd passed to this process (`LISTEN_FDS`, from fd 3 on),
    /// each made close-on-exec; the variables are unset so children do not
    /// inherit them. Empty without socket activation.
    /// - Throws: `Errno` when the variables are malformed.
    public static func passedSockets() throws(Errno) -> [PassedSocket] {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
        let n = sd_listen_fds_with_names(1, &names)
        if n < 0 { throw Errno(rawValue: -n) }
        defer {
            if let names {
                var i = 0
                while let name = names[i] { free(name); i += 1 }
                free(names)
            }
        }
        var found: [PassedSocket] = []
        for i in 0..<Int(n) {
            let raw = SD_LISTEN_FDS_START + Int32(i)
            let name = names?[i].map { String(cString: $0) } ?? "unknown"
            found.append(PassedSocket(fd: FileDescriptor(rawValue: raw), name: name))
        }
        return found
    }

    /// Whether stderr is connected to the journal (systemd sets
    /// `JOURNAL_STREAM` to the device and inode of the stream it gave the
    /// service; a redirected stderr no longer matches).
    public static var stderrIsJournal: Bool {
        guard let value = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var info = stat()
        guard fstat(2, &info) == 0 else { return false }
        return UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }

    /// Writes one journal entry with `fields` (`MESSAGE`, `PRIORITY`,
    /// `SESSION_ID`, ...; names upper case, as journald requires).
    /// - Returns: false when the journal did not take it.
    @discardableResult
    public static func journal(_ fields: [(String, String)]) -> Bool {
        let strings = fields.map { Array("\($0.0)=\($0.1)".utf8) }
        var buffers: [UnsafeMutableRawPointer] = []
        defer { buffers.forEach { $0.deallocate() } }
        var vectors: [iovec] = []
        vectors.reserveCapacity(strings.count)
        for bytes in strings {
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 1)
            bytes.withUnsafeBytes { source in
                if let base = source.baseAddress { buffer.copyMemory(from: base, byteCount: source.count) }
            }
            buffers.append(buffer)
            vectors.append(iovec(iov_base: buffer, iov_len: bytes.count))
        }
        return vectors.withUnsafeBufferPointer { sd_journal_sendv($0.baseAddress, Int32($0.count)) } == 0
    }
}
