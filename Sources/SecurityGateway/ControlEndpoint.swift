import FoundationEssentials
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import NIOSSL
import Logging
import NIOCore
import ServiceSupport
import SystemLayer

/// The Security Gateway's control endpoint (`ControlListen`), through which a
/// Connection Manager prepares and revokes sessions. A grant is admitted only
/// if its signature verifies, so the endpoint needs no other secret.
///
/// - `POST /v1/sessions` `{"grant": "<JWT>"}` → 201 prepared, 200 already
///   prepared, 400 malformed, 401 not admissible (forged, expired, not yet
///   valid, another group, `none` or HMAC), 409 replayed single-use grant.
/// - `DELETE /v1/sessions/{session id}` → 200 `{"revoked": n, "closed_connections": c}`
///   (prepared grants removed, live connections reset), 404 when neither.
/// - `GET /health` → 200 `{"code":200,"status":"success"}` or 500 with `reason`.
/// - `GET /v1/status` → the counters (`SecurityGateway.Status`).
public enum SecurityGatewayControl {
    public static let maxBodyBytes = 16 * 1024

    /// A Hummingbird application serving `gateway` on `address`.
    /// - Parameter onServerRunning: called with the bound address (`host:port`).
    /// - Parameter tls: TLS for the endpoint (`ServerTLS`); nil: plain HTTP (`ControlPlainHTTP = true`, tests).
    public static func application(gateway: SecurityGateway, address: BindAddress, logger: Logger, tls: TLSConfiguration? = nil,
                                   onServerRunning: @escaping @Sendable (String) async -> Void = { _ in }) throws
        -> some ApplicationProtocol
    {
        let responder = CallbackResponder<BasicRequestContext> { request, context in
            await handle(request, gateway: gateway, logger: context.logger)
        }
        let server: HTTPServerBuilder = if let tls { try .tls(.http1(), tlsConfiguration: tls) } else { .http1() }
        return Application(responder: responder, server: server, configuration: .init(address: address, serverName: nil),
                           onServerRunning: { channel in
                               if let local = channel.localAddress, let ip = local.ipAddress, let port = local.port {
                                   await onServerRunning(ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)")
                               }
                           },
                           logger: logger)
    }

    /// Answers one request. Whatever may block (the grant journal's fsync,
    /// waits for the relay loops, locks held across them) runs on
    /// `BlockingExecutor.shared`, never on Swift's cooperative threads, so
    /// `/health` answers while the machine is busy: inline when the request
    /// already runs there (`serve` runs its servers' tasks on that pool), else
    /// handed to it.
    static func handle(_ request: Request, gateway: SecurityGateway, logger: Logger) async -> Response {
        var request = request
        let method = request.method.rawValue
        let path = request.uri.path
        switch (method, path) {
        case ("GET", "/health"):
            if let reason = await BlockingExecutor.shared.runOffPool({ gateway.problem }) {
                return json(500, ["code": 500, "status": "failure", "reason": .string(reason)])
            }
            return json(200, ["code": 200, "status": "success"])
        case ("GET", "/metrics"):
            let bytes = await ServiceMetrics.shared.scrape()
            return Response(status: .ok, headers: [.contentType: ServiceMetrics.contentType],
                            body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
        case ("GET", "/v1/status"):
            let status = await BlockingExecutor.shared.runOffPool { gateway.status() }
            let data = (try? JSONEncoder().encode(status)) ?? Data("{}".utf8)
            return raw(200, Array(data))
        case ("POST", "/v1/sessions"):
            let body: [UInt8]
            do {
                body = Array(try await request.collectBody(upTo: maxBodyBytes).readableBytesView)
            } catch is NIOTooManyBytesError {
                return json(413, ["error": "body: larger than the limit of \(maxBodyBytes) bytes", "field": "body"])
            } catch {
                return json(400, ["error": "body: cannot be read", "field": "body"])
            }
            guard let object = try? JSONDecoder().decode(PrepareBody.self, from: Data(body)) else {
                return json(400, ["error": "body: not a JSON object", "field": "body"])
            }
            guard let token = object.grant, !token.isEmpty else {
                return json(400, ["error": "grant: missing (a string holding the signed JWT)", "field": "grant"])
            }
            if let extra = object.keys.sorted().first(where: { $0 != "grant" }) {
                return json(400, ["error": "\(extra): unknown field", "field": .string(extra)])
            }
            let answer = await gateway.prepare(token: token)
            logger.info("control: POST /v1/sessions -> \(answer.status)")
            return json(answer.status, answer.body.mapValues(FlatJSON.Value.string))
        default:
            let prefix = "/v1/sessions/"
            if path.hasPrefix(prefix) && path.count > prefix.count {
                guard method == "DELETE" else {
                    return json(405, ["error": "\(method) \(path): only DELETE is allowed here"])
                }
                let id = PercentDecoding.decode(path.dropFirst(prefix.count)) ?? ""
                guard !id.isEmpty, id.utf8.count <= 256 else { return json(400, ["error": "session id: empty or too long", "field": "id"]) }
                let done = await BlockingExecutor.shared.runOffPool { gateway.revoke(sessionID: id) }
                return done.grants > 0 || done.connections > 0
                    ? json(200, ["revoked": .int(done.grants), "closed_connections": .int(done.connections)])
                    : json(404, ["error": "session id: no prepared grant or live connection for this session", "field": "id"])
            }
            return json(404, ["error": "\(method) \(path): not a control path"])
        }
    }

    static func json(_ status: Int, _ object: [String: FlatJSON.Value]) -> Response {
        raw(status, FlatJSON.encode(object))
    }

    static func raw(_ status: Int, _ bytes: [UInt8]) -> Response {
        Response(status: HTTPResponse.Status(code: status), headers: [.contentType: "application/json"],
                 body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}

/// The body of `POST /v1/sessions`: any JSON object; `grant` when it is a
/// string, and every key, so that an unknown one is named.
private struct PrepareBody: Decodable {
    let grant: String?
    let keys: [String]

    private struct Key: CodingKey {
        let stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: any Decoder) throws {
        let fields = try decoder.container(keyedBy: Key.self)
        keys = fields.allKeys.map(\.stringValue)
        grant = try? fields.decode(String.self, forKey: Key(stringValue: "grant"))
    }
}
