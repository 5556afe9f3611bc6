import ControlProtocol
import Foundation
import Hummingbird
import Logging
import NIOCore

/// The control endpoint the broker calls (`control_listen`):
/// `PUT|DELETE /control/v1/rules/{id}` and `GET /control/v1/rules`, each
/// signed broker-to-gateway. Runs on Hummingbird's own NIO threads, apart
/// from the relay loops. Every refusal is `{"error": ..., "field": ...}`
/// with a 4xx, and changes nothing.
public enum ControlServer {
    public static let rulesPath = "/control/v1/rules"

    /// A Hummingbird application serving `control` on `address`.
    /// - Parameter onServerRunning: called with the bound address (`host:port`).
    public static func application(control: GatewayControl, address: BindAddress, logger: Logger,
                                   onServerRunning: @escaping @Sendable (String) async -> Void = { _ in })
        -> some ApplicationProtocol
    {
        let responder = CallbackResponder<BasicRequestContext> { request, context in
            await handle(request, control: control, logger: context.logger)
        }
        return Application(responder: responder, configuration: .init(address: address, serverName: nil),
                           onServerRunning: { channel in
                               if let local = channel.localAddress, let ip = local.ipAddress, let port = local.port {
                                   await onServerRunning(ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)")
                               }
                           },
                           logger: logger)
    }

    /// Where control operations run, one at a time.
    static let queue = DispatchQueue(label: "gateway-control")

    static func handle(_ request: Request, control: GatewayControl, logger: Logger) async -> Response {
        var request = request
        let method = request.method.rawValue
        let path = request.uri.path
        do throws(ControlError) {
            let body = try await readBody(&request, limit: control.settings.maxBodyBytes)
            try control.authenticate(header: request.headers[.authorization], method: method, path: path, body: body)
            // A change blocks briefly (the relay loops take the new rules,
            // the rules file is synced): do it on the control queue, never on
            // Swift's cooperative threads (two on a 2-core machine), which
            // every other task of the process shares.
            let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<Response, ControlError>, Never>) in
                ControlServer.queue.async {
                    continuation.resume(returning: Result { () throws(ControlError) in
                        try route(method: method, path: path, body: body, control: control)
                    })
                }
            }
            let response = try result.get()
            logger.info("control: \(method) \(path) -> \(response.status.code)")
            return response
        } catch {
            // The message never holds the key; it may name the rule id and fields.
            logger.notice("control: \(method) \(path) -> \(error.status): \(error.message)")
            return json(error.status, errorBody(error))
        }
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
