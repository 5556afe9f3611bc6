import ControlProtocol
import Foundation
import GatewayControl
import Glibc
import Hummingbird
import Logging
import Relay
import ServiceLifecycle
import Synchronization
import SystemLayer
import TestSupport

/// A fresh temporary folder, removed by `remove()`.
struct TempFolder: Sendable {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "gwctl-tests-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// A clock the tests move forward (rule expiry).
final class TestClock: Sendable {
    private let offset = Mutex<Int64>(0)
    var now: Int64 { ControlClock.unixSeconds() + offset.withLock { $0 } }
    func advance(_ seconds: Int64) { offset.withLock { $0 += seconds } }
}

/// Runs blocking work on its own thread, so that tests never block the
/// concurrency pool that the HTTP server's handlers may need.
func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
        }
        thread.start()
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A real gateway control plane for one test: a relay engine, the control
/// core on a state directory, and the control endpoint served over HTTP on
/// 127.0.0.1 at a port the kernel picked.
final class TestGateway: Sendable {
    static let gatewayID = 7
    let folder: TempFolder
    let engine: RelayEngine
    let control: GatewayControl
    let key: ControlKey
    let clock: TestClock
    let port: UInt16
    private let services: ServiceGroup
    private let server: Task<Void, any Error>

    var signer: ControlSigner { ControlSigner(gatewayID: Self.gatewayID, key: key) }

    private init(folder: TempFolder, engine: RelayEngine, control: GatewayControl, key: ControlKey, clock: TestClock,
                 port: UInt16, services: ServiceGroup, server: Task<Void, any Error>) {
        self.folder = folder
        self.engine = engine
        self.control = control
        self.key = key
        self.clock = clock
        self.port = port
        self.services = services
        self.server = server
    }

    /// Settings for a test gateway. Its random ports come from `portRange`,
    /// by default a block of `TestPorts` of its own: a range shared by the
    /// gateways of parallel tests (20001-22000 once) lets two of them probe
    /// the same port free at once and both listen on it (SO_REUSEPORT), and
    /// the gateway binaries the binary tests start use 20001-22000.
    static func settings(portRange: ClosedRange<Int>? = nil, networks: [String] = ["127.0.0.0/8"]) -> ControlSettings {
        ControlSettings(publicAddress: IPAddress("127.0.0.1")!, desktopNetworks: networks.map { CIDR($0)! },
                        portRange: portRange ?? privatePorts(), ownAddresses: [], maxBodyBytes: 4096)
    }

    /// 96 ports of this test's own, from `TestPorts`.
    static func privatePorts() -> ClosedRange<Int> {
        let block = TestPorts.freeBlock(96)
        return Int(block.lowerBound)...Int(block.upperBound)
    }

    /// The port block of each state folder, so that a gateway restarted on a
    /// folder gets the range its rules were given ports from.
    private static let folderPorts = Mutex<[String: ClosedRange<Int>]>([:])

    /// Starts a gateway on `folder` (a new one when nil) and restores its
    /// rules; without `settings`, those of `settings()` with the folder's own
    /// port block.
    static func start(folder: TempFolder? = nil, key: ControlKey = ControlKey.generate(),
                      settings: ControlSettings? = nil, baseRules: [RelayRule] = []) async throws -> TestGateway {
        let folder = folder ?? TempFolder()
        let settings = settings ?? TestGateway.settings(portRange: folderPorts.withLock { ranges in
            if let range = ranges[folder.path] { return range }
            let range = privatePorts()
            ranges[folder.path] = range
            return range
        })
        var logger = Logger(label: "gwctl-test")
        logger.logLevel = .warning
        let engine = try RelayEngine(settings: RelaySettings(loops: 1), logger: logger)
        let clock = TestClock()
        let control = GatewayControl(engine: engine, settings: settings, baseRules: baseRules, stateDirectory: folder.path,
                                     signer: ControlSigner(gatewayID: gatewayID, key: key), logger: logger,
                                     clock: { clock.now })
        try control.restore()
        let bound = Mutex<String?>(nil)
        let app = try ControlServer.application(control: control, host: "127.0.0.1", port: 0, logger: logger,
                                            onServerRunning: { address in bound.withLock { $0 = address } })
        let services = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let server = Task { try await services.run() }
        do {
            try await waitUntilAsync("the gateway's control endpoint listening") { bound.withLock({ $0 }) != nil }
        } catch {
            server.cancel()
            throw error
        }
        let address = SocketAddress(bound.withLock { $0 }!)!
        control.updateSettings { $0.ownAddresses.append(address) }
        return TestGateway(folder: folder, engine: engine, control: control, key: key, clock: clock, port: address.port,
                           services: services, server: server)
    }

    /// Stops the endpoint and the relay; keeps the folder unless `removeFolder`.
    func stop(removeFolder: Bool = true) async {
        await services.triggerGracefulShutdown()
        _ = try? await server.value
        engine.shutdown()
        if removeFolder { folder.remove() }
    }

    /// A request signed broker-to-gateway (unless `authorization` overrides the header).
    func send(_ method: String, _ path: String, _ body: String = "", authorization: String? = nil,
              signer: ControlSigner? = nil, direction: ControlDirection = .brokerToGateway,
              timestamp: Int64? = nil) throws -> BlockingHTTP.Response {
        let bytes = Array(body.utf8)
        let header = authorization ?? (signer ?? self.signer).authorize(direction: direction, method: method, path: path, body: bytes,
                                                                       now: timestamp ?? ControlClock.unixSeconds())
        return try BlockingHTTP.request(method: method, host: "127.0.0.1", port: port, path: path,
                                        headers: [("Authorization", header), ("Content-Type", "application/json")], body: bytes,
                                        timeoutMilliseconds: TestDeadline.milliseconds)
    }

    func put(_ id: String, _ body: String) throws -> BlockingHTTP.Response {
        try send("PUT", "/control/v1/rules/\(id)", body)
    }

    /// What an unchanged gateway looks like: the rules, the engine's rules, the state file.
    func snapshot() -> String {
        // The snapshot file and every journal after it (issue 15): a change lands in one or the other.
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? []).filter { $0.hasPrefix("rules.") }.sorted()
        let file = names.map { name in
            name + ":" + ((try? StateFile.read(folder.file(name))).flatMap { $0 }.map { String(decoding: $0, as: UTF8.self) } ?? "<none>")
        }.joined(separator: "|")
        return "\(control.pushedRules())|\(engine.rules.map(\.description))|\(file)"
    }
}

extension BlockingHTTP.Response {
    var object: [String: Any] { ((try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any]) ?? [:] }
}

// MARK: Echo servers

/// A thread-per-connection TCP echo server on 127.0.0.1.
final class TCPEcho: @unchecked Sendable {
    let address: SocketAddress
    private let listener: FileDescriptor
    private let stopped = Atomic<Bool>(false)

    init() throws {
        listener = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        address = Socket.localAddress(listener)!
        Thread { [self] in
            while !stopped.load(ordering: .relaxed) {
                guard BlockingWait.readable(listener, timeoutMilliseconds: 100) else { continue }
                guard case .done(let conn)? = try? Socket.accept(listener) else { continue }
                Thread { [self] in serve(conn.fd) }.start()
            }
            listener.close()
        }.start()
    }

    private func serve(_ fd: FileDescriptor) {
        defer { fd.close() }
        var buffer = [UInt8](repeating: 0, count: 65536)
        while !stopped.load(ordering: .relaxed) {
            guard BlockingWait.readable(fd, timeoutMilliseconds: 100) else { continue }
            let result = buffer.withUnsafeMutableBytes { try? fd.read(into: $0) }
            guard case .done(let n)? = result, n > 0 else {
                if case .wouldBlock? = result { continue }
                return
            }
            try? fd.writeAll(Array(buffer[0..<n]))
        }
    }

    func stop() { stopped.store(true, ordering: .relaxed) }
}

/// A UDP echo server on 127.0.0.1.
final class UDPEcho: @unchecked Sendable {
    let address: SocketAddress
    private let fd: FileDescriptor
    private let stopped = Atomic<Bool>(false)

    init() throws {
        fd = try Socket.bindUDP(SocketAddress("127.0.0.1:0")!, reusePort: false)
        address = Socket.localAddress(fd)!
        Thread { [self] in
            var buffer = [UInt8](repeating: 0, count: 65536)
            while !stopped.load(ordering: .relaxed) {
                guard BlockingWait.readable(fd, timeoutMilliseconds: 100) else { continue }
                var peer = sockaddr_storage()
                var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
                let n = buffer.withUnsafeMutableBytes { raw in
                    withUnsafeMutablePointer(to: &peer) { p in
                        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd.rawValue, raw.baseAddress, raw.count, 0, $0, &length) }
                    }
                }
                guard n >= 0 else { continue }
                _ = buffer.withUnsafeBytes { raw in
                    withUnsafePointer(to: &peer) { p in
                        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd.rawValue, raw.baseAddress, n, 0, $0, length) }
                    }
                }
            }
            fd.close()
        }.start()
    }

    func stop() { stopped.store(true, ordering: .relaxed) }
}

// MARK: Clients

/// Connects to 127.0.0.1:`port` from `source`, sends `message` and reads it back.
/// - Returns: the echoed bytes, or nil when the gateway refused (reset, close, or nothing within `TestDeadline`).
func echoThrough(port: Int, source: String = "127.0.0.1", message: String = "hello through the gateway") -> String? {
    guard let fd = try? Socket.makeTCP(family: AF_INET) else { return nil }
    defer { fd.close() }
    guard (try? Socket.bind(fd, to: SocketAddress(ip: IPAddress(source)!, port: 0))) != nil else { return nil }
    do {
        if case .inProgress = try Socket.connect(fd, to: SocketAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(port))) {
            guard BlockingWait.writable(fd, timeoutMilliseconds: TestDeadline.milliseconds), Socket.pendingError(fd) == nil else { return nil }
        }
    } catch { return nil }
    guard (try? fd.writeAll(Array(message.utf8))) != nil else { return nil }
    var received: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while received.count < message.utf8.count {
        guard BlockingWait.readable(fd, timeoutMilliseconds: TestDeadline.milliseconds) else { return nil }
        let result = buffer.withUnsafeMutableBytes { try? fd.read(into: $0) }
        guard case .done(let n)? = result, n > 0 else {
            if case .wouldBlock? = result { continue }
            return nil
        }
        received.append(contentsOf: buffer[0..<n])
    }
    return String(decoding: received, as: UTF8.self)
}

/// A TCP connection through the gateway that stays open (a live session).
final class OpenSession: @unchecked Sendable {
    let fd: FileDescriptor
    init?(port: Int) {
        guard let fd = try? Socket.makeTCP(family: AF_INET) else { return nil }
        self.fd = fd
        do {
            if case .inProgress = try Socket.connect(fd, to: SocketAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(port))) {
                guard BlockingWait.writable(fd, timeoutMilliseconds: TestDeadline.milliseconds), Socket.pendingError(fd) == nil else { fd.close(); return nil }
            }
        } catch { fd.close(); return nil }
    }
    func close() { fd.close() }
}

/// Sends one datagram to 127.0.0.1:`port` and waits for the reply.
func udpEchoThrough(port: Int, message: String = "datagram through the gateway") -> String? {
    guard let fd = try? Socket.connectUDP(to: SocketAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(port))) else { return nil }
    defer { fd.close() }
    var buffer = [UInt8](repeating: 0, count: 2048)
    // UDP may lose a datagram: send again every second until the deadline.
    for _ in 0..<max(5, Int(TestDeadline.seconds)) {
        _ = try? fd.writeAll(Array(message.utf8))
        guard BlockingWait.readable(fd, timeoutMilliseconds: 1000) else { continue }
        let result = buffer.withUnsafeMutableBytes { try? fd.read(into: $0) }
        if case .done(let n)? = result { return String(decoding: buffer[0..<n], as: UTF8.self) }
    }
    return nil
}
