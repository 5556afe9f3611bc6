import Foundation
import Logging
import Relay
import SystemLayer

/// The hot upgrade's conversation between a running gateway (the
/// predecessor) and the new binary it started (the successor), over a Unix
/// SOCK_SEQPACKET socket pair, one JSON message per packet, sockets attached
/// with SCM_RIGHTS:
///
/// ```
/// successor                      predecessor
///   hello {pid, version}   ──▶
///                          ◀──   manifest {pid, version, loops}
///   (relay loops started)
///   ready                  ──▶   stops its control endpoint, registration,
///                                maintenance; suspends the relay (pause starts)
///                          ◀──   sockets {records} + descriptors  (batches)
///                          ◀──   end {count}
///   (rules restored on the handed listeners)
///   received {count}       ──▶   commits: nothing is resumed after this
///                          ◀──   released     (closes its copies, exits 0)
///   adopts connections and flows (pause ends), opens the control endpoint
/// ```
///
/// Until the predecessor sends `released` it can resume everything as it
/// was (the successor failed, timed out, or said `abort`); the successor
/// touches no connection before `released`. So a failed upgrade changes
/// nothing, and a connection is never driven by both processes.
public struct UpgradeMessage: Codable, Sendable, Equatable {
    public var type: String
    public var pid: Int32?
    public var version: String?
    public var loops: Int?
    public var count: Int?
    public var reason: String?
    public var records: [HandoverRecord]?
    /// `end`: when the relay was suspended (CLOCK_MONOTONIC, shared by both
    /// processes), so the successor can tell the pause a stream saw.
    public var suspendedAt: UInt64?

    public init(type: String, pid: Int32? = nil, version: String? = nil, loops: Int? = nil, count: Int? = nil,
                reason: String? = nil, records: [HandoverRecord]? = nil, suspendedAt: UInt64? = nil) {
        self.suspendedAt = suspendedAt
        self.type = type
        self.pid = pid
        self.version = version
        self.loops = loops
        self.count = count
        self.reason = reason
        self.records = records
    }
}

/// Why an upgrade did not happen.
public struct UpgradeFailure: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One end of the conversation: typed messages with deadlines. Blocking:
/// the main thread's (or a test's dedicated thread's) work.
public struct UpgradeChannel: Sendable {
    public let socket: MessageSocket
    /// Called while waiting: a reason when the other side is known to be gone
    /// (the predecessor watches its child this way).
    let peerGone: @Sendable () -> String?

    public init(socket: MessageSocket, peerGone: @escaping @Sendable () -> String? = { nil }) {
        self.socket = socket
        self.peerGone = peerGone
    }

    public func send(_ message: UpgradeMessage, descriptors: [FileDescriptor] = []) throws(UpgradeFailure) {
        let bytes: [UInt8]
        do { bytes = Array(try JSONEncoder().encode(message)) } catch {
            throw UpgradeFailure("cannot encode the \(message.type) message: \(error)")
        }
        guard bytes.count <= MessageSocket.maxMessage else {
            throw UpgradeFailure("the \(message.type) message is \(bytes.count) bytes, over \(MessageSocket.maxMessage)")
        }
        do throws(Errno) {
            try socket.send(bytes, descriptors: descriptors, timeoutMilliseconds: 10_000)
        } catch {
            throw UpgradeFailure("cannot send the \(message.type) message: \(error)")
        }
    }

    /// Waits up to `seconds` for a message of type `expected` (an `abort`
    /// from the other side, its end closing or `peerGone` fail the wait).
    public func receive(_ expected: String, seconds: Int) throws(UpgradeFailure) -> (UpgradeMessage, [FileDescriptor]) {
        try receive(anyOf: [expected], seconds: seconds)
    }

    /// Waits for a message of one of the `expected` types.
    public func receive(anyOf types: [String], seconds: Int) throws(UpgradeFailure) -> (UpgradeMessage, [FileDescriptor]) {
        let expected = types.joined(separator: " or ")
        let deadline = MonotonicClock.nowNanoseconds &+ UInt64(seconds) * 1_000_000_000
        while true {
            let got: (bytes: [UInt8], descriptors: [FileDescriptor])?
            do throws(Errno) {
                got = try socket.receive(timeoutMilliseconds: 100)
            } catch .timedOut {
                if let gone = peerGone() { throw UpgradeFailure(gone) }
                if MonotonicClock.nowNanoseconds >= deadline {
                    throw UpgradeFailure("no \(expected) message within \(seconds) s")
                }
                continue
            } catch {
                throw UpgradeFailure("cannot receive the \(expected) message: \(error)")
            }
            guard let got else {
                throw UpgradeFailure(peerGone() ?? "the other process closed the upgrade socket before its \(expected) message")
            }
            let message: UpgradeMessage
            do { message = try JSONDecoder().decode(UpgradeMessage.self, from: Data(got.bytes)) } catch {
                got.descriptors.forEach { $0.close() }
                throw UpgradeFailure("a malformed message instead of \(expected): \(error)")
            }
            if message.type == "abort" {
                got.descriptors.forEach { $0.close() }
                throw UpgradeFailure("the other process gave up: \(message.reason ?? "no reason given")")
            }
            guard types.contains(message.type) else {
                got.descriptors.forEach { $0.close() }
                throw UpgradeFailure("a \(message.type) message instead of \(expected)")
            }
            return (message, got.descriptors)
        }
    }

    /// Tells the other side why this one stops (best effort).
    public func abort(_ reason: String) {
        try? send(UpgradeMessage(type: "abort", reason: reason))
    }
}

/// What the predecessor handed over.
public struct HandoverSummary: Sendable, Equatable {
    public var successor: Int32
    public var listeners = 0
    public var connections = 0
    public var flows = 0
    /// From the relay's suspension to the successor's `received`.
    public var pauseNanoseconds: UInt64 = 0
    /// How long suspending took, and then sending every record.
    public var suspendNanoseconds: UInt64 = 0
    public var sendNanoseconds: UInt64 = 0
}

/// The predecessor's side.
public enum UpgradeHandoff {
    /// Hands everything to the successor on `channel`.
    /// - Parameters:
    ///   - stopControl: stops what must not run twice (control endpoint,
    ///     registration, maintenance, metrics); after it no rule changes.
    ///   - restartControl: undoes `stopControl` when the upgrade fails after it.
    /// - Returns: the summary; the relay is released and the caller exits.
    /// - Throws: `UpgradeFailure`, with everything resumed as it was.
    public static func run(_ channel: UpgradeChannel, engine: RelayEngine, pid: Int32, version: String,
                           stopControl: () -> Void, restartControl: () -> Void,
                           logger: Logger) throws(UpgradeFailure) -> HandoverSummary {
        let (hello, _) = try channel.receive("hello", seconds: 60)
        guard let successor = hello.pid else { throw UpgradeFailure("the hello message names no pid") }
        logger.notice("upgrade: pid \(successor) (\(hello.version ?? "unknown version")) is starting; handing over to it")
        try channel.send(UpgradeMessage(type: "manifest", pid: pid, version: version, loops: engine.loopCount))
        _ = try channel.receive("ready", seconds: 60)

        stopControl()
        let started = MonotonicClock.nowNanoseconds
        let handed: [HandedSocket]
        do throws(HandoverError) {
            handed = try engine.suspendForHandover()
        } catch {
            restartControl()
            channel.abort(error.message)
            throw UpgradeFailure(error.message)
        }
        var summary = HandoverSummary(successor: successor)
        let suspended = MonotonicClock.nowNanoseconds
        summary.suspendNanoseconds = suspended &- started
        for item in handed {
            switch item.record.kind {
            case .tcpListener, .udpListener: summary.listeners += 1
            case .connection: summary.connections += 1
            case .flow: summary.flows += 1
            }
        }
        do throws(UpgradeFailure) {
            for batch in batches(handed) {
                try channel.send(UpgradeMessage(type: "sockets", records: batch.map(\.record)),
                                 descriptors: batch.flatMap(\.descriptors))
            }
            try channel.send(UpgradeMessage(type: "end", count: handed.count, suspendedAt: started))
            summary.sendNanoseconds = MonotonicClock.nowNanoseconds &- suspended
            let (received, _) = try channel.receive("received", seconds: 60)
            guard received.count == handed.count else {
                throw UpgradeFailure("the successor took \(received.count ?? 0) of \(handed.count) socket records")
            }
            // The commit: from here on the successor owns every socket.
            try channel.send(UpgradeMessage(type: "released"))
        } catch {
            engine.resumeAfterHandover()
            restartControl()
            channel.abort(error.message)
            throw error
        }
        summary.pauseNanoseconds = MonotonicClock.nowNanoseconds &- started
        engine.releaseAfterHandover()
        return summary
    }

    /// Records in messages that fit: at most `MessageSocket.maxDescriptors`
    /// descriptors, and JSON well under `MessageSocket.maxMessage` (in-flight
    /// bytes held in memory count at their base64 size).
    static func batches(_ handed: [HandedSocket]) -> [[HandedSocket]] {
        var all: [[HandedSocket]] = []
        var current: [HandedSocket] = []
        var descriptors = 0
        var bytes = 0
        let budget = MessageSocket.maxMessage / 2
        for item in handed {
            let size = 800 + (item.record.connection.map { ($0.toTarget.memory?.utf8.count ?? 0) + ($0.toClient.memory?.utf8.count ?? 0) } ?? 0)
            if !current.isEmpty && (descriptors + item.descriptors.count > MessageSocket.maxDescriptors || bytes + size > budget) {
                all.append(current)
                current = []
                descriptors = 0
                bytes = 0
            }
            current.append(item)
            descriptors += item.descriptors.count
            bytes += size
        }
        if !current.isEmpty { all.append(current) }
        return all
    }
}

/// The successor's side, step by step (its caller starts the relay and
/// restores the rules between the steps).
public struct UpgradeTakeover: Sendable {
    public let channel: UpgradeChannel

    public init(channel: UpgradeChannel) { self.channel = channel }

    /// Says hello; returns the predecessor's pid and loop count.
    public func hello(pid: Int32, version: String) throws(UpgradeFailure) -> (pid: Int32, loops: Int, version: String) {
        try channel.send(UpgradeMessage(type: "hello", pid: pid, version: version))
        let (manifest, _) = try channel.receive("manifest", seconds: 60)
        guard let predecessor = manifest.pid, let loops = manifest.loops, loops > 0 else {
            throw UpgradeFailure("the manifest names no pid or loop count")
        }
        return (predecessor, loops, manifest.version ?? "unknown version")
    }

    /// Ready to take: receives every handed socket with its descriptors, and
    /// when the predecessor's relay stopped (monotonic clock).
    public func receiveSockets() throws(UpgradeFailure) -> (handed: [HandedSocket], suspendedAt: UInt64) {
        try channel.send(UpgradeMessage(type: "ready"))
        var handed: [HandedSocket] = []
        do throws(UpgradeFailure) {
            while true {
                let (message, descriptors) = try channel.receive(anyOf: ["sockets", "end"], seconds: 60)
                if message.type == "end" {
                    guard message.count == handed.count else {
                        throw UpgradeFailure("the predecessor announced \(message.count ?? 0) socket record(s) and sent \(handed.count)")
                    }
                    return (handed, message.suspendedAt ?? MonotonicClock.nowNanoseconds)
                }
                let records = message.records ?? []
                guard records.reduce(0, { $0 + $1.descriptors }) == descriptors.count else {
                    descriptors.forEach { $0.close() }
                    throw UpgradeFailure("a sockets message with \(descriptors.count) descriptor(s) for records that name \(records.reduce(0) { $0 + $1.descriptors })")
                }
                var next = 0
                for record in records {
                    handed.append(HandedSocket(record: record, descriptors: Array(descriptors[next..<(next + record.descriptors)])))
                    next += record.descriptors
                }
            }
        } catch {
            handed.flatMap(\.descriptors).forEach { $0.close() }
            throw error
        }
    }

    /// Says every record was taken and waits for the predecessor's release:
    /// only then may the successor touch a connection.
    /// - Throws: `UpgradeFailure` when the predecessor resumed instead (the
    ///   successor must then exit without touching anything handed).
    public func confirm(count: Int) throws(UpgradeFailure) {
        try channel.send(UpgradeMessage(type: "received", count: count))
        _ = try channel.receive("released", seconds: 60)
    }
}
