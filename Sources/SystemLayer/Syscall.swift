import CSystemShim
import Glibc

/// The outcome of a non-blocking call: it did something, or it would have blocked.
///
/// Would-block is a value, not an error, because on a non-blocking descriptor
/// it is the normal way for a call to end.
public enum IOResult<Value>: Equatable where Value: Equatable {
    case done(Value)
    case wouldBlock
}

extension IOResult: Sendable where Value: Sendable {}

/// The single choke point through which every system call of this package
/// passes: EINTR is retried here and nowhere else, EAGAIN becomes
/// `.wouldBlock`, and any other failure is thrown as an `Errno`.
@usableFromInline
enum Syscall {
    /// Runs `body` (which returns -1 and sets errno on failure) until it is not interrupted.
    /// - Returns: the call's non-negative result.
    /// - Throws: `Errno` for any failure other than EINTR.
    @inlinable @inline(__always)
    static func run<T: FixedWidthInteger>(_ body: () -> T) throws(Errno) -> T {
        while true {
            let result = body()
            if result >= 0 { return result }
            let err = Errno.current
            if err == .interrupted { continue }
            throw err
        }
    }

    /// Like `run`, but EAGAIN/EWOULDBLOCK is returned as `.wouldBlock`.
    @inlinable @inline(__always)
    static func nonBlocking<T: FixedWidthInteger>(_ body: () -> T) throws(Errno) -> IOResult<T> {
        while true {
            let result = body()
            if result >= 0 { return .done(result) }
            let err = Errno.current
            if err == .interrupted { continue }
            if err == .wouldBlock { return .wouldBlock }
            throw err
        }
    }
}
