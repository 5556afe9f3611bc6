import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization
import SystemLayer

/// One HTTP/1.1 request as `InlineHTTPServer` hands it to its handler: the
/// whole body already read (at most the server's limit).
public struct InlineRequest: Sendable {
    /// `GET`, `PUT`, ...
    public let method: String
    /// The path as sent (not percent-decoded), without the query.
    public let path: String
    public let headers: HTTPHeaders
    public let body: [UInt8]

    public init(method: String, path: String, headers: HTTPHeaders = [:], body: [UInt8] = []) {
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
    }

    /// The first value of the header `name` (case-insensitive).
    public func header(_ name: String) -> String? { headers.first(name: name) }
}

/// An answer: a status, a content type (none for 204) and the body.
public struct InlineResponse: Sendable {
    public var status: Int
    public var contentType: String?
    public var body: [UInt8]

    public init(status: Int, contentType: String? = "application/json", body: [UInt8] = []) {
        self.status = status
        self.contentType = contentType
        self.body = body
    }
}

/// A small HTTP/1.1 server (plain or TLS) whose handler runs on the thread
/// that read the request, and may block there.
///
/// The control endpoints (the gateway's rule pushes, the Security Gateway's
/// prepares, issue 15) do work that blocks by nature: a wait for the relay
/// loop that installs a rule, a journal's fdatasync. Hummingbird read a
/// request on an event loop, resumed its task on a pool thread, and wrote
/// the answer from the event loop again: two thread switches and an async
/// task per request, on top of the work's own. Here the event loops are
/// threads of this server alone (`threads` of them, dedicated: blocking is
/// allowed on them, and nothing else runs there), and a request is read,
/// handled and answered on one of them. While a request blocks, the other
/// connections of its loop wait; connections are spread over the loops as
/// they are accepted, so a peer with several connections is served by
/// several threads at once (a journal's group commit still gathers them).
///
/// Refusals: a body over `maxBodyBytes` (declared or read) gets
/// `tooLarge(method, declared)` and the connection is closed; a request HTTP cannot
/// parse gets 400 and the connection is closed (NIO's error handler).
///
/// Peers cannot hold descriptors: a connection must deliver each whole
/// request (the first one including the TLS handshake) within `idleTimeout`
/// of its start or of the answer before it, else it is closed; that bounds
/// an idle keep-alive connection and a request sent a byte at a time alike.
/// The timeout is longer than HTTP clients keep an idle connection pooled
/// (AsyncHTTPClient 60 s), so a client does not race the close. Beyond
/// `maxConnections` open at once, a new connection is closed as it is
/// accepted (logged at most every 10 s).
public final class InlineHTTPServer: Service, Sendable {
    public typealias Handler = @Sendable (InlineRequest) -> InlineResponse

    private let host: String
    private let port: Int
    private let tls: NIOSSLContext?
    private let threads: Int
    private let settings: Settings
    private let logger: Logger
    private let onBound: @Sendable (String) -> Void
    private let maxConnections: Int

    struct Settings: Sendable {
        let idleTimeout: TimeAmount
        let maxBodyBytes: Int
        let tooLarge: @Sendable (_ method: String, _ declared: Int?) -> InlineResponse
        let handler: Handler
    }

    /// - Parameters:
    ///   - host: the address to listen on (numeric, or a name).
    ///   - tls: TLS for the endpoint; nil: plain HTTP.
    ///   - threads: event loops (≥ 1), each handling one request at a time.
    ///   - maxBodyBytes: the largest body read; `tooLarge` answers beyond it
    ///     (given the method, and the declared length when there was one).
    ///   - idleTimeout: how long a connection may take to deliver a whole request.
    ///   - maxConnections: connections open at once; more are closed as they come.
    ///   - onBound: called once with the bound address (`host:port`, an IPv6 host in brackets).
    /// - Throws: what NIOSSL throws for an unusable TLS configuration.
    public init(host: String, port: Int, tls: TLSConfiguration?, threads: Int, maxBodyBytes: Int,
                idleTimeout: Duration = .seconds(75), maxConnections: Int = 512,
                tooLarge: @escaping @Sendable (_ method: String, _ declared: Int?) -> InlineResponse, logger: Logger,
                onBound: @escaping @Sendable (String) -> Void = { _ in }, handler: @escaping Handler) throws {
        precondition(threads >= 1, "InlineHTTPServer needs at least one thread")
        precondition(maxConnections >= 1, "InlineHTTPServer needs to allow at least one connection")
        self.host = host
        self.port = port
        self.tls = try tls.map { try NIOSSLContext(configuration: $0) }
        self.threads = threads
        self.maxConnections = maxConnections
        settings = Settings(idleTimeout: TimeAmount(idleTimeout), maxBodyBytes: maxBodyBytes, tooLarge: tooLarge, handler: handler)
        self.logger = logger
        self.onBound = onBound
    }

    /// Binds, serves until graceful shutdown (or cancellation), then closes
    /// the listener and every connection and ends its threads.
    /// - Throws: why it could not bind.
    public func run() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let (tls, settings, limit, logger) = (self.tls, self.settings, self.maxConnections, self.logger)
        let open = ConnectionCount()
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 4)
            .childChannelInitializer { channel in
                // Failing the initializer makes NIO close the new connection.
                guard open.admit(limit: limit, logger: logger) else { return channel.eventLoop.makeFailedFuture(TooManyConnections()) }
                channel.closeFuture.whenComplete { _ in open.release() }
                return channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    if let tls { try pipeline.addHandler(NIOSSLServerHandler(context: tls)) }
                    try pipeline.configureHTTPServerPipeline(withPipeliningAssistance: true, withErrorHandling: true)
                    try pipeline.addHandler(InlineHTTPHandler(settings: settings))
                }
            }
        let channel: any Channel
        do {
            channel = try await bootstrap.bind(host: host, port: port).get()
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
        if let local = channel.localAddress, let ip = local.ipAddress, let port = local.port {
            onBound(ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)")
        }
        // Until SIGTERM's graceful shutdown, or the task's cancellation.
        try? await gracefulShutdown()
        try? await channel.close()
        try? await group.shutdownGracefully()
    }
}

private struct TooManyConnections: Error {}

/// The connections a server has open, and when it last logged refusing one.
private final class ConnectionCount: Sendable {
    private let count = Atomic<Int>(0)
    private let lastLogged = Atomic<UInt64>(0)

    /// Counts a new connection in, or says it is one too many.
    func admit(limit: Int, logger: Logger) -> Bool {
        if count.add(1, ordering: .relaxed).newValue <= limit { return true }
        count.subtract(1, ordering: .relaxed)
        let now = MonotonicClock.nowNanoseconds, last = lastLogged.load(ordering: .relaxed)
        if now &- last >= 10_000_000_000 || last == 0,
           lastLogged.compareExchange(expected: last, desired: now, ordering: .relaxed).exchanged {
            logger.warning("refusing connections: \(limit) are open, the most this endpoint keeps")
        }
        return false
    }

    func release() { count.subtract(1, ordering: .relaxed) }
}

/// Collects one request (head, body up to the limit, end), runs the handler
/// right here, writes the answer. Pipelined requests are held back by NIO's
/// pipelining handler until the answer before them is written.
private final class InlineHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let settings: InlineHTTPServer.Settings
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    /// The request was refused before its end: drop what is left of it.
    private var refused = false
    /// Closes the connection unless the next request is whole by then.
    private var deadline: Scheduled<Void>?

    init(settings: InlineHTTPServer.Settings) {
        self.settings = settings
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // This event loop is the server's own: the handler may block here.
        BlockingCallCheck.markDedicated()
        armDeadline(context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
    }

    /// From now, the peer has `idleTimeout` to deliver a whole request.
    private func armDeadline(context: ChannelHandlerContext) {
        deadline?.cancel()
        let channel = context.channel
        deadline = context.eventLoop.scheduleTask(in: settings.idleTimeout) { channel.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let next):
            head = next
            body.removeAll(keepingCapacity: body.capacity <= 64 * 1024)
            refused = false
            if let declared = next.headers.first(name: "content-length").flatMap({ Int($0) }), declared > settings.maxBodyBytes {
                refuse(declared: declared, context: context)
            }
        case .body(let buffer):
            guard !refused else { return }
            guard body.count + buffer.readableBytes <= settings.maxBodyBytes else {
                refuse(declared: nil, context: context)
                return
            }
            body.append(contentsOf: buffer.readableBytesView)
        case .end:
            guard !refused, let request = head else { return }
            head = nil
            deadline?.cancel()
            deadline = nil
            let uri = request.uri
            let path = uri.firstIndex(of: "?").map { String(uri[..<$0]) } ?? uri
            let response = settings.handler(InlineRequest(method: request.method.rawValue, path: path,
                                                          headers: request.headers, body: body))
            write(response, keepAlive: request.isKeepAlive, version: request.version, context: context)
        }
    }

    /// Answers a body over the limit and closes: the rest of it is not read.
    private func refuse(declared: Int?, context: ChannelHandlerContext) {
        refused = true
        let version = head?.version ?? .http1_1
        let method = head?.method.rawValue ?? ""
        head = nil
        body.removeAll()
        write(settings.tooLarge(method, declared), keepAlive: false, version: version, context: context)
    }

    private func write(_ response: InlineResponse, keepAlive: Bool, version: HTTPVersion, context: ChannelHandlerContext) {
        var headers = HTTPHeaders()
        if let type = response.contentType { headers.add(name: "content-type", value: type) }
        if response.status != 204 && response.status >= 200 { headers.add(name: "content-length", value: String(response.body.count)) }
        if !keepAlive { headers.add(name: "connection", value: "close") }
        let status = HTTPResponseStatus(statusCode: response.status)
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: status, headers: headers))), promise: nil)
        if !response.body.isEmpty {
            var buffer = context.channel.allocator.buffer(capacity: response.body.count)
            buffer.writeBytes(response.body)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        if keepAlive {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            armDeadline(context: context)
        } else {
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
