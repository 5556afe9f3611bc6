import EventLoop
import Logging
import SystemLayer

/// One relayed TCP connection: the client's socket, the upstream socket and
/// the two directions between them. Lives on one loop and is touched only
/// from that loop's thread.
final class RelayConnection: EventHandler, TimerHandler {
    enum State { case connecting, established, closed }

    private enum TimerTag: Int { case connect = 1, idle = 2, liveness = 3 }

    let id: UInt64
    let client: FileDescriptor
    let upstream: FileDescriptor
    let clientAddress: SocketAddress
    /// The rule (shared with the listener and every connection of it).
    let rule: RelayRule
    /// Where this connection goes: the rule's target, or the one its
    /// inspection chose (the rule stays shared rather than copied per connection).
    let target: SocketAddress
    let gate: AdmissionGate
    /// The rule's counters on this loop (bytes added at close without a lookup).
    let ruleCounters: TCPRuleCounters
    unowned let context: LoopContext
    let startedAt: UInt64

    private(set) var state: State = .connecting
    var toTarget: RelayDirection<SocketDirectionIO>
    var toClient: RelayDirection<SocketDirectionIO>
    private var lastActivity: UInt64
    private var connectTimer: TimerID?
    private var idleTimer: TimerID?
    private var livenessTimer: TimerID?
    /// The client sent something while the connect was in progress (or while
    /// the replayed bytes were still going out).
    private var clientReadableDuringConnect = false
    /// Client bytes an inspector read (inspect-first rules), written upstream
    /// after the preamble and before any other client byte; what is left of
    /// them when the send buffer was full.
    /// Only for connections an inspector sent here (the Security Gateway):
    /// one optional reference, so that ordinary connections carry 8 bytes
    /// for it instead of the replay buffer, its count and an existential.
    private let inspected: InspectedStart?
    /// Bytes read by the inspector and written upstream before splicing.
    var replayedBytes: UInt64 { inspected?.replayed ?? 0 }
    /// The inspection that sent this connection here, if one did.
    var inspection: (any Inspection)? { inspected?.inspection }
    private var hasPendingReplay: Bool {
        guard let inspected else { return false }
        return !inspected.pending.isEmpty
    }

    init(id: UInt64, client: FileDescriptor, upstream: FileDescriptor, clientAddress: SocketAddress,
         rule: RelayRule, target: SocketAddress? = nil, gate: AdmissionGate, ruleCounters: TCPRuleCounters, context: LoopContext,
         now: UInt64, replay: [UInt8] = [], inspection: (any Inspection)? = nil, startedAt: UInt64? = nil) {
        self.id = id
        self.client = client
        self.upstream = upstream
        self.clientAddress = clientAddress
        self.rule = rule
        self.target = target ?? rule.target
        self.gate = gate
        self.ruleCounters = ruleCounters
        self.context = context
        self.startedAt = startedAt ?? now
        lastActivity = now
        inspected = replay.isEmpty && inspection == nil ? nil : InspectedStart(pending: replay, inspection: inspection)
        toTarget = RelayDirection(io: SocketDirectionIO(source: client, destination: upstream, pool: context.pool))
        toClient = RelayDirection(io: SocketDirectionIO(source: upstream, destination: client, pool: context.pool))
    }

    /// Starts the non-blocking connect; the connection is registered already.
    func startConnect(loop: EventLoop) {
        let progress: ConnectProgress
        do {
            progress = try Socket.connect(upstream, to: self.target)
        } catch {
            connectFailed(error)
            return
        }
        switch progress {
        case .connected:
            becomeEstablished(loop: loop, upstreamReadable: true)
        case .inProgress:
            connectTimer = loop.schedule(afterNanoseconds: context.settings.connectTimeoutNanoseconds,
                                         target: self, tag: TimerTag.connect.rawValue)
        }
    }

    /// What in an event says its socket's stream may have ended: a short
    /// read proves the socket drained only when none of it came with the
    /// event that started the pump (see SocketDirectionIO.trustShortRead).
    private static let sourceEnd: EpollEvents = [.readHangUp, .hangUp, .error]

    func handle(events: EpollEvents, fd: FileDescriptor, loop: EventLoop) {
        switch state {
        case .closed:
            return
        case .connecting:
            if fd == upstream {
                guard !events.isDisjoint(with: [.writable, .error, .hangUp]) else { return }
                // Writable without error or hang-up means connected; only a
                // failure needs SO_ERROR to say why.
                if events.isDisjoint(with: [.error, .hangUp]) {
                    toClient.io.trustShortRead = events.isDisjoint(with: Self.sourceEnd)
                    becomeEstablished(loop: loop, upstreamReadable: !events.isDisjoint(with: [.readable, .readHangUp]))
                } else {
                    connectFailed(Socket.pendingError(upstream) ?? .connectionRefused)
                }
            } else if !events.isDisjoint(with: [.error, .hangUp]) {
                // The client vanished before the target answered.
                close(resetClient: false, resetUpstream: true)
            } else if !events.isDisjoint(with: [.readable, .readHangUp]) {
                clientReadableDuringConnect = true
                // The latest event carries the client's whole readiness (a FIN included).
                toTarget.io.trustShortRead = events.isDisjoint(with: Self.sourceEnd)
            }
        case .established:
            let fromReadSide: EpollEvents = [.readable, .readHangUp, .hangUp, .error]
            let fromWriteSide: EpollEvents = [.writable, .hangUp, .error]
            if !events.isDisjoint(with: fromReadSide) {
                let quiet = events.isDisjoint(with: Self.sourceEnd)
                if fd == client { toTarget.io.trustShortRead = quiet } else { toClient.io.trustShortRead = quiet }
            }
            if hasPendingReplay {
                // The inspected bytes go first: the client is not read until they are out.
                if fd == client && !events.isDisjoint(with: fromReadSide) { clientReadableDuringConnect = true }
                if fd == upstream && !events.isDisjoint(with: fromWriteSide) && !flushReplay() { return }
                let back = fd == upstream && !events.isDisjoint(with: fromReadSide) ? toClient.pump() : nil
                if hasPendingReplay { return settle(nil, back) }
                return settle(clientReadableDuringConnect ? toTarget.pump() : nil, back)
            }
            let before = toTarget.delivered &+ toClient.delivered
            var target: PumpOutcome? = nil
            var back: PumpOutcome? = nil
            if fd == client {
                if !events.isDisjoint(with: fromReadSide) { target = toTarget.pump() }
                if !events.isDisjoint(with: fromWriteSide) { back = toClient.pump() }
            } else {
                if !events.isDisjoint(with: fromReadSide) { back = toClient.pump() }
                if !events.isDisjoint(with: fromWriteSide) { target = toTarget.pump() }
            }
            if rule.idleTimeoutNanoseconds != nil, toTarget.delivered &+ toClient.delivered != before {
                lastActivity = loop.now
            }
            settle(target, back)
        }
    }

    /// Acts on the pumps' outcomes: a failure resets the other side; two
    /// finished directions close the connection.
    private func settle(_ target: PumpOutcome?, _ back: PumpOutcome?) {
        switch target {
        case .sourceFailed?:
            // The client failed (reset): pass the reset on to the target.
            return close(resetClient: false, resetUpstream: true, countReset: true)
        case .destinationFailed?:
            return close(resetClient: true, resetUpstream: false, countReset: true)
        default: break
        }
        switch back {
        case .sourceFailed?:
            return close(resetClient: true, resetUpstream: false, countReset: true)
        case .destinationFailed?:
            return close(resetClient: false, resetUpstream: true, countReset: true)
        default: break
        }
        if toTarget.finished && toClient.finished {
            close(resetClient: false, resetUpstream: false)
        } else {
            // Once one direction is over, the other's end of stream is
            // followed at once by close(2), which sends the FIN itself.
            // (Both receive buffers are drained by then, so the close cannot
            // turn into a reset.)
            toClient.io.closeFollows = toTarget.finished
            toTarget.io.closeFollows = toClient.finished
        }
    }

    /// - Parameter upstreamReadable: the event that announced the connection
    ///   also said the target had sent something (epoll reports the whole
    ///   readiness mask with an edge).
    private func becomeEstablished(loop: EventLoop, upstreamReadable: Bool) {
        if let timer = connectTimer { loop.cancel(timer); connectTimer = nil }
        if let preamble = rule.preamble, !writePreamble(preamble) { return }
        state = .established
        if hasPendingReplay && !flushReplay() { return }
        context.counters.bump(context.counters.established)
        // Keepalive's first probe comes after minutes of silence, so setting
        // it on the upstream socket a moment later changes nothing for a
        // session and spares short connections five setsockopt calls. (The
        // client's socket inherited it from the listener.)
        let delay = context.settings.livenessDelayNanoseconds
        if delay == 0 {
            Socket.apply(context.settings.liveness, to: upstream)
        } else {
            livenessTimer = loop.schedule(afterNanoseconds: delay, target: self, tag: TimerTag.liveness.rawValue)
        }
        if let idle = rule.idleTimeoutNanoseconds {
            lastActivity = loop.now
            idleTimer = loop.schedule(afterNanoseconds: idle, target: self, tag: TimerTag.idle.rawValue)
        }
        // Bytes the client sent while the connect was in progress are waiting:
        // with edge-triggered readiness no new event would announce them.
        // A side that has shown nothing is not read: its first bytes will
        // raise an edge of their own.
        let target = clientReadableDuringConnect && !hasPendingReplay ? toTarget.pump() : nil
        let back = upstreamReadable ? toClient.pump() : nil
        settle(target, back)
    }

    /// Writes what is left of the inspected bytes; the rest waits for the
    /// upstream socket to become writable.
    /// - Returns: false when the connection was closed (the target failed).
    private func flushReplay() -> Bool {
        guard let inspected else { return true }
        let written = inspected.pending.withUnsafeBytes { raw in Result { () throws(Errno) in try upstream.write(raw) } }
        switch written {
        case .success(.done(let n)):
            inspected.replayed &+= UInt64(n)
            // Written whole (the usual case): give the buffer back rather than
            // keep its capacity (the inspector's 2 KiB) for the connection's life.
            if n == inspected.pending.count { inspected.pending = [] } else { inspected.pending.removeFirst(n) }
            return true
        case .success(.wouldBlock):
            return true
        case .failure(let error):
            context.log.limited(.connectFailure, "cannot write the inspected bytes to \(self.target) for rule \"\(rule.id)\" (client \(clientAddress)): \(error)")
            close(resetClient: true, resetUpstream: false, countReset: true)
            return false
        }
    }

    /// Writes the rule's preamble to the just-connected upstream socket. Its
    /// send buffer is empty, so a header of a few hundred bytes goes in one
    /// non-blocking write; anything less (never seen in practice) resets both
    /// sides rather than relay a connection without its header.
    /// - Returns: false when the connection was closed.
    private func writePreamble(_ preamble: ConnectionPreamble) -> Bool {
        let local = Socket.localAddress(client) ?? rule.listen
        let bytes = preamble.make(clientAddress, local)
        let written = bytes.withUnsafeBytes { raw in try? upstream.write(raw) }
        guard case .done(let n)? = written, n == bytes.count else {
            context.log.limited(.connectFailure, "cannot write the \(preamble.name) to \(self.target) for rule \"\(rule.id)\" (client \(clientAddress))")
            context.counters.bump(context.counters.connectOtherFailure)
            close(resetClient: true, resetUpstream: true)
            return false
        }
        return true
    }

    private func connectFailed(_ error: Errno) {
        if error == .connectionRefused {
            context.counters.bump(context.counters.connectRefused)
        } else if error == .timedOut {
            context.counters.bump(context.counters.connectTimedOut)
        } else {
            context.counters.bump(context.counters.connectOtherFailure)
        }
        context.log.limited(.connectFailure, "cannot reach \(self.target) for rule \"\(rule.id)\" (client \(clientAddress)): \(error)",
                            ["client": "\(clientAddress)", "target": "\(self.target)", "rule": "\(rule.id)", "reason": "\(error)"])
        close(resetClient: true, resetUpstream: false)
    }

    func timerFired(tag: Int, loop: EventLoop) {
        guard state != .closed else { return }
        switch TimerTag(rawValue: tag) {
        case .connect?:
            connectTimer = nil
            if state == .connecting { connectFailed(.timedOut) }
        case .idle?:
            guard let idle = rule.idleTimeoutNanoseconds else { return }
            let quiet = loop.now &- lastActivity
            if quiet >= idle {
                context.counters.bump(context.counters.idleClosed)
                close(resetClient: false, resetUpstream: false)
            } else {
                idleTimer = loop.schedule(afterNanoseconds: idle - quiet, target: self, tag: TimerTag.idle.rawValue)
            }
        case .liveness?:
            livenessTimer = nil
            Socket.apply(context.settings.liveness, to: upstream)
        case nil:
            return
        }
    }

    /// Closes both sockets. A side marked for reset gets a RST instead of a FIN.
    func close(resetClient: Bool, resetUpstream: Bool, countReset: Bool = false) {
        guard state != .closed else { return }
        let wasEstablished = state == .established
        state = .closed
        let loop = context.loop
        if let timer = connectTimer { loop.cancel(timer) }
        if let timer = idleTimer { loop.cancel(timer) }
        if let timer = livenessTimer { loop.cancel(timer) }
        // close(2) takes the descriptors out of epoll; no epoll_ctl needed.
        loop.forget(client)
        loop.forget(upstream)
        if resetClient { Socket.setResetOnClose(client) }
        if resetUpstream { Socket.setResetOnClose(upstream) }
        client.close()
        upstream.close()
        toTarget.io.discardBuffer()
        toClient.io.discardBuffer()
        if toTarget.io.fellBack || toClient.io.fellBack { context.counters.bump(context.counters.spliceFallbacks) }
        if countReset { context.counters.bump(context.counters.resets) }
        context.connectionClosed(self, wasEstablished: wasEstablished)
        inspected?.inspection?.sessionEnded()
    }

    var info: ConnectionInfo {
        ConnectionInfo(id: id, loop: context.loop.id, rule: rule.id, client: clientAddress, target: self.target,
                       startedAtNanoseconds: startedAt, established: state == .established,
                       bytesClientToTarget: toTarget.delivered &+ replayedBytes, bytesTargetToClient: toClient.delivered)
    }
}

/// What the engine reports about one live connection.
public struct ConnectionInfo: Sendable, Equatable {
    public let id: UInt64
    public let loop: Int
    public let rule: String
    public let client: SocketAddress
    public let target: SocketAddress
    /// Monotonic clock reading at accept.
    public let startedAtNanoseconds: UInt64
    public let established: Bool
    public let bytesClientToTarget: UInt64
    public let bytesTargetToClient: UInt64
}

/// What an inspected connection carries beyond an ordinary one.
private final class InspectedStart {
    /// Bytes the inspector read, still to be written upstream.
    var pending: [UInt8]
    var replayed: UInt64 = 0
    /// The inspection that chose the target, told when the connection ends.
    let inspection: (any Inspection)?

    init(pending: [UInt8], inspection: (any Inspection)?) {
        self.pending = pending
        self.inspection = inspection
    }
}

// MARK: Hot upgrade

extension RelayConnection {
    /// Stops this connection's events and timers without touching its
    /// sockets (hot upgrade); `resume` undoes it. The liveness options a
    /// timer would have set later are set now.
    func suspend() {
        let loop = context.loop
        if let timer = connectTimer { loop.cancel(timer); connectTimer = nil }
        if let timer = idleTimer { loop.cancel(timer); idleTimer = nil }
        if let timer = livenessTimer {
            loop.cancel(timer)
            livenessTimer = nil
            Socket.apply(context.settings.liveness, to: upstream)
        }
        // epoll_ctl(DEL), not `forget`: the sockets stay open (the successor
        // holds them too), so closing ours later would not take them out.
        loop.deregister(client)
        loop.deregister(upstream)
    }

    /// Watches the sockets (again) and re-arms the timers. No pump here:
    /// adding a descriptor to epoll reports its readiness at that moment,
    /// edge-triggered or not, so bytes waiting on either side (or room for
    /// the bytes in flight) raise an event of their own on the next wait.
    func resume() {
        let loop = context.loop
        let interest: EpollEvents = [.readable, .writable, .readHangUp, .edgeTriggered]
        do {
            try loop.register(client, interest: interest, handler: self)
            try loop.register(upstream, interest: interest, handler: self)
        } catch {
            context.log.limited(.connectFailure, "cannot watch the connection from \(clientAddress) again: \(error)")
            return close(resetClient: true, resetUpstream: true)
        }
        switch state {
        case .closed:
            return
        case .connecting:
            connectTimer = loop.schedule(afterNanoseconds: context.settings.connectTimeoutNanoseconds,
                                         target: self, tag: TimerTag.connect.rawValue)
        case .established:
            if let idle = rule.idleTimeoutNanoseconds {
                lastActivity = loop.now
                idleTimer = loop.schedule(afterNanoseconds: idle, target: self, tag: TimerTag.idle.rawValue)
            }
        }
    }

    /// This connection as a handover record with its descriptors: the two
    /// sockets, then the pipes holding bytes in flight. Nil for a connection
    /// an inspector started (the Security Gateway's), which does not travel.
    func handoverRecord(loop: Int, now: UInt64) -> HandedSocket? {
        guard inspected == nil else { return nil }
        let (target, targetPipe) = toTarget.handoverState()
        let (back, backPipe) = toClient.handoverState()
        let state = HandoverRecord.ConnectionState(
            established: self.state == .established, ageNanoseconds: now &- startedAt,
            idleTimeoutNanoseconds: rule.idleTimeoutNanoseconds, clientSpokeDuringConnect: clientReadableDuringConnect,
            toTarget: target, toClient: back)
        let descriptors = [client, upstream] + targetPipe + backPipe
        return HandedSocket(record: HandoverRecord(kind: .connection, loop: loop, listen: "\(rule.listen)",
                                                   descriptors: descriptors.count, rule: rule.id,
                                                   target: "\(self.target)", client: "\(clientAddress)",
                                                   connection: state),
                            descriptors: descriptors)
    }

    /// A connection handed over by a predecessor, not yet watched (`resume` does that).
    static func adopted(_ item: HandedSocket, state: HandoverRecord.ConnectionState, id: UInt64, clientAddress: SocketAddress,
                        rule: RelayRule, target: SocketAddress, gate: AdmissionGate, ruleCounters: TCPRuleCounters,
                        context: LoopContext) throws(HandoverError) -> RelayConnection {
        let fds = item.descriptors
        let pipeCount = (state.toTarget.pipeCapacity != nil ? 2 : 0) + (state.toClient.pipeCapacity != nil ? 2 : 0)
        guard fds.count == 2 + pipeCount else {
            throw HandoverError("connection from \(clientAddress): \(fds.count) descriptor(s) for \(2 + pipeCount)")
        }
        let now = context.loop.now
        let connection = RelayConnection(id: id, client: fds[0], upstream: fds[1], clientAddress: clientAddress, rule: rule,
                                         target: target, gate: gate, ruleCounters: ruleCounters, context: context, now: now,
                                         startedAt: now &- min(state.ageNanoseconds, now))
        var next = 2
        func pipe(_ direction: HandoverRecord.DirectionState) -> Pipe? {
            guard let capacity = direction.pipeCapacity else { return nil }
            defer { next += 2 }
            return Pipe(readEnd: fds[next], writeEnd: fds[next + 1], capacity: capacity)
        }
        let targetPipe = pipe(state.toTarget)
        let backPipe = pipe(state.toClient)
        connection.toTarget = try .restoring(state.toTarget, pipe: targetPipe, source: fds[0], destination: fds[1], pool: context.pool)
        do throws(HandoverError) {
            connection.toClient = try .restoring(state.toClient, pipe: backPipe, source: fds[1], destination: fds[0], pool: context.pool)
        } catch {
            connection.toTarget.io.discardBuffer()
            throw error
        }
        connection.state = state.established ? .established : .connecting
        connection.clientReadableDuringConnect = state.clientSpokeDuringConnect
        return connection
    }

    /// The successor holds the sockets now: close our descriptors (and
    /// pipes) without a reset or shutdown, so the peers notice nothing.
    func releaseHandedOver() {
        guard state != .closed else { return }
        let wasEstablished = state == .established
        state = .closed
        client.close()
        upstream.close()
        toTarget.io.discardBuffer()
        toClient.io.discardBuffer()
        context.connectionClosed(self, wasEstablished: wasEstablished)
    }
}
