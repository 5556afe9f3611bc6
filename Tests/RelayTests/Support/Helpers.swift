import Glibc
import Logging
@testable import Relay
import SystemLayer
import TestSupport

func makeEngine(_ configure: (inout RelaySettings) -> Void = { _ in }) throws -> RelayEngine {
    var settings = RelaySettings(loops: 2)
    configure(&settings)
    var logger = Logger(label: "relay-test")
    logger.logLevel = .critical
    return try RelayEngine(settings: settings, logger: logger)
}

/// A blocking-style client for single-connection fault tests, on a
/// non-blocking socket with poll-based waits.
struct TestClient {
    let fd: FileDescriptor
    /// A reset that arrived right after the handshake, before the first read
    /// (a refusal by the relay can be that fast on loopback).
    var resetOnArrival = false

    init(fd: FileDescriptor) { self.fd = fd }

    static func connect(_ address: SocketAddress) throws -> TestClient {
        let fd = try Socket.makeTCP(family: address.family)
        _ = try Socket.connect(fd, to: address)
        guard BlockingWait.writable(fd, timeoutMilliseconds: TestDeadline.milliseconds) else {
            fd.close()
            throw Errno.timedOut
        }
        switch Socket.pendingError(fd) {
        case nil:
            return TestClient(fd: fd)
        case .connectionReset?:
            var client = TestClient(fd: fd)
            client.resetOnArrival = true
            return client
        case let error?:
            fd.close()
            throw error
        }
    }

    func send(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let result = try bytes.withUnsafeBytes { raw in
                try fd.write(UnsafeRawBufferPointer(rebasing: raw[offset...]))
            }
            switch result {
            case .done(let n): offset += n
            case .wouldBlock: BlockingWait.writable(fd, timeoutMilliseconds: TestDeadline.milliseconds)
            }
        }
    }

    /// What a read ended with.
    enum ReadEnd: Equatable { case data([UInt8]), eof, reset, timeout, error(Errno) }

    /// Reads whatever arrives within `milliseconds`.
    func read(max: Int = 65536, milliseconds: Int32 = TestDeadline.milliseconds) -> ReadEnd {
        if resetOnArrival { return .reset }
        guard BlockingWait.readable(fd, timeoutMilliseconds: milliseconds) else { return .timeout }
        var buffer = [UInt8](repeating: 0, count: max)
        do {
            let result = try buffer.withUnsafeMutableBytes { raw in try fd.read(into: raw) }
            switch result {
            case .done(0): return .eof
            case .done(let n): return .data(Array(buffer[0..<n]))
            case .wouldBlock: return .timeout
            }
        } catch {
            let errno = error as? Errno ?? .invalidArgument
            return errno == .connectionReset ? .reset : .error(errno)
        }
    }

    /// Reads exactly `count` bytes or fails.
    func readExactly(_ count: Int, milliseconds: Int32 = TestDeadline.milliseconds) -> [UInt8]? {
        var out: [UInt8] = []
        while out.count < count {
            guard case .data(let chunk) = read(max: count - out.count, milliseconds: milliseconds) else { return nil }
            out += chunk
        }
        return out
    }

    /// Reads until EOF or reset; returns the bytes and how it ended.
    func readToEnd(milliseconds: Int32 = TestDeadline.milliseconds) -> ([UInt8], ReadEnd) {
        var out: [UInt8] = []
        while true {
            let end = read(milliseconds: milliseconds)
            if case .data(let chunk) = end { out += chunk } else { return (out, end) }
        }
    }

    func shutdownWrite() { Socket.shutdownWrite(fd) }

    func reset() {
        Socket.setResetOnClose(fd)
        fd.close()
    }

    func close() { fd.close() }
}

/// A plain listening socket on loopback for fault tests.
struct TestListener {
    let fd: FileDescriptor
    let address: SocketAddress

    init(backlog: Int32 = 128) throws {
        fd = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false, backlog: backlog)
        address = Socket.localAddress(fd)!
    }

    func accept(milliseconds: Int32 = TestDeadline.milliseconds) -> TestClient? {
        guard BlockingWait.readable(fd, timeoutMilliseconds: milliseconds),
              case .done(let c)? = try? Socket.accept(fd) else { return nil }
        return TestClient(fd: c.fd)
    }

    func close() { fd.close() }
}

func randomBytes(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
}
