import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization

/// Keep-alive HTTP/1.1 connections from the broker to gateways' control
/// endpoints, one request at a time on each, and the request itself.
///
/// A push is one small request and answer. AsyncHTTPClient, which made
/// them before, crossed from the calling task to the event loop four times
/// per request (a deadline timer set and cancelled, the pool's idle timer
/// cancelled, the request handed over) and ran its request and pool state
/// machines: a sixth of the broker's CPU per connect (issue 15). Here a
/// request is one hand-over to the connection's event loop, which writes
/// it, arms the timeout there and fulfils the answer's promise.
///
/// Idle connections are kept per endpoint (at most `maxIdle`), newest first,
/// and reused only within `reuseWithin` of their last answer: gateways close
/// a connection that brings no whole request within 75 s
/// (`InlineHTTPServer`), so a request never races that close.
final class GatewayConnections: Sendable {
    /// Where a request goes: host and port, and for HTTPS the one
    /// certificate trusted (the one the gateway registered).
    struct Endpoint: Hashable, Sendable {
        let host: String
        let port: Int
        let tls: PinnedContext?
    }

    /// A client TLS context that trusts one certificate, with no host name
    /// check (the certificate, signed with the control key, identifies the
    /// gateway). Compared by the certificate's PEM.
    struct PinnedContext: Hashable, Sendable {
        let pem: String
        let context: NIOSSLContext

        static func == (a: Self, b: Self) -> Bool { a.pem == b.pem }
        func hash(into hasher: inout Hasher) { hasher.combine(pem) }
    }

    struct Answer: Sendable {
        let status: Int
        let body: [UInt8]
    }

    /// Why a request got no answer, in words for the operator.
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// Methods whose request may be sent twice with the effect of once
    /// (a gateway answers a second PUT of the same rule with the rule it
    /// holds, and a DELETE of a rule it no longer has with 404).
    static func idempotent(_ method: HTTPMethod) -> Bool {
        switch method {
        case .PUT, .DELETE, .GET, .HEAD: true
        default: false
        }
    }

    static let maxIdle = 16
    static let reuseWithin: UInt64 = 50_000_000_000
    static let maxAnswerBytes = 1 << 20

    private struct Idle {
        let connection: Connection
        let since: UInt64
    }

    private struct Connection: Sendable {
        let channel: any Channel
        let collector: NIOLoopBound<AnswerCollector>
    }

    /// Idle connections by endpoint, oldest first, and when they were last
    /// swept for every endpoint.
    private struct Table {
        var byEndpoint: [Endpoint: [Idle]] = [:]
        var swept: UInt64 = 0
    }

    private let group: any EventLoopGroup
    private let idle = Mutex(Table())
    /// Monotonic nanoseconds (a test's clock can jump).
    private let clock: @Sendable () -> UInt64

    init(group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
         clock: @escaping @Sendable () -> UInt64 = { NIODeadline.now().uptimeNanoseconds }) {
        self.group = group
        self.clock = clock
    }

    deinit {
        for connection in idle.withLock({ $0.byEndpoint.values.flatMap { $0 } }) { connection.connection.channel.close(promise: nil) }
    }

    /// Sends one request and collects its answer (at most `maxAnswerBytes`)
    /// within `timeout`, connection included.
    ///
    /// `head` makes the request's head; it is called again when the request
    /// is sent a second time, so a signed request is signed afresh (a
    /// gateway refuses a signature it has seen). That happens only on a kept
    /// connection: when it turns out closed before the request was written,
    /// and, for an idempotent method (PUT, DELETE, GET, HEAD), when the
    /// gateway closes it without a byte of answer (a gateway restarting or
    /// hot-upgrading as the request arrives). The second try is on a new
    /// connection, within the same deadline, and is not tried again.
    /// - Throws: `Failure` naming what went wrong (refused, timed out,
    ///   the TLS handshake, a closed connection, a bad answer).
    /// - Parameter retryable: whether the request may be sent again when
    ///   the gateway closes a kept connection without a byte of answer
    ///   (`idempotent(method)` unless the caller knows better).
    func send(_ endpoint: Endpoint, body: [UInt8], timeout: TimeAmount, retryable: Bool,
              head: () -> HTTPRequestHead) async throws(Failure) -> Answer {
        let deadline = NIODeadline.now() + timeout
        var reusable = take(endpoint)
        while true {
            let reused = reusable != nil
            let connection: Connection
            if let idle = reusable {
                connection = idle
                reusable = nil
            } else {
                connection = try await connect(endpoint, timeout: max(deadline - .now(), .milliseconds(1)))
            }
            let channel = connection.channel
            let promise = channel.eventLoop.makePromise(of: Collected.self)
            let collector = connection.collector
            let request = head()
            channel.eventLoop.execute {
                collector.value.send(head: request, body: body, deadline: deadline, promise: promise)
            }
            let collected: Collected
            do {
                collected = try await promise.futureResult.get()
            } catch {
                channel.close(promise: nil)
                // A kept connection that closed while idle: nothing was sent, so a new one may carry it.
                if reused, error is NotSent { continue }
                // Closed with no answer: an idempotent request may be sent again, once, on a new connection.
                if reused, error is Unanswered, retryable { continue }
                throw Self.failure(error)
            }
            if collected.keepAlive && request.isKeepAlive {
                giveBack(connection, to: endpoint)
            } else {
                channel.close(promise: nil)
            }
            return Answer(status: collected.status, body: collected.body)
        }
    }

    /// Idle connections to `endpoint` that are still open.
    func openIdleConnections(to endpoint: Endpoint) -> Int {
        idle.withLock { $0.byEndpoint[endpoint]?.filter { $0.connection.channel.isActive }.count ?? 0 }
    }

    /// The newest idle connection that is open and fresh; stale ones are closed.
    private func take(_ endpoint: Endpoint) -> Connection? {
        let now = clock()
        var stale: [any Channel] = []
        let found: Connection? = idle.withLock { table in
            defer { if table.byEndpoint[endpoint]?.isEmpty == true { table.byEndpoint[endpoint] = nil } }
            while let last = table.byEndpoint[endpoint]?.popLast() {
                if last.connection.channel.isActive && now &- last.since < Self.reuseWithin { return last.connection }
                stale.append(last.connection.channel)
            }
            return nil
        }
        for channel in stale { channel.close(promise: nil) }
        return found
    }

    private func giveBack(_ connection: Connection, to endpoint: Endpoint) {
        let now = clock()
        var closing: [any Channel] = []
        idle.withLock { table in
            // Once per `reuseWithin`, every endpoint: connections to a gateway
            // that is no longer pushed to (deleted, or its control_url
            // changed) are closed here rather than kept until it closes them.
            if now &- table.swept >= Self.reuseWithin {
                table.swept = now
                for kept in Array(table.byEndpoint.keys) where kept != endpoint {
                    var list = table.byEndpoint[kept] ?? []
                    closing += Self.dropStale(&list, now: now)
                    table.byEndpoint[kept] = list.isEmpty ? nil : list
                }
            }
            var list = table.byEndpoint[endpoint] ?? []
            closing += Self.dropStale(&list, now: now)
            if list.count >= Self.maxIdle { closing.append(list.removeFirst().connection.channel) }
            list.append(Idle(connection: connection, since: now))
            table.byEndpoint[endpoint] = list
        }
        for channel in closing { channel.close(promise: nil) }
    }

    /// Removes what has waited `reuseWithin` or longer (the oldest are
    /// first) and returns their channels, to be closed outside the lock.
    private static func dropStale(_ list: inout [Idle], now: UInt64) -> [any Channel] {
        let stale = list.prefix { now &- $0.since >= reuseWithin }.map(\.connection.channel)
        list.removeFirst(stale.count)
        return stale
    }

    private func connect(_ endpoint: Endpoint, timeout: TimeAmount) async throws(Failure) -> Connection {
        let tls = endpoint.tls
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(timeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    if let tls { try pipeline.addHandler(NIOSSLClientHandler(context: tls.context, serverHostname: nil)) }
                    try pipeline.addHTTPClientHandlers()
                    try pipeline.addHandler(AnswerCollector())
                }
            }
        do {
            let channel = try await bootstrap.connect(host: endpoint.host, port: endpoint.port).get()
            let collector = try await channel.eventLoop.submit {
                NIOLoopBound(try channel.pipeline.syncOperations.handler(type: AnswerCollector.self), eventLoop: channel.eventLoop)
            }.get()
            return Connection(channel: channel, collector: collector)
        } catch {
            throw Self.failure(error)
        }
    }

    private static func failure(_ error: any Error) -> Failure {
        if let failure = error as? Failure { return failure }
        if let unanswered = error as? Unanswered { return Failure(description: unanswered.description) }
        if let error = error as? ChannelError, case .connectTimeout = error { return Failure(description: "no connection within the call's timeout") }
        return Failure(description: "\(error)")
    }
}

/// The request was not written: the connection had closed.
private struct NotSent: Error, CustomStringConvertible {
    var description: String { "the connection was closed before the request" }
}

/// The connection ended, or was reset, before a byte of the answer came.
private struct Unanswered: Error, CustomStringConvertible {
    let description: String
}

/// What came back for one request.
private struct Collected: Sendable {
    let status: Int
    let body: [UInt8]
    let keepAlive: Bool
}

/// Writes one request and gathers its answer; fails the request when the
/// deadline passes, the connection ends or errs first (and closes it).
private final class AnswerCollector: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart

    private var context: ChannelHandlerContext?
    private var pending: EventLoopPromise<Collected>?
    private var timer: Scheduled<Void>?
    /// The answer's status; 0 until its head has come (a failure after it is not `Unanswered`).
    private var status = 0
    private var keepAlive = false
    private var body: [UInt8] = []

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        failClosed("the connection was closed before the answer")
        self.context = nil
    }

    func send(head: HTTPRequestHead, body: [UInt8], deadline: NIODeadline, promise: EventLoopPromise<Collected>) {
        guard let context, context.channel.isActive, pending == nil else {
            promise.fail(NotSent())
            return
        }
        pending = promise
        status = 0
        keepAlive = false
        self.body.removeAll(keepingCapacity: true)
        timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [weak self] in
            self?.fail(GatewayConnections.Failure(description: "no answer within the call's timeout"))
            context.close(promise: nil)
        }
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if !body.isEmpty {
            var buffer = context.channel.allocator.buffer(capacity: body.count)
            buffer.writeBytes(body)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard pending != nil else {
            // Nothing was asked: an answer out of turn is a broken connection.
            context.close(promise: nil)
            return
        }
        switch unwrapInboundIn(data) {
        case .head(let head):
            status = Int(head.status.code)
            keepAlive = head.isKeepAlive
        case .body(let buffer):
            guard body.count + buffer.readableBytes <= GatewayConnections.maxAnswerBytes else {
                fail(GatewayConnections.Failure(description: "an answer larger than \(GatewayConnections.maxAnswerBytes) bytes"))
                context.close(promise: nil)
                return
            }
            body.append(contentsOf: buffer.readableBytesView)
        case .end:
            timer?.cancel()
            timer = nil
            let answer = Collected(status: status, body: body, keepAlive: keepAlive)
            let promise = pending
            pending = nil
            promise?.succeed(answer)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        failClosed("the gateway closed the connection before answering")
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if status == 0, let error = error as? IOError, [ECONNRESET, EPIPE].contains(error.errnoCode) {
            failClosed("the gateway reset the connection before answering (\(error))")
        } else {
            fail(error)
        }
        context.close(promise: nil)
    }

    /// The connection ended: before the answer's head that is `Unanswered`.
    private func failClosed(_ reason: String) {
        fail(status != 0 ? GatewayConnections.Failure(description: reason) as any Error : Unanswered(description: reason))
    }

    private func fail(_ error: any Error) {
        timer?.cancel()
        timer = nil
        let promise = pending
        pending = nil
        promise?.fail(error)
    }
}
