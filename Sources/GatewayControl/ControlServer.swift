import ControlProtocol
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import NIOSSL
import Logging
import CoreMetrics
import NIOCore
import ServiceSupport
import SystemLayer

/// The control endpoint the broker calls (`control_listen`):
/// `PUT|DELETE /control/v1/rules/{id}` and `GET /control/v1/rules`, each
/// signed broker-to-gateway, and an unsigned `GET /health`. Runs on Hummingbird's own NIO threads, apart
/// from the relay loops. Every refusal is `{"error": ..., "field": ...}`
/// with a 4xx, and changes nothing.
public enum ControlServer {
    public static let rulesPath = "/control/v1/rules"

    /// A Hummingbird application serving `control` on `address`.
    /// - Parameter onServerRunning: called with the bound address (`host:port`).
    /// - Parameter tls: TLS for the endpoint (`ServerTLS`); nil: plain HTTP (`control_plain_http = yes`, tests).
    public static func application(control: GatewayControl, address: BindAddress, logger: Logger, tls: TLSConfiguration? = nil,
                                   onServerRunning: @escaping @Sendable (String) async -> Void = { _ in }) throws
        -> some ApplicationProtocol
    {
        let responder = CallbackResponder<BasicRequestContext> { request, context in
            await handle(request, control: control, logger: context.logger)
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

    /// Answers one request. Checking the signature and the change itself
    /// (the control state's lock, the relay loops taking the new rules, the
    /// rules file's fdatasync) may block, so they never run on Swift's
    /// cooperative threads: inline when the request already runs on a
    /// dedicated thread (the gateway runs this server's tasks on
    /// `BlockingExecutor.shared`: no hop per request), else on
    /// `BlockingExecutor.shared`. One slow push never holds back another
    /// server of the process.
    static func handle(_ request: Request, control: GatewayControl, logger: Logger) async -> Response {
        var request = request
        let method = request.method.rawValue
        let path = request.uri.path
        if path == healthPath {
            return await health(method: method, control: control)
        }
        if path == metricsPath {
            return await metrics(method: method)
        }
        let started = MonotonicClock.nowNanoseconds
        do throws(ControlError) {
            // A copy under a lock held only to copy: no hop to another thread.
            let body = try await readBody(&request, limit: control.settings.maxBodyBytes)
            let authorization = request.headers[.authorization]
            let work = { @Sendable () -> Result<Response, ControlError> in
                Result { () throws(ControlError) in
                    try control.authenticate(header: authorization, method: method, path: path, body: body)
                    return try route(method: method, path: path, body: body, control: control)
                }
            }
            let result = await BlockingExecutor.shared.runOffPool(work)
            let response = try result.get()
            countCall(method: method, status: Int(response.status.code), since: started)
            logger.info("control: \(method) \(path) -> \(response.status.code)", metadata: ruleMetadata(path))
            return response
        } catch {
            countCall(method: method, status: error.status, since: started)
            // The message never holds the key; it may name the rule id and fields.
            var metadata = ruleMetadata(path)
            metadata["reason"] = "\(error.message)"
            logger.notice("control: \(method) \(path) -> \(error.status): \(error.message)", metadata: metadata)
            return json(error.status, errorBody(error))
        }
    }

    public static let metricsPath = "/metrics"

    /// `GET /metrics`, unsigned like `/health`: the Prometheus exposition of
    /// `ServiceMetrics.shared` (read off Swift's cooperative threads: the
    /// relay's collectors wait for each loop).
    static func metrics(method: String) async -> Response {
        guard method == "GET" else {
            return json(405, errorBody(ControlError(405, "\(method) \(metricsPath): only GET is allowed here")))
        }
        let bytes = await ServiceMetrics.shared.scrape()
        return Response(status: .ok, headers: [.contentType: ServiceMetrics.contentType],
                        body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    /// Rule pushes (PUT, DELETE) and reads (GET) by status, and how long each took.
    static func countCall(method: String, status: Int, since started: UInt64) {
        let elapsed = MonotonicClock.nowNanoseconds &- started
        MetricHandles.counter("gateway_rule_pushes_total", [("method", method), ("status", String(status))]).increment()
        MetricHandles.timer("gateway_rule_push_duration_seconds", [("method", method)]).recordNanoseconds(Int64(clamping: elapsed))
    }

    static func ruleMetadata(_ path: String) -> Logger.Metadata {
        guard path.hasPrefix(rulesPath + "/") else { return [:] }
        return ["rule": "\(path.dropFirst(rulesPath.count + 1))"]
    }

    public static let healthPath = "/health"

    /// `GET /health`, unsigned (it tells nothing a port scan does not):
    /// 200 `{"code":200,"status":"success","rules":N}`, or 500 with `reason`
    /// when the relay no longer takes rules.
    static func health(method: String, control: GatewayControl) async -> Response {
        guard method == "GET" else {
            return json(405, errorBody(ControlError(405, "\(method) \(healthPath): only GET is allowed here")))
        }
        let (rules, problem) = await BlockingExecutor.shared.runOffPool { (control.pushedRules().count, control.problem) }
        if let problem {
            return json(500, ControlJSON.encode(HealthAnswer(code: 500, status: "failure", rules: rules, reason: problem)))
        }
        return json(200, ControlJSON.encode(HealthAnswer(code: 200, status: "success", rules: rules, reason: nil)))
    }

    struct HealthAnswer: Encodable {
        let code: Int
        let status: String
        let rules: Int
        let reason: String?
    }

    static func route(method: String, path: String, body: [UInt8], control: GatewayControl) throws(ControlError) -> Response {
        if path == rulesPath || path == rulesPath + "/" {
            guard method == "GET" else { throw ControlError(405, "\(method) \(path): only GET is allowed here") }
            return json(200, ControlJSON.encode(control.rules()))
        }
        guard path.hasPrefix(rulesPath + "/") else { throw ControlError(404, "\(path): not a control path") }
        let id = String(path.dropFirst(rulesPath.count + 1))
        try RulePolicy.checkID(id)
        switch method {
        case "PUT":
            let push: RulePush
            do throws(ControlMessageError) {
                push = try ControlJSON.decodeStrict(RulePush.self, from: body, allowed: RulePush.fields)
            } catch {
                throw ControlError(400, field: error.field, error.description)
            }
            let (rule, created) = try control.put(id: id, push: push)
            let listen = "\(control.settings.publicAddress.isIPv4 ? "\(control.settings.publicAddress)" : "[\(control.settings.publicAddress)]"):\(rule.port)"
            return json(created ? 201 : 200, ControlJSON.encode(PutAnswer(id: rule.id, port: rule.port, listen: listen)))
        case "DELETE":
            try control.delete(id: id)
            return Response(status: .noContent)
        case "GET":
            guard let rule = control.rules().first(where: { $0.id == id }) else {
                throw ControlError(404, field: "id", "id: no rule \(id)")
            }
            return json(200, ControlJSON.encode(rule))
        default:
            throw ControlError(405, "\(method) \(path): only PUT, DELETE and GET are allowed here")
        }
    }

    struct PutAnswer: Encodable {
        let id: String
        let port: Int
        let listen: String
    }

    /// The body, at most `limit` bytes: 413 beyond (declared or read).
    static func readBody(_ request: inout Request, limit: Int) async throws(ControlError) -> [UInt8] {
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > limit {
            throw ControlError(413, field: "body", "body: \(declared) bytes is larger than the limit of \(limit) bytes")
        }
        do {
            let buffer = try await request.collectBody(upTo: limit)
            return Array(buffer.readableBytesView)
        } catch is NIOTooManyBytesError {
            throw ControlError(413, field: "body", "body: larger than the limit of \(limit) bytes")
        } catch {
            throw ControlError(400, field: "body", "body: cannot be read (\(error))")
        }
    }

    static func errorBody(_ error: ControlError) -> [UInt8] {
        var object: [String: String] = ["error": error.message]
        if let field = error.field { object["field"] = field }
        return ControlJSON.encode(object)
    }

    static func json(_ status: Int, _ bytes: [UInt8]) -> Response {
        Response(status: HTTPResponse.Status(code: status), headers: [.contentType: "application/json"],
                 body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}
