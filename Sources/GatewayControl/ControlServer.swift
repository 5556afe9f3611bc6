import ControlProtocol
import Foundation
import NIOSSL
import Logging
import CoreMetrics
import ServiceSupport
import SystemLayer

/// The control endpoint the broker calls (`control_listen`):
/// `PUT|DELETE /control/v1/rules/{id}`, `GET /control/v1/rules` and
/// `POST /control/v1/rules` (a batch of puts and deletes), each
/// signed broker-to-gateway, and an unsigned `GET /health`. Served by an
/// `InlineHTTPServer`: threads of its own, apart from the relay loops, each
/// reading a request, handling it and answering on the same thread. Every
/// refusal is `{"error": ..., "field": ...}` with a 4xx, and changes nothing.
public enum ControlServer {
    public static let rulesPath = "/control/v1/rules"

    /// The endpoint's threads: a push blocks its thread while the relay loop
    /// installs the rule and the journal syncs, so concurrent pushes need a
    /// thread each to share one fdatasync (group commit).
    public static let defaultThreads = 8

    /// A server of `control` on `host`:`port`, run as a `Service`.
    /// - Parameter onServerRunning: called with the bound address (`host:port`).
    /// - Parameter tls: TLS for the endpoint (`ServerTLS`); nil: plain HTTP (`control_plain_http = yes`, tests).
    /// - Throws: what NIOSSL throws for an unusable TLS configuration.
    public static func application(control: GatewayControl, host: String, port: Int, logger: Logger, tls: TLSConfiguration? = nil,
                                   threads: Int = defaultThreads,
                                   onServerRunning: @escaping @Sendable (String) -> Void = { _ in }) throws -> InlineHTTPServer {
        let limit = control.settings.maxBodyBytes
        return try InlineHTTPServer(host: host, port: port, tls: tls, threads: threads, maxBodyBytes: limit,
                                    tooLarge: { method, declared in
                                        let error = declared.map { ControlError(413, field: "body", "body: \($0) bytes is larger than the limit of \(limit) bytes") }
                                            ?? ControlError(413, field: "body", "body: larger than the limit of \(limit) bytes")
                                        countCall(method: method, status: 413, since: MonotonicClock.nowNanoseconds)
                                        return json(413, errorBody(error))
                                    },
                                    logger: logger, onBound: onServerRunning) { request in
            handle(request, control: control, logger: logger)
        }
    }

    /// Answers one request, on the server's thread that read it. Checking the
    /// signature and the change itself (the control state's lock, the relay
    /// loops taking the new rules, the rules journal's fdatasync) may block:
    /// that thread is the server's own, never one of Swift's cooperative
    /// threads, and one slow push holds back only the connections of its
    /// thread, never another server of the process.
    static func handle(_ request: InlineRequest, control: GatewayControl, logger: Logger) -> InlineResponse {
        let method = request.method
        let path = request.path
        if path == healthPath {
            return health(method: method, control: control)
        }
        if path == metricsPath {
            return metrics(method: method)
        }
        let started = MonotonicClock.nowNanoseconds
        do throws(ControlError) {
            try control.authenticate(header: request.header("authorization"), method: method, path: path, body: request.body)
            let response = try route(method: method, path: path, body: request.body, control: control)
            countCall(method: method, status: response.status, since: started)
            logger.info("control: \(method) \(path) -> \(response.status)", metadata: ruleMetadata(path))
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
    static func metrics(method: String) -> InlineResponse {
        guard method == "GET" else {
            return json(405, errorBody(ControlError(405, "\(method) \(metricsPath): only GET is allowed here")))
        }
        return InlineResponse(status: 200, contentType: ServiceMetrics.contentType, body: ServiceMetrics.shared.exposition())
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
    static func health(method: String, control: GatewayControl) -> InlineResponse {
        guard method == "GET" else {
            return json(405, errorBody(ControlError(405, "\(method) \(healthPath): only GET is allowed here")))
        }
        let (rules, problem) = (control.pushedRules().count, control.problem)
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

    static func route(method: String, path: String, body: [UInt8], control: GatewayControl) throws(ControlError) -> InlineResponse {
        if path == rulesPath || path == rulesPath + "/" {
            switch method {
            case "GET": return json(200, ControlJSON.encode(control.rules()))
            case "POST": return try batch(body: body, control: control)
            default: throw ControlError(405, "\(method) \(path): only GET and POST are allowed here")
            }
        }
        guard path.hasPrefix(rulesPath + "/") else { throw ControlError(404, "\(path): not a control path") }
        let id = String(path.dropFirst(rulesPath.count + 1))
        try RulePolicy.checkID(id)
        switch method {
        case "PUT":
            let push: RulePush
            do throws(ControlMessageError) {
                push = try RulePush.decode(body)
            } catch {
                throw ControlError(400, field: error.field, error.description)
            }
            let (rule, created) = try control.put(id: id, push: push)
            let listen = "\(control.settings.publicAddress.isIPv4 ? "\(control.settings.publicAddress)" : "[\(control.settings.publicAddress)]"):\(rule.port)"
            return json(created ? 201 : 200, ControlJSON.encodePutAnswer(id: rule.id, port: rule.port, listen: listen))
        case "DELETE":
            try control.delete(id: id)
            return InlineResponse(status: 204, contentType: nil)
        case "GET":
            guard let rule = control.rules().first(where: { $0.id == id }) else {
                throw ControlError(404, field: "id", "id: no rule \(id)")
            }
            return json(200, ControlJSON.encode(rule))
        default:
            throw ControlError(405, "\(method) \(path): only PUT, DELETE and GET are allowed here")
        }
    }

    /// `POST /control/v1/rules`: a batch of puts and deletes. A body that
    /// cannot be read, or holds more than `RuleBatch.maxItems` items, is
    /// refused whole (400, nothing changes); otherwise 200 with each item's
    /// own status, as it would have had alone (201/200 with its port, 204,
    /// or the refusal's status, error and field).
    static func batch(body: [UInt8], control: GatewayControl) throws(ControlError) -> InlineResponse {
        let batch: RuleBatch
        do throws(ControlMessageError) {
            batch = try ControlJSON.decodeStrict(RuleBatch.self, from: body, allowed: RuleBatch.fields)
        } catch {
            throw ControlError(400, field: error.field, error.description)
        }
        let items = batch.put.count + batch.delete.count
        guard items <= RuleBatch.maxItems else {
            throw ControlError(400, field: "put", "put, delete: \(items) items; a batch holds at most \(RuleBatch.maxItems)")
        }
        let outcome = control.batch(putting: batch.put.map { ($0.id, $0.push) }, deleting: batch.delete)
        let address = control.settings.publicAddress
        let host = address.isIPv4 ? "\(address)" : "[\(address)]"
        let puts = zip(batch.put, outcome.put).map { item, result -> ControlJSON.BatchItemAnswer in
            switch result {
            case .success(let done):
                .init(id: item.id, status: done.created ? 201 : 200, port: done.rule.port, listen: "\(host):\(done.rule.port)")
            case .failure(let error):
                .init(id: item.id, status: error.status, error: error.message, field: error.field)
            }
        }
        let deletes = zip(batch.delete, outcome.delete).map { id, result -> ControlJSON.BatchItemAnswer in
            switch result {
            case .success: .init(id: id, status: 204)
            case .failure(let error): .init(id: id, status: error.status, error: error.message, field: error.field)
            }
        }
        return json(200, ControlJSON.encodeBatchAnswer(put: puts, delete: deletes))
    }

    static func errorBody(_ error: ControlError) -> [UInt8] {
        var object: [String: String] = ["error": error.message]
        if let field = error.field { object["field"] = field }
        return ControlJSON.encode(object)
    }

    static func json(_ status: Int, _ bytes: [UInt8]) -> InlineResponse {
        InlineResponse(status: status, body: bytes)
    }
}
