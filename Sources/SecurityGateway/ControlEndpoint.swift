import FoundationEssentials
import NIOSSL
import Logging
import ServiceSupport
import SystemLayer

/// The Security Gateway's control endpoint (`ControlListen`), through which a
/// Connection Manager prepares and revokes sessions. A grant is admitted only
/// if its signature verifies, so the endpoint needs no other secret.
///
/// - `POST /v1/sessions` `{"grant": "<JWT>"}` → 201 prepared, 200 already
///   prepared, 400 malformed, 401 not admissible (forged, expired, not yet
///   valid, another group, `none` or HMAC), 409 replayed single-use grant.
/// - `POST /v1/sessions` `{"grants": ["<JWT>", ...]}` → 200 `{"results": [...]}`:
///   a batch (a Connection Manager in a reconnect storm), each grant answered
///   as alone with its `status`, the journal made durable once.
/// - `DELETE /v1/sessions/{session id}` → 200 `{"revoked": n, "closed_connections": c}`
///   (prepared grants removed, live connections reset), 404 when neither.
/// - `GET /health` → 200 `{"code":200,"status":"success"}` or 500 with `reason`.
/// - `GET /v1/status` → the counters (`SecurityGateway.Status`).
public enum SecurityGatewayControl {
    /// A batch of `maxGrants` grants of about 700 bytes each fits.
    public static let maxBodyBytes = 128 * 1024

    /// The endpoint's threads: a prepare blocks its thread for the grant
    /// journal's fdatasync, so concurrent prepares need a thread each to
    /// share one (group commit).
    public static let defaultThreads = 8

    /// A server of `gateway` on `host`:`port` (an `InlineHTTPServer`: each
    /// request read, handled and answered on one of its own threads), run as
    /// a `Service`.
    /// - Parameter onServerRunning: called with the bound address (`host:port`).
    /// - Parameter tls: TLS for the endpoint (`ServerTLS`); nil: plain HTTP (`ControlPlainHTTP = true`, tests).
    /// - Throws: what NIOSSL throws for an unusable TLS configuration.
    public static func application(gateway: SecurityGateway, host: String, port: Int, logger: Logger, tls: TLSConfiguration? = nil,
                                   threads: Int = defaultThreads,
                                   onServerRunning: @escaping @Sendable (String) -> Void = { _ in }) throws -> InlineHTTPServer {
        try InlineHTTPServer(host: host, port: port, tls: tls, threads: threads, maxBodyBytes: maxBodyBytes,
                             tooLarge: { _, _ in
                                 json(413, ["error": "body: larger than the limit of \(maxBodyBytes) bytes", "field": "body"])
                             },
                             logger: logger, onBound: onServerRunning) { request in
            handle(request, gateway: gateway, logger: logger)
        }
    }

    /// Answers one request on the server's thread that read it. What may
    /// block (the grant journal's fdatasync, waits for the relay loops, locks
    /// held across them) blocks that thread, the server's own: never one of
    /// Swift's cooperative threads, so `/health` of another server answers
    /// while the machine is busy.
    static func handle(_ request: InlineRequest, gateway: SecurityGateway, logger: Logger) -> InlineResponse {
        let method = request.method
        let path = request.path
        switch (method, path) {
        case ("GET", "/health"):
            if let reason = gateway.problem {
                return json(500, ["code": 500, "status": "failure", "reason": .string(reason)])
            }
            return json(200, ["code": 200, "status": "success"])
        case ("GET", "/metrics"):
            return InlineResponse(status: 200, contentType: ServiceMetrics.contentType, body: ServiceMetrics.shared.exposition())
        case ("GET", "/v1/status"):
            let data = (try? JSONEncoder().encode(gateway.status())) ?? Data("{}".utf8)
            return raw(200, Array(data))
        case ("POST", "/v1/sessions"):
            guard let object = try? JSONDecoder().decode(PrepareBody.self, from: Data(request.body)) else {
                return json(400, ["error": "body: not a JSON object", "field": "body"])
            }
            if let extra = object.keys.sorted().first(where: { $0 != "grant" && $0 != "grants" }) {
                return json(400, ["error": "\(extra): unknown field", "field": .string(extra)])
            }
            if object.keys.contains("grants") {
                return prepareMany(object, gateway: gateway, logger: logger)
            }
            guard let token = object.grant, !token.isEmpty else {
                return json(400, ["error": "grant: missing (a string holding the signed JWT)", "field": "grant"])
            }
            let answer = gateway.prepare(token: token)
            // A prepared session has its own line (the session, the target); the rest are said here.
            if answer.status != 201 { logger.info("control: POST /v1/sessions -> \(answer.status)") }
            return json(answer.status, answer.body.mapValues(FlatJSON.Value.string))
        default:
            let prefix = "/v1/sessions/"
            if path.hasPrefix(prefix) && path.count > prefix.count {
                guard method == "DELETE" else {
                    return json(405, ["error": "\(method) \(path): only DELETE is allowed here"])
                }
                let id = PercentDecoding.decode(path.dropFirst(prefix.count)) ?? ""
                guard !id.isEmpty, id.utf8.count <= 256 else { return json(400, ["error": "session id: empty or too long", "field": "id"]) }
                let done = gateway.revoke(sessionID: id)
                return done.grants > 0 || done.connections > 0
                    ? json(200, ["revoked": .int(done.grants), "closed_connections": .int(done.connections)])
                    : json(404, ["error": "session id: no prepared grant or live connection for this session", "field": "id"])
            }
            return json(404, ["error": "\(method) \(path): not a control path"])
        }
    }

    /// `POST /v1/sessions` `{"grants": ["<JWT>", ...]}`: a batch, each grant
    /// checked and prepared as alone, the journal made durable once; 200
    /// `{"results": [<each grant's answer with its "status">, ...]}` in order.
    /// A batch that is not a list of 1 to `maxGrants` non-empty strings, or
    /// that also holds `grant`, is refused whole (400) and prepares nothing.
    static func prepareMany(_ object: PrepareBody, gateway: SecurityGateway, logger: Logger) -> InlineResponse {
        guard object.grant == nil, !object.keys.contains("grant") else {
            return json(400, ["error": "grant, grants: one or the other, not both", "field": "grants"])
        }
        guard let tokens = object.grants, (1...maxGrants).contains(tokens.count), tokens.allSatisfy({ !$0.isEmpty }) else {
            return json(400, ["error": "grants: a list of 1 to \(maxGrants) signed JWTs (non-empty strings)", "field": "grants"])
        }
        let answers = gateway.prepare(tokens: tokens)
        let refused = answers.filter { $0.status != 201 && $0.status != 200 }.count
        if refused > 0 { logger.info("control: POST /v1/sessions (batch of \(tokens.count)): \(refused) refused") }
        var out = Array("{\"results\":[".utf8)
        for (i, answer) in answers.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            var item = answer.body.mapValues(FlatJSON.Value.string)
            item["status"] = .int(answer.status)
            out.append(contentsOf: FlatJSON.encode(item))
        }
        out.append(contentsOf: Array("]}".utf8))
        return raw(200, out)
    }

    /// Grants in one batch.
    public static let maxGrants = 128

    static func json(_ status: Int, _ object: [String: FlatJSON.Value]) -> InlineResponse {
        raw(status, FlatJSON.encode(object))
    }

    static func raw(_ status: Int, _ bytes: [UInt8]) -> InlineResponse {
        InlineResponse(status: status, body: bytes)
    }
}

/// The body of `POST /v1/sessions`: any JSON object; `grant` when it is a
/// string, and every key, so that an unknown one is named.
struct PrepareBody: Decodable {
    let grant: String?
    /// A batch's grants; nil when absent or not a list of strings.
    let grants: [String]?
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
        grants = try? fields.decode([String].self, forKey: Key(stringValue: "grants"))
    }
}
