import CSystemShim
import Glibc

/// An `errno` value with a readable name, thrown by every failing system call.
public struct Errno: Error, Equatable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32

    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// The calling thread's current `errno`.
    public static var current: Errno { Errno(rawValue: shim_errno()) }

    public static let interrupted = Errno(rawValue: EINTR)
    public static let wouldBlock = Errno(rawValue: EAGAIN)
    public static let inProgress = Errno(rawValue: EINPROGRESS)
    public static let addressInUse = Errno(rawValue: EADDRINUSE)
    public static let addressNotAvailable = Errno(rawValue: EADDRNOTAVAIL)
    public static let connectionRefused = Errno(rawValue: ECONNREFUSED)
    public static let connectionReset = Errno(rawValue: ECONNRESET)
    public static let connectionAborted = Errno(rawValue: ECONNABORTED)
    public static let timedOut = Errno(rawValue: ETIMEDOUT)
    public static let brokenPipe = Errno(rawValue: EPIPE)
    public static let tooManyOpenFiles = Errno(rawValue: EMFILE)
    public static let tooManyOpenFilesInSystem = Errno(rawValue: ENFILE)
    public static let noBufferSpace = Errno(rawValue: ENOBUFS)
    public static let outOfMemory = Errno(rawValue: ENOMEM)
    public static let invalidArgument = Errno(rawValue: EINVAL)
    public static let notSupported = Errno(rawValue: ENOSYS)
    public static let badFileDescriptor = Errno(rawValue: EBADF)
    public static let hostUnreachable = Errno(rawValue: EHOSTUNREACH)
    public static let networkUnreachable = Errno(rawValue: ENETUNREACH)
    public static let permissionDenied = Errno(rawValue: EACCES)
    public static let messageTooLong = Errno(rawValue: EMSGSIZE)
    public static let noChild = Errno(rawValue: ECHILD)

    /// True for EMFILE and ENFILE: the process or system ran out of descriptors.
    public var isDescriptorExhaustion: Bool { self == .tooManyOpenFiles || self == .tooManyOpenFilesInSystem }

    /// The symbolic name and the C library's message, e.g. `ECONNREFUSED (Connection refused)`.
    public var description: String {
        let message = String(cString: strerror(rawValue))
        return "\(symbol) (\(message))"
    }

    /// The symbolic name, e.g. `ECONNREFUSED`.
    public var symbol: String {
        switch rawValue {
        case EINTR: "EINTR"
        case EAGAIN: "EAGAIN"
        case EINPROGRESS: "EINPROGRESS"
        case EADDRINUSE: "EADDRINUSE"
        case EADDRNOTAVAIL: "EADDRNOTAVAIL"
        case ECONNREFUSED: "ECONNREFUSED"
        case ECONNRESET: "ECONNRESET"
        case ECONNABORTED: "ECONNABORTED"
        case ETIMEDOUT: "ETIMEDOUT"
        case EPIPE: "EPIPE"
        case EMFILE: "EMFILE"
        case ENFILE: "ENFILE"
        case ENOBUFS: "ENOBUFS"
        case ENOMEM: "ENOMEM"
        case EINVAL: "EINVAL"
        case ENOSYS: "ENOSYS"
        case EBADF: "EBADF"
        case EHOSTUNREACH: "EHOSTUNREACH"
        case ENETUNREACH: "ENETUNREACH"
        case EACCES: "EACCES"
        case EMSGSIZE: "EMSGSIZE"
        case ECHILD: "ECHILD"
        case EPERM: "EPERM"
        case ENOENT: "ENOENT"
        default: "errno \(rawValue)"
        }
    }
}

/// An error from a system call, naming the call and, where it matters, what it acted on.
public struct SystemCallError: Error, Equatable, Sendable, CustomStringConvertible {
    public let call: String
    public let errno: Errno
    public let context: String?

    public init(_ call: String, _ errno: Errno, context: String? = nil) {
        self.call = call
        self.errno = errno
        self.context = context
    }

    public var description: String {
        if let context { return "\(call) \(context): \(errno)" }
        return "\(call): \(errno)"
    }
}
