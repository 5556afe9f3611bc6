import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTLS
import Logging
import ServiceSupport
import NIOCore
import NIOSSL
import PCoIPBrokerProtocol
import PCoIPHTTP
import ServiceLifecycle


/// The Connection Manager's listeners: HTTPS for PCoIP clients
/// (`POST /pcoip-broker/xml`, `GET /health`), and a local plain-HTTP control
/// endpoint for `pcoip-cmsg-setup status` (`GET /v1/status`, `GET /health`).
public enum ConnectionManagerServer {
    /// The TLS configuration of the client listener: the configured PEM
    /// certificate and key, TLS 1.2 or later.
    /// - Throws: `UpstreamFailure` naming the file that cannot be used.
    public static func tlsConfiguration(certificate: String, key: String) throws(UpstreamFailure) -> TLSConfiguration {
        let chain: [NIOSSLCertificate]
        do { chain = try NIOSSLCertificate.fromPEMFile(certificate) } catch {
            throw UpstreamFailure("SSLCert \(certificate): \(error)")
        }
        let privateKey: NIOSSLPrivateKey
        do { privateKey = try NIOSSLPrivateKey(file: key, format: .pem) } catch {
            throw UpstreamFailure("SSLKey \(key): \(error)")
        }
        var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) },
                                                           privateKey: .privateKey(privateKey))
        tls.minimumTLSVersion = .tlsv12
        return tls
    }

    /// The HTTPS application for clients.
    public static func application(manager: ConnectionManager, address: BindAddress, tls: TLSConfiguration, logger: Logger,
                                   onServerRunning: @escaping @Sendable (String) async -> Void = { _ in }) throws -> some ApplicationProtocol {
        let responder = CallbackResponder<ClientRequestContext> { request, context in
            await handle(request, context: context, manager: manager, logger: logger)
        }
        return Application(responder: responder,
                           server: try .tls(.http1(configuration: .init(idleTimeout: .seconds(120))), tlsConfiguration: tls),
                           configuration: .init(address: address, serverName: nil),
                           onServerRunning: { channel in await onServerRunning(describe(channel)) },
                           logger: logger)
    }

    /// The local control application (`ControlListen`).
    public static func controlApplication(manager: ConnectionManager, address: BindAddress, logger: Logger,
                                          onServerRunning: @escaping @Sendable (String) async -> Void = { _ in }) -> some ApplicationProtocol {
        let responder = CallbackResponder<BasicRequestContext> { request, _ in
            switch (request.method, request.uri.path) {
            case (.get, "/health"): return health(manager)
            case (.get, "/metrics"):
                let bytes = await ServiceMetrics.shared.scrape()
                return Response(status: .ok, headers: [.contentType: ServiceMetrics.contentType],
                                body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
            case (.get, "/v1/status"):
                let data = (try? JSONEncoder().encode(manager.status())) ?? Data("{}".utf8)
                return Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: data)))
            default:
                return json(404, ["error": "\(request.method) \(request.uri.path): not a control path"])
            }
        }
        return Application(responder: responder, configuration: .init(address: address, serverName: nil),
                           onServerRunning: { channel in await onServerRunning(describe(channel)) },
                           logger: logger)
    }

    static func describe(_ channel: any Channel) -> String {
        guard let local = channel.localAddress, let ip = local.ipAddress, let port = local.port else { return "?" }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    static func handle(_ request: Request, context: ClientRequestContext, manager: ConnectionManager, logger: Logger) async -> Response {
        switch (request.method, request.uri.path) {
        case (.get, "/health"):
            return health(manager)
        case (.post, PCoIPBroker.path):
            var request = request
            let client = context.clientAddress
            guard let body = await PCoIPHTTP.body(&request) else {
                return PCoIPHTTP.answer(BrokerAnswer.error(.errorMalformed, "the request body is larger than \(PCoIPHTTP.maxBodyBytes) bytes"),
                                        setCookie: nil)
            }
            let cookie = PCoIPHTTP.cookie(PCoIPBroker.cookieName, in: request.headers)
            let logID = request.headers[HTTPField.Name(PCoIPBroker.clientLogIDHeader)!].map { String($0.prefix(128)) }
            let answer = await manager.handle(body: body, cookie: cookie, clientLogID: logID, clientAddress: client)
            return PCoIPHTTP.answer(bytes: answer.bytes,
                                    setCookie: answer.sessionToken.map { PCoIPHTTP.sessionCookie($0, secure: true) })
        default:
            return json(404, ["error": "\(request.method) \(request.uri.path): not found (PCoIP clients POST \(PCoIPBroker.path))"])
        }
    }

    /// 200 `{"code":200,"status":"success"}`, or 500 with the reason.
    static func health(_ manager: ConnectionManager) -> Response {
        if let reason = manager.problem {
            return json(500, ["code": 500, "status": "failure", "reason": .string(reason)])
        }
        return json(200, ["code": 200, "status": "success"])
    }

    static func json(_ status: Int, _ object: [String: FlatJSON.Value]) -> Response {
        Response(status: HTTPResponse.Status(code: status), headers: [.contentType: "application/json"],
                 body: .init(byteBuffer: ByteBuffer(bytes: FlatJSON.encode(object))))
    }
}

/// A request's context with the client's address (the TCP peer).
public struct ClientRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    public let clientAddress: String

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        clientAddress = source.channel.remoteAddress?.ipAddress ?? ""
    }
}

/// Checks the gateways and the broker every `HealthCheckInterval` (a `Service`).
public struct UpstreamProber: Service {
    let manager: ConnectionManager

    public init(manager: ConnectionManager) { self.manager = manager }

    public func run() async throws {
        while !Task.isCancelledOrShuttingDown {
            await manager.checkUpstreams()
            let interval = manager.config.healthCheckSeconds
            try? await Task.sleep(for: .milliseconds(Int64(interval * 1000)))
        }
    }
}

extension Task where Success == Never, Failure == Never {
    static var isCancelledOrShuttingDown: Bool { Task.isCancelled || Task.isShuttingDownGracefully }
}
