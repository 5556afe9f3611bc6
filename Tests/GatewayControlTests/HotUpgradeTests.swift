import Foundation
import GatewayControl
import Glibc
import Logging
import Relay
import Synchronization
import SystemLayer
import Testing
import TestSupport

/// The hot upgrade's conversation in one process: the predecessor runs on a
/// thread of its own, the successor on the test's, over a real socket pair.
@Suite(.serialized, .offPool) struct HotUpgradeTests {
    private static func engine() throws -> RelayEngine {
        var logger = Logger(label: "upgrade-test")
        logger.logLevel = .critical
        return try RelayEngine(settings: RelaySettings(loops: 2), logger: logger)
    }

    /// Runs the predecessor's side on a thread; `result` answers once it ended.
    private final class Predecessor: @unchecked Sendable {
        let done = DispatchSemaphore(value: 0)
        let outcome = Mutex<Result<HandoverSummary, UpgradeFailure>?>(nil)
        let stops = Atomic<Int>(0)
        let restarts = Atomic<Int>(0)

        init(_ channel: UpgradeChannel, engine: RelayEngine) {
            Thread { [self] in
                let result = Result { () throws(UpgradeFailure) in
                    try UpgradeHandoff.run(channel, engine: engine, pid: 1, version: "old", stopControl: {
                        stops.wrappingAdd(1, ordering: .relaxed)
                    }, restartControl: {
                        restarts.wrappingAdd(1, ordering: .relaxed)
                    }, logger: Logger(label: "upgrade-test"))
                }
                outcome.withLock { $0 = result }
                done.signal()
            }.start()
        }

        var result: Result<HandoverSummary, UpgradeFailure> {
            if outcome.withLock({ $0 }) == nil { done.wait() }
            return outcome.withLock { $0! }
        }
    }

    @Test("a successor takes the listeners and a live connection; the stream carries on through it")
    func handover() throws {
        let echo = try TCPEcho()
        defer { echo.stop() }
        let port = Int(TestPorts.free())
        let rule = RelayRule(id: "desk", listen: SocketAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(port)), target: echo.address)
        let old = try Self.engine()
        try old.apply([rule])
        let session = try #require(OpenSession(port: port))
        defer { session.close() }
        try session.fd.writeAll(Array("before".utf8))
        #expect(BrokerForwardingTests.read(session.fd, count: 6) == Array("before".utf8))

        let (a, b) = try MessageSocket.pair()
        defer { a.close(); b.close() }
        let predecessor = Predecessor(UpgradeChannel(socket: a), engine: old)
        let takeover = UpgradeTakeover(channel: UpgradeChannel(socket: b))
        let manifest = try takeover.hello(pid: 2, version: "new")
        #expect(manifest.pid == 1 && manifest.loops == 2)
        let (handed, _) = try takeover.receiveSockets()
        #expect(handed.filter { $0.record.kind == .connection }.count == 1)
        let new = try Self.engine()
        defer { new.shutdown() }
        #expect(new.inheritHandedListeners(handed).isEmpty)
        try new.apply([rule])
        try takeover.confirm(count: handed.count)
        let summary = try predecessor.result.get()
        #expect(summary.successor == 2 && summary.connections == 1 && summary.listeners == 2)
        #expect(predecessor.stops.load(ordering: .relaxed) == 1 && predecessor.restarts.load(ordering: .relaxed) == 0)
        #expect(new.adopt(handed).connections == 1)

        // The same connection, now relayed by the successor.
        try session.fd.writeAll(Array("after".utf8))
        #expect(BrokerForwardingTests.read(session.fd, count: 5) == Array("after".utf8))
        #expect(new.connections().count == 1)
        #expect(echoThrough(port: port) == "hello through the gateway")
    }

    @Test("a successor that gives up after the sockets leaves the predecessor serving as before")
    func successorAborts() throws {
        let echo = try TCPEcho()
        defer { echo.stop() }
        let port = Int(TestPorts.free())
        let rule = RelayRule(id: "desk", listen: SocketAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(port)), target: echo.address)
        let old = try Self.engine()
        defer { old.shutdown() }
        try old.apply([rule])
        let session = try #require(OpenSession(port: port))
        defer { session.close() }

        let (a, b) = try MessageSocket.pair()
        defer { a.close() }
        let predecessor = Predecessor(UpgradeChannel(socket: a), engine: old)
        let takeover = UpgradeTakeover(channel: UpgradeChannel(socket: b))
        _ = try takeover.hello(pid: 2, version: "new")
        let (handed, _) = try takeover.receiveSockets()
        takeover.channel.abort("the state directory cannot be read")
        handed.flatMap(\.descriptors).forEach { $0.close() }
        b.close()
        guard case .failure(let failure) = predecessor.result else {
            Issue.record("the predecessor handed over although the successor gave up")
            return
        }
        #expect(failure.message.contains("the state directory cannot be read"))
        #expect(predecessor.restarts.load(ordering: .relaxed) == 1)

        // The live session and the listener work as before; rules change again.
        try session.fd.writeAll(Array("still".utf8))
        #expect(BrokerForwardingTests.read(session.fd, count: 5) == Array("still".utf8))
        #expect(echoThrough(port: port) == "hello through the gateway")
        try old.apply([rule])
    }

    @Test("a successor that exits before its hello is reported, nothing changes")
    func successorGone() throws {
        let old = try Self.engine()
        defer { old.shutdown() }
        let (a, b) = try MessageSocket.pair()
        defer { a.close() }
        b.close()
        let predecessor = Predecessor(UpgradeChannel(socket: a) { "the new binary exited with status 1" }, engine: old)
        guard case .failure(let failure) = predecessor.result else {
            Issue.record("a handover without a successor succeeded")
            return
        }
        #expect(failure.message == "the new binary exited with status 1")
        #expect(predecessor.stops.load(ordering: .relaxed) == 0)
    }
}
