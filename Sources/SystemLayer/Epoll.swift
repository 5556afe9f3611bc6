import CSystemShim
import Glibc

/// The readiness bits of an epoll event.
public struct EpollEvents: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let readable = EpollEvents(rawValue: SHIM_EPOLLIN)
    public static let writable = EpollEvents(rawValue: SHIM_EPOLLOUT)
    public static let error = EpollEvents(rawValue: SHIM_EPOLLERR)
    public static let hangUp = EpollEvents(rawValue: SHIM_EPOLLHUP)
    public static let readHangUp = EpollEvents(rawValue: SHIM_EPOLLRDHUP)
    public static let edgeTriggered = EpollEvents(rawValue: SHIM_EPOLLET)
}

/// An epoll instance. Owned by one event loop; not thread-safe by design.
public struct Epoll: ~Copyable {
    public let fd: FileDescriptor
    private let events: UnsafeMutablePointer<UInt32>
    private let data: UnsafeMutablePointer<UInt64>
    public let batchSize: Int

    /// Creates the epoll descriptor and the buffers for `batchSize` events (at most 256).
    /// - Throws: `Errno`.
    public init(batchSize: Int = 256) throws(Errno) {
        fd = FileDescriptor(rawValue: try Syscall.run { shim_epoll_create() })
        self.batchSize = min(batchSize, 256)
        events = .allocate(capacity: self.batchSize)
        data = .allocate(capacity: self.batchSize)
    }

    deinit {
        events.deallocate()
        data.deallocate()
        fd.close()
    }

    /// Registers `target` for `interest`, tagging its events with `token`.
    public func add(_ target: FileDescriptor, interest: EpollEvents, token: UInt64) throws(Errno) {
        _ = try Syscall.run { shim_epoll_ctl(fd.rawValue, SHIM_EPOLL_CTL_ADD, target.rawValue, interest.rawValue, token) }
    }

    /// Changes the interest of a registered descriptor.
    public func modify(_ target: FileDescriptor, interest: EpollEvents, token: UInt64) throws(Errno) {
        _ = try Syscall.run { shim_epoll_ctl(fd.rawValue, SHIM_EPOLL_CTL_MOD, target.rawValue, interest.rawValue, token) }
    }

    /// Removes a descriptor (closing it also removes it).
    public func remove(_ target: FileDescriptor) {
        _ = shim_epoll_ctl(fd.rawValue, SHIM_EPOLL_CTL_DEL, target.rawValue, 0, 0)
    }

    /// Waits up to `timeoutMilliseconds` (-1 = forever) and calls `body` for each event.
    /// - Returns: the number of events.
    /// - Throws: `Errno` other than EINTR (which returns 0).
    public func wait(timeoutMilliseconds: Int32, _ body: (UInt64, EpollEvents) -> Void) throws(Errno) -> Int {
        let n = shim_epoll_wait(fd.rawValue, events, data, Int32(batchSize), timeoutMilliseconds)
        if n < 0 {
            let err = Errno.current
            if err == .interrupted { return 0 }
            throw err
        }
        for i in 0..<Int(n) { body(data[i], EpollEvents(rawValue: events[i])) }
        return Int(n)
    }
}

/// An eventfd used to wake an event loop from another thread.
public struct EventFD: Sendable {
    public let fd: FileDescriptor

    /// - Throws: `Errno`.
    public init() throws(Errno) {
        fd = FileDescriptor(rawValue: try Syscall.run { shim_eventfd(0) })
    }

    /// Adds one to the counter, waking a waiter. Never blocks (the counter cannot overflow in practice).
    public func signal() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(fd.rawValue, $0.baseAddress, 8) }
    }

    /// Resets the counter.
    public func drain() {
        var value: UInt64 = 0
        _ = withUnsafeMutableBytes(of: &value) { Glibc.read(fd.rawValue, $0.baseAddress, 8) }
    }

    public func close() { fd.close() }
}
