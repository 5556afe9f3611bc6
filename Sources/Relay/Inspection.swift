import EventLoop
import SystemLayer

/// What an inspector decided about a connection from the bytes it has seen.
public enum InspectionDecision: Sendable, Equatable {
    /// Not enough bytes yet: keep reading (within the inspector's byte and time bounds).
    case needMore
    /// Connect to this target; the bytes read so far are written to it first.
    case connect(SocketAddress)
    /// Close the client at once. The reason is a short label (`no_sni`,
    /// `timeout`, ...) under which the refusal is counted; it must hold no secret.
    case refuse(String)
}

/// Decides, from a client's first bytes, where a connection goes: the
/// "inspect first" mode of a TCP rule (the Security Gateway's SNI routing).
///
/// The relay reads the client with plain read(2) on its loop (no splice yet),
/// at most `maxBytes` and for at most `timeoutNanoseconds`, feeding each
/// chunk to the connection's `Inspection` until it decides.
public protocol ConnectionInspector: Sendable {
    /// At most this many bytes are read before a decision; more is refused as `too_large`.
    var maxBytes: Int { get }
    /// A client that has not let the inspector decide by then is refused as `timeout`.
    var timeoutNanoseconds: UInt64 { get }
    /// A fresh state for one accepted connection from `client`. Called on a relay loop.
    func makeInspection(client: SocketAddress) -> any Inspection
}

/// The per-connection state of a `ConnectionInspector`. Used only on the
/// loop that accepted the connection.
public protocol Inspection: AnyObject {
    /// Takes the next chunk of client bytes (`all` holds every byte read so far, this chunk included).
    func feed(_ all: [UInt8]) -> InspectionDecision
    /// The client closed (or reset) before a decision. Must not return `.needMore`.
    func endOfStream() -> InspectionDecision
    /// The time bound passed without a decision. Must not return `.needMore`.
    func timedOut() -> InspectionDecision
    /// Called once when a connection this inspection sent to a target
    /// (`.connect`) closes, whether or not the connect succeeded: the end of
    /// the session that `.connect` started.
    func sessionEnded()
}

/// A rule's inspector. Two are the same when their names are (the name shows
/// in logs and rule descriptions, so it must hold no secret).
public struct RuleInspector: Hashable, Sendable {
    public let name: String
    public let inspector: any ConnectionInspector

    public init(name: String, inspector: any ConnectionInspector) {
        self.name = name
        self.inspector = inspector
    }

    public static func == (a: RuleInspector, b: RuleInspector) -> Bool { a.name == b.name }
    public func hash(into hasher: inout Hasher) { hasher.combine(name) }
}

/// A connection whose destination is not known yet: its client's first
/// bytes are read (plain read(2), level-triggered) and handed to the rule's
/// inspector until it decides. It holds the admission slot; a `.connect`
/// hands the slot and the client socket to a `RelayConnection`.
final class InspectingConnection: EventHandler, TimerHandler {
    let id: UInt64
    let client: FileDescriptor
    let clientAddress: SocketAddress
    let rule: RelayRule
    let gate: AdmissionGate
    let inspection: any Inspection
    let maxBytes: Int
    unowned let context: LoopContext
    let startedAt: UInt64
    private(set) var bytes: [UInt8] = []
    private var timer: TimerID?
    private var done = false

    init(id: UInt64, client: FileDescriptor, clientAddress: SocketAddress, rule: RelayRule, inspector: any ConnectionInspector,
         gate: AdmissionGate, context: LoopContext, now: UInt64) {
        self.id = id
        self.client = client
        self.clientAddress = clientAddress
        self.rule = rule
        self.gate = gate
        self.context = context
        maxBytes = max(1, inspector.maxBytes)
        inspection = inspector.makeInspection(client: clientAddress)
        startedAt = now
        timer = context.loop.schedule(afterNanoseconds: max(1, inspector.timeoutNanoseconds), target: self)
    }

    func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop) {
        guard !done else { return }
        // One read per event: the socket is level-triggered, so what is left is reported again.
        let room = maxBytes - bytes.count
        var chunk = [UInt8](repeating: 0, count: min(max(room, 1), 4096))
        let result: IOResult<Int>
        do {
            result = try chunk.withUnsafeMutableBytes { raw throws(Errno) in try client.read(into: raw) }
        } catch {
            return decide(final(inspection.endOfStream(), "truncated"))
        }
        switch result {
        case .wouldBlock:
            if !events.isDisjoint(with: [.error, .hangUp]) { decide(final(inspection.endOfStream(), "truncated")) }
        case .done(0):
            decide(final(inspection.endOfStream(), "truncated"))
        case .done(let n):
            bytes.append(contentsOf: chunk[0..<n])
            let decision = inspection.feed(bytes)
            // The bound is reached and the inspector still wants more: it never will.
            if decision == .needMore && bytes.count >= maxBytes { return decide(.refuse("too_large")) }
            decide(decision)
        }
    }

    func timerFired(tag: Int, loop: EventLoop) {
        timer = nil
        guard !done else { return }
        decide(final(inspection.timedOut(), "timeout"))
    }

    /// At the end of the stream or of the time bound there is no more to wait for.
    private func final(_ decision: InspectionDecision, _ fallback: String) -> InspectionDecision {
        decision == .needMore ? .refuse(fallback) : decision
    }

    private func decide(_ decision: InspectionDecision) {
        switch decision {
        case .needMore:
            return
        case .refuse(let reason):
            finish()
            context.inspectionRefused(self, reason: reason)
        case .connect(let target):
            finish()
            context.inspectionConnect(self, target: target)
        }
    }

    private func finish() {
        done = true
        if let timer { context.loop.cancel(timer) }
        timer = nil
    }

    /// Closes the client with a reset (a refusal, a revoke or a drain). The caller does the accounting.
    func abort() {
        finish()
        context.loop.forget(client)
        Socket.setResetOnClose(client)
        client.close()
    }
}

/// Where one new UDP flow goes: chosen by a rule's `DatagramRouter`.
public struct DatagramRoute: Sendable, Equatable {
    public var target: SocketAddress
    /// The one source port toward `target` (nil: the rule's `sourcePorts`, or an ephemeral port).
    public var sourcePort: UInt16?

    public init(target: SocketAddress, sourcePort: UInt16? = nil) {
        self.target = target
        self.sourcePort = sourcePort
    }
}

/// Chooses the target of each new UDP flow of a rule ("routed UDP"). Called
/// on the relay loop that owns the flow, once when it opens and once when it
/// closes; must be quick and must not wait for the relay.
public protocol DatagramRouter: Sendable {
    /// The route of a new flow from `client`, or nil to drop its datagram
    /// (counted as `not_allowed`).
    func route(client: SocketAddress, rule: String) -> DatagramRoute?
    /// The flow `route` opened has closed (idle, rule removed, or closed on request).
    func flowEnded(client: SocketAddress, route: DatagramRoute)
}

/// A rule's router. Two are the same when their names are (so a rule set
/// applied again with the same router keeps its flows).
public struct RuleRouter: Hashable, Sendable {
    public let name: String
    public let router: any DatagramRouter

    public init(name: String, router: any DatagramRouter) {
        self.name = name
        self.router = router
    }

    public static func == (a: RuleRouter, b: RuleRouter) -> Bool { a.name == b.name }
    public func hash(into hasher: inout Hasher) { hasher.combine(name) }
}
