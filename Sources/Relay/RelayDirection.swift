import SystemLayer

/// What one direction of a relay can do with its source, its in-flight
/// buffer (a pipe, or memory when splice cannot be used) and its destination.
/// The socket implementation is `SocketDirectionIO`; tests drive the pump
/// with a scripted one, without sockets.
public protocol DirectionIO {
    /// Makes sure an in-flight buffer is held.
    /// - Returns: its capacity in bytes.
    mutating func acquireBuffer() -> Int
    /// Gives back the buffer; called only when it is empty.
    mutating func releaseBuffer()
    /// Moves up to `maxBytes` from the source into the buffer.
    /// - Returns: `.done(0)` at end of stream, `.done(n)`, or `.wouldBlock` (source empty).
    mutating func fill(maxBytes: Int) throws(Errno) -> IOResult<Int>
    /// Moves up to `maxBytes` from the buffer to the destination.
    /// - Returns: `.done(n)` or `.wouldBlock` (destination full).
    mutating func flush(maxBytes: Int) throws(Errno) -> IOResult<Int>
    /// Tells the destination that no more bytes will come (a FIN).
    mutating func finishDestination()
    /// The last `fill` took everything the source held at that moment (a
    /// read shorter than asked, with no hang-up announced): once those bytes
    /// are out, the pump may wait for the source's next readiness edge
    /// instead of reading again only to be told it would block.
    var sourceDrained: Bool { get }
}

extension DirectionIO {
    public var sourceDrained: Bool { false }
}

/// Where a direction stopped after a pump.
public enum PumpOutcome: Equatable, Sendable {
    /// The source had nothing more; wait for it to become readable.
    case waitingForSource
    /// The destination is full; wait for it to become writable. The source is
    /// not read meanwhile: that is the backpressure.
    case waitingForDestination
    /// The source ended and everything was delivered; the FIN was passed on.
    case finished
    /// Reading the source failed (e.g. the peer reset).
    case sourceFailed(Errno)
    /// Writing the destination failed.
    case destinationFailed(Errno)
}

/// One direction of a relay: a pure state machine over `DirectionIO`.
///
/// Invariant: the source is read only when the buffer is empty, so a
/// would-block from `fill` always means "source empty", never "buffer full";
/// with edge-triggered readiness, the pump therefore always stops at a point
/// where a later event (source readable, destination writable) will resume it.
/// A fill the IO reports as having drained the source (`sourceDrained`) ends
/// the pump once its bytes are delivered: the source's next bytes raise an
/// edge of their own.
public struct RelayDirection<IO: DirectionIO> {
    public var io: IO
    /// Bytes read from the source and not yet written to the destination.
    public private(set) var inFlight = 0
    /// Bytes delivered to the destination.
    public private(set) var delivered: UInt64 = 0
    public private(set) var sourceEnded = false
    public private(set) var finished = false

    public init(io: IO) { self.io = io }

    /// A direction carried over from a predecessor process (hot upgrade):
    /// `io` already holds the `inFlight` bytes.
    public init(io: IO, inFlight: Int, delivered: UInt64, sourceEnded: Bool, finished: Bool) {
        self.io = io
        self.inFlight = inFlight
        self.delivered = delivered
        self.sourceEnded = sourceEnded
        self.finished = finished
    }

    /// Moves bytes until the source is empty, the destination is full, the
    /// stream ended or a side failed.
    public mutating func pump() -> PumpOutcome {
        if finished { return .finished }
        var drained = false
        while true {
            while inFlight > 0 {
                let result: IOResult<Int>
                do { result = try io.flush(maxBytes: inFlight) } catch { return .destinationFailed(error) }
                guard case .done(let n) = result else { return .waitingForDestination }
                inFlight -= n
                delivered &+= UInt64(n)
            }
            if sourceEnded {
                io.releaseBuffer()
                io.finishDestination()
                finished = true
                return .finished
            }
            if drained {
                // The last read took all the source had: its next bytes (or
                // its FIN) raise an edge of their own, so no probe read.
                io.releaseBuffer()
                return .waitingForSource
            }
            let capacity = io.acquireBuffer()
            let result: IOResult<Int>
            do { result = try io.fill(maxBytes: capacity) } catch {
                io.releaseBuffer()
                return .sourceFailed(error)
            }
            switch result {
            case .done(0):
                sourceEnded = true
            case .done(let n):
                inFlight = n
                drained = io.sourceDrained
            case .wouldBlock:
                io.releaseBuffer()
                return .waitingForSource
            }
        }
    }
}

/// The in-flight buffer of one direction.
enum Carrier {
    case none
    case pipe(Pipe)
    case memory(UnsafeMutableRawBufferPointer, offset: Int, end: Int)
}

/// `DirectionIO` on two sockets: splice through a pooled pipe, or read/write
/// through memory when no pipe can be had or the kernel refuses to splice.
///
/// A direction starts by copying through a small buffer (`copyChunk`) and
/// moves to splice at its first read that fills it. A short exchange (a
/// request, an echo, an interactive session's keystrokes) then costs a read
/// and a write per message, where splice costs three calls (in, out, and a
/// probe that finds the socket empty): a read shorter than asked proves
/// the socket drained at that moment, a short splice does not (it also
/// stops when the pipe's slots run out). Bulk transfers splice, as before.
struct SocketDirectionIO: DirectionIO {
    let source: FileDescriptor
    let destination: FileDescriptor
    unowned let pool: PipePool
    var carrier: Carrier = .none
    /// Set once splice answered EINVAL/ENOSYS: copy from then on.
    var spliceUnsupported = false
    var fellBack = false
    /// The opposite direction has finished, so the connection closes right
    /// after this one ends and the explicit shutdown can be skipped.
    var closeFollows = false
    /// Copying through `copyChunk` until a read fills it; splice after that.
    var copying = true
    /// Set by the connection before each pump a readiness event of the
    /// source starts: the event announced no hang-up or error. A short read
    /// proves the socket drained only then (a FIN that came with the bytes
    /// raises no further edge, so it must be read now).
    var trustShortRead = false
    private(set) var sourceDrained = false

    static let memoryChunk = 64 * 1024
    static let copyChunk = 16 * 1024

    init(source: FileDescriptor, destination: FileDescriptor, pool: PipePool) {
        self.source = source
        self.destination = destination
        self.pool = pool
    }

    mutating func acquireBuffer() -> Int {
        switch carrier {
        case .pipe(let pipe): return pipe.capacity
        case .memory(let buffer, _, _): return buffer.count
        case .none:
            if !spliceUnsupported, !copying, let pipe = pool.take() {
                carrier = .pipe(pipe)
                return pipe.capacity
            }
            let size = copying && !spliceUnsupported ? Self.copyChunk : Self.memoryChunk
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 16)
            carrier = .memory(buffer, offset: 0, end: 0)
            return buffer.count
        }
    }

    mutating func releaseBuffer() {
        switch carrier {
        case .none: return
        case .pipe(let pipe): pool.give(pipe)
        case .memory(let buffer, _, _): buffer.deallocate()
        }
        carrier = .none
    }

    /// Releases the buffer whatever it holds (the connection is closing).
    mutating func discardBuffer() {
        switch carrier {
        case .none: return
        case .pipe(let pipe): pool.discard(pipe)
        case .memory(let buffer, _, _): buffer.deallocate()
        }
        carrier = .none
    }

    @inline(__always)
    mutating func fill(maxBytes: Int) throws(Errno) -> IOResult<Int> {
        switch carrier {
        case .pipe(let pipe):
            sourceDrained = false
            do {
                return try Splice.move(from: source, to: pipe.writeEnd, maxBytes: maxBytes)
            } catch let error where error == .invalidArgument || error == .notSupported {
                // This pair cannot splice: switch to copying for good. The pipe
                // is empty (the source is read only into an empty buffer).
                spliceUnsupported = true
                fellBack = true
                releaseBuffer()
                _ = acquireBuffer()
                return try fill(maxBytes: maxBytes)
            }
        case .memory(let buffer, _, _):
            let asked = min(maxBytes, buffer.count)
            sourceDrained = false
            let result = try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<asked]))
            if case .done(let n) = result {
                carrier = .memory(buffer, offset: 0, end: n)
                sourceDrained = trustShortRead && n > 0 && n < asked
                if n == asked { copying = false }
            }
            return result
        case .none:
            preconditionFailure("fill without a buffer")
        }
    }

    @inline(__always)
    mutating func flush(maxBytes: Int) throws(Errno) -> IOResult<Int> {
        switch carrier {
        case .pipe(let pipe):
            return try Splice.move(from: pipe.readEnd, to: destination, maxBytes: maxBytes)
        case .memory(let buffer, let offset, let end):
            let result = try destination.write(UnsafeRawBufferPointer(rebasing: buffer[offset..<end]))
            if case .done(let n) = result { carrier = .memory(buffer, offset: offset + n, end: end) }
            return result
        case .none:
            preconditionFailure("flush without a buffer")
        }
    }

    func finishDestination() {
        if !closeFollows { Socket.shutdownWrite(destination) }
    }
}

// MARK: Hot upgrade

extension RelayDirection where IO == SocketDirectionIO {
    /// This direction as a handover record, with the pipe's two ends when
    /// its in-flight bytes are in one (the pipe then travels with it).
    func handoverState() -> (HandoverRecord.DirectionState, [FileDescriptor]) {
        var state = HandoverRecord.DirectionState(
            delivered: delivered, inFlight: inFlight, sourceEnded: sourceEnded, finished: finished,
            pipeCapacity: nil, memory: nil, spliceUnsupported: io.spliceUnsupported, fellBack: io.fellBack,
            closeFollows: io.closeFollows)
        var descriptors: [FileDescriptor] = []
        // A buffer is held only while bytes are in flight (it goes back when
        // the pump finds it empty), so bytes in flight means a carrier.
        if inFlight > 0 {
            switch io.carrier {
            case .pipe(let pipe):
                state.pipeCapacity = pipe.capacity
                descriptors = [pipe.readEnd, pipe.writeEnd]
            case .memory(let buffer, let offset, let end):
                state.memory = HandoverBase64.encode(UnsafeRawBufferPointer(rebasing: buffer[offset..<end]))
            case .none:
                state.inFlight = 0
            }
        }
        return (state, descriptors)
    }

    /// A direction rebuilt from `state`, with `pipe` holding its in-flight
    /// bytes when they came in one.
    static func restoring(_ state: HandoverRecord.DirectionState, pipe: Pipe?, source: FileDescriptor,
                          destination: FileDescriptor, pool: PipePool) throws(HandoverError) -> Self {
        var io = SocketDirectionIO(source: source, destination: destination, pool: pool)
        io.spliceUnsupported = state.spliceUnsupported
        io.fellBack = state.fellBack
        io.closeFollows = state.closeFollows
        guard state.inFlight >= 0 else { throw HandoverError("negative bytes in flight") }
        if state.inFlight > 0 {
            if let pipe {
                pool.adopt(pipe)
                io.carrier = .pipe(pipe)
            } else if let text = state.memory, let bytes = HandoverBase64.decode(text) {
                guard bytes.count == state.inFlight else {
                    throw HandoverError("\(bytes.count) byte(s) in memory for \(state.inFlight) in flight")
                }
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, SocketDirectionIO.memoryChunk), alignment: 16)
                buffer.copyBytes(from: bytes)
                io.carrier = .memory(buffer, offset: 0, end: bytes.count)
            } else {
                throw HandoverError("\(state.inFlight) byte(s) in flight but neither a pipe nor memory holds them")
            }
        }
        return RelayDirection(io: io, inFlight: state.inFlight, delivered: state.delivered,
                              sourceEnded: state.sourceEnded, finished: state.finished)
    }
}
