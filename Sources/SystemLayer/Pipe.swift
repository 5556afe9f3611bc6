import CSystemShim
import Glibc

/// A kernel pipe used as the zero-copy buffer between two sockets.
public struct Pipe: Sendable {
    public let readEnd: FileDescriptor
    public let writeEnd: FileDescriptor
    /// The pipe's capacity in bytes, as the kernel granted it.
    public let capacity: Int

    /// A pipe whose ends came from elsewhere (handed over by a predecessor).
    public init(readEnd: FileDescriptor, writeEnd: FileDescriptor, capacity: Int) {
        self.readEnd = readEnd
        self.writeEnd = writeEnd
        self.capacity = capacity
    }

    /// Creates a non-blocking pipe and asks for `size` bytes of capacity.
    /// The kernel may grant less (e.g. when the user's pipe quota is spent);
    /// `capacity` says what it granted.
    /// - Throws: `Errno` (EMFILE/ENFILE when out of descriptors).
    public static func make(size: Int) throws(Errno) -> Pipe {
        var fds: [Int32] = [0, 0]
        _ = try Syscall.run { shim_pipe2(&fds) }
        if size > 0 { _ = shim_set_pipe_size(fds[1], Int32(size)) }
        let capacity = Int(shim_get_pipe_size(fds[1]))
        return Pipe(readEnd: FileDescriptor(rawValue: fds[0]), writeEnd: FileDescriptor(rawValue: fds[1]),
                    capacity: capacity > 0 ? capacity : 65536)
    }

    public func close() {
        readEnd.close()
        writeEnd.close()
    }
}

/// splice(2) with SPLICE_F_MOVE | SPLICE_F_NONBLOCK.
public enum Splice {
    /// Moves up to `maxBytes` from `source` to `destination`, one of which must be a pipe.
    /// - Returns: `.done(0)` when the source is at end of file, `.done(n)` bytes
    ///   moved, or `.wouldBlock` (source empty or destination full: the caller
    ///   tells which from what the pipe holds).
    /// - Throws: `Errno`; EINVAL or ENOSYS mean splice cannot serve this pair
    ///   and the caller should copy instead.
    @inlinable
    public static func move(from source: FileDescriptor, to destination: FileDescriptor, maxBytes: Int) throws(Errno) -> IOResult<Int> {
        try Syscall.nonBlocking { shim_splice(source.rawValue, destination.rawValue, maxBytes) }
    }
}
