import BrokerCore
import ControlProtocol
import Foundation
import HummingbirdCore
import Logging
import NIOCore
import Synchronization

/// What verified PROXY headers said about the connections that carry them,
/// by channel, for `BrokerRequestContext` to read. An entry lives from the
/// header's verification to the connection's close.
final class ProxyOrigins: Sendable {
    static let shared = ProxyOrigins()
    private let table = Mutex<[ObjectIdentifier: ProxyOrigin]>([:])

    func set(_ origin: ProxyOrigin, for channel: any Channel) { table.withLock { $0[ObjectIdentifier(channel)] = origin } }
    func remove(_ channel: any Channel) { _ = table.withLock { $0.removeValue(forKey: ObjectIdentifier(channel)) } }
    func origin(for channel: any Channel) -> ProxyOrigin? { table.withLock { $0[ObjectIdentifier(channel)] } }
}

/// The first handler of every broker connection: a connection that starts
/// with a PROXY protocol v2 header is accepted only when its `0xE1` TLV
/// verifies under an enrolled gateway's key (then the header's client address
/// and the gateway are recorded for the connection); one whose header does
/// not verify is closed; one without a header is a direct client and passes
/// untouched. Bytes behind the header wait until the verdict. A connection
/// that has not shown whether it carries a header (or whose header is not yet
/// verified) when `headerTimeout` runs out is closed: a peer that stalls
/// inside a header cannot hold a connection open (as HAProxy's
/// `timeout client` does for `accept-proxy`).
final class ProxyHeaderHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private enum State {
        case reading
        case verifying
        case passing
        case closed
    }

    private var state = State.reading
    private var buffered: ByteBuffer?
    /// Events (such as the client's half-close) that came while the header
    /// was being checked: passed on after the bytes held, in order.
    private var heldEvents: [Any] = []
    private let keys: @Sendable (Int64) async -> ControlKey?
    private let clock: @Sendable () -> Date
    private let logger: Logger
    private let headerTimeout: TimeAmount
    private var deadline: Scheduled<Void>?

    init(keys: @escaping @Sendable (Int64) async -> ControlKey?, clock: @escaping @Sendable () -> Date,
         headerTimeout: TimeAmount = .seconds(10), logger: Logger) {
        self.keys = keys
        self.clock = clock
        self.headerTimeout = headerTimeout
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { armDeadline(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        armDeadline(context)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) { disarmDeadline() }

    private func disarmDeadline() {
        deadline?.cancel()
        deadline = nil
    }

    private func armDeadline(_ context: ChannelHandlerContext) {
        guard deadline == nil, case .reading = state else { return }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let seconds = Double(headerTimeout.nanoseconds) / 1e9
        deadline = context.eventLoop.scheduleTask(in: headerTimeout) {
            let (handler, context) = bound.value
            switch handler.state {
            case .reading, .verifying:
                handler.refuse(context, "no complete PROXY header or request within \(seconds) s")
            case .passing, .closed:
                break
            }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        switch state {
        case .passing:
            context.fireChannelRead(data)
        case .closed:
            break
        case .verifying:
            buffered!.writeBuffer(&bytes)
            if buffered!.readableBytes > 1 << 20 { refuse(context, "more than 1 MiB sent before the PROXY header was checked") }
        case .reading:
            if buffered == nil { buffered = bytes } else { buffered!.writeBuffer(&bytes) }
            examine(context)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if case .passing = state { context.fireChannelReadComplete() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch state {
        case .passing, .closed: context.fireUserInboundEventTriggered(event)
        case .reading:
            if let event = event as? ChannelEvent, event == .inputClosed {
                refuse(context, "the connection ended inside a PROXY header")
            } else {
                heldEvents.append(event)
            }
        case .verifying:
            heldEvents.append(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        disarmDeadline()
        ProxyOrigins.shared.remove(context.channel)
        context.fireChannelInactive()
    }

    private func examine(_ context: ChannelHandlerContext) {
        switch ProxyHeader.parse(Array(buffered!.readableBytesView.prefix(ProxyHeader.maxLength))) {
        case .notProxy:
            pass(context)
        case .needMore:
            break
        case .invalid(let reason):
            refuse(context, reason)
        case .header(let header, let length):
            buffered!.moveReaderIndex(forwardBy: length)
            state = .verifying
            let keys = self.keys
            let now = Int64(clock().timeIntervalSince1970)
            let loop = context.eventLoop
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            loop.makeFutureWithTask { () async -> Result<ProxyOrigin, ProxyRefusal> in
                do throws(ProxyRefusal) {
                    let gateway = try ProxyAuthentication.claimedGateway(header)
                    let key = await keys(gateway)
                    return .success(try ProxyAuthentication.verify(header, key: key, now: now))
                } catch {
                    return .failure(error)
                }
            }.whenSuccess { result in
                let (handler, context) = bound.value
                switch result {
                case .success(let origin):
                    ProxyOrigins.shared.set(origin, for: context.channel)
                    handler.pass(context)
                case .failure(let refusal):
                    handler.refuse(context, refusal.description)
                }
            }
        }
    }

    /// From now on every byte goes straight on, starting with those held.
    private func pass(_ context: ChannelHandlerContext) {
        state = .passing
        disarmDeadline()
        if let held = buffered, held.readableBytes > 0 {
            buffered = nil
            context.fireChannelRead(wrapInboundOut(held))
            context.fireChannelReadComplete()
        }
        buffered = nil
        let events = heldEvents
        heldEvents = []
        for event in events { context.fireUserInboundEventTriggered(event) }
    }

    private func refuse(_ context: ChannelHandlerContext, _ reason: String) {
        guard case .closed = state else {
            state = .closed
            disarmDeadline()
            buffered = nil
            heldEvents = []
            let peer = context.remoteAddress?.ipAddress ?? "?"
            logger.warning("connection from \(peer) closed: PROXY header refused: \(reason)")
            context.close(promise: nil)
            return
        }
    }
}

/// A child channel that puts `ProxyHeaderHandler` in front of another (HTTP/1).
struct ProxyProtocolChannel<Base: ServerChildChannel>: ServerChildChannel {
    typealias Value = Base.Value
    let base: Base
    let makeHandler: @Sendable () -> ProxyHeaderHandler

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(makeHandler(), position: .first)
        }.flatMap {
            base.setup(channel: channel, logger: logger)
        }
    }

    func handle(value: Value, logger: Logger) async {
        await base.handle(value: value, logger: logger)
    }
}
