import ControlProtocol
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOSSL
import NIOCore
import ServiceLifecycle
import Synchronization
import TestSupport

/// Stands in for a gateway's control endpoint (below the broker's boundary):
/// a real HTTP server on 127.0.0.1 that checks the broker's signature with
/// `ControlSigner` exactly as a gateway must, and holds the rules pushed.
final class FakeGateway: Sendable {
    struct Call: Sendable {
        var method: String
        var ruleID: String
        /// Why the signature was refused; nil when it verified.
        var authError: String?
    }

    let gatewayID: Int
    private let key: Mutex<ControlKey?>
    private let replay = ReplayGuard()
    private let state = Mutex(State())
    private let services: ServiceGroup
    private let server: Task<Void, any Error>
    let port: Int

    private struct State {
        var calls: [Call] = []
        var rules: [String: (push: RulePush, port: Int)] = [:]
        var nextPort = 20001
        /// Set: every call is answered with this status and error.
        var refusal: (status: Int, message: String)?
        /// Ports a push may not ask for (held by something else): 409.
        var taken: Set<Int> = []
        /// Set: a push is applied at once but answered only once this is cleared
        /// (the window between a gateway holding a rule and the broker learning it).
        var holdAnswers = false
        /// False: `POST /control/v1/rules` is answered 405, as by a gateway older than batches.
        var batches = true
        /// Batch requests received, and the calls each carried.
        var batchSizes: [Int] = []
    }

    /// TLS: the control endpoint's certificate (PEM); nil for plain HTTP.
    let certificate: String?
    var controlURL: String { "\(certificate == nil ? "http" : "https")://127.0.0.1:\(port)" }
    var calls: [Call] { state.withLock { $0.calls } }
    var rules: [String: RulePush] { state.withLock { $0.rules.mapValues(\.push) } }
    func setKey(_ key: ControlKey) { self.key.withLock { $0 = key } }
    func refuse(_ status: Int, _ message: String) { state.withLock { $0.refusal = (status, message) } }
    func accept() { state.withLock { $0.refusal = nil } }
    func take(_ ports: Set<Int>) { state.withLock { $0.taken = ports } }
    func holdAnswers(_ hold: Bool) { state.withLock { $0.holdAnswers = hold } }
    func takeBatches(_ on: Bool) { state.withLock { $0.batches = on } }
    var batchSizes: [Int] { state.withLock { $0.batchSizes } }

    /// - Parameter tls: a certificate and key (PEM) to serve HTTPS with.
    init(gatewayID: Int, key: ControlKey?, tls: (certificate: String, key: String)? = nil) async throws {
        self.gatewayID = gatewayID
        certificate = tls?.certificate
        self.key = Mutex(key)
        let ports = Mutex<Int?>(nil)
        let router = Router(context: BasicRequestContext.self)
        // Filled in below once self exists; the handlers read it through a box.
        let box = Box()
        router.put("/control/v1/rules/:id") { request, context in
            try await box.gateway!.handle(request, context, method: "PUT")
        }
        router.delete("/control/v1/rules/:id") { request, context in
            try await box.gateway!.handle(request, context, method: "DELETE")
        }
        router.post("/control/v1/rules") { request, context in
            try await box.gateway!.handleBatch(request, context)
        }
        var logger = Logger(label: "fake-gateway")
        logger.logLevel = .warning
        var builder: HTTPServerBuilder = .http1()
        if let tls {
            var configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMBytes(Array(tls.certificate.utf8)).map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(tls.key.utf8), format: .pem)))
            configuration.minimumTLSVersion = .tlsv12
            builder = try .tls(.http1(), tlsConfiguration: configuration)
        }
        let app = Application(router: router, server: builder, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
                              onServerRunning: { channel in ports.withLock { $0 = channel.localAddress?.port } },
                              logger: logger)
        services = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let group = services
        server = Task { try await group.run() }
        try await waitUntilAsync("the fake gateway listening") { ports.withLock { $0 } != nil }
        port = ports.withLock { $0 }!
        box.gateway = self
    }

    func stop() async {
        await services.triggerGracefulShutdown()
        _ = try? await server.value
    }

    /// `POST /control/v1/rules`: each item answered as a call of its own
    /// (and recorded as one, PUT or DELETE), deletes first, as the gateway does.
    private func handleBatch(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let body = Array(try await request.body.collect(upTo: 1 << 20).readableBytesView)
        let authError = verify(request, method: "POST", body: body)
        guard state.withLock({ $0.batches }) else { return Self.json(405, ["error": "POST /control/v1/rules: only GET is allowed here"]) }
        if let authError { return Self.json(401, ["error": authError]) }
        let batch: RuleBatch
        do {
            batch = try ControlJSON.decodeStrict(RuleBatch.self, from: body, allowed: RuleBatch.fields)
        } catch {
            return Self.json(400, ["error": "\(error)"])
        }
        state.withLock { $0.batchSizes.append(batch.put.count + batch.delete.count) }
        func item(_ id: String, _ outcome: (status: Int, object: [String: Any])) -> [String: Any] {
            var item = outcome.object
            item["id"] = id
            item["status"] = outcome.status
            return item
        }
        let deletes = batch.delete.map { id in item(id, outcome(Call(method: "DELETE", ruleID: id, authError: nil), body: [])) }
        let puts = batch.put.map { put in
            item(put.id, outcome(Call(method: "PUT", ruleID: put.id, authError: nil), body: ControlJSON.encodePush(put.push)))
        }
        if !batch.put.isEmpty {
            try await waitUntilAsync("the test to release the held answer") { !state.withLock { $0.holdAnswers } }
        }
        return Self.json(200, ["put": puts, "delete": deletes])
    }

    /// Why the request's signature is refused; nil when it verifies.
    private func verify(_ request: Request, method: String, body: [UInt8]) -> String? {
        do throws(ControlAuthError) {
            guard let header = request.headers[.authorization] else { throw .missing }
            let authorization = try ControlAuthorization(header: header)
            guard let key = key.withLock({ $0 }), authorization.gatewayID == gatewayID else {
                throw .unknownGateway(authorization.gatewayID)
            }
            try ControlSigner(gatewayID: gatewayID, key: key).verify(authorization, direction: .brokerToGateway, method: method,
                                                                     path: request.uri.path, body: body, replay: replay)
            return nil
        } catch {
            return error.description
        }
    }

    private func handle(_ request: Request, _ context: BasicRequestContext, method: String) async throws -> Response {
        let ruleID = context.parameters.get("id") ?? ""
        let body = Array(try await request.body.collect(upTo: 1 << 20).readableBytesView)
        let authError = verify(request, method: method, body: body)
        let call = Call(method: method, ruleID: ruleID, authError: authError)
        let (status, object) = outcome(call, body: body)
        if method == "PUT" {
            try await waitUntilAsync("the test to release the held answer") { !state.withLock { $0.holdAnswers } }
        }
        return status == 204 ? Response(status: .noContent) : Self.json(status, object)
    }

    /// What the gateway answers a call: its status and JSON object (empty for 204).
    private func outcome(_ call: Call, body: [UInt8]) -> (status: Int, object: [String: Any]) {
        let (method, ruleID, authError) = (call.method, call.ruleID, call.authError)
        return state.withLock { state -> (Int, [String: Any]) in
            state.calls.append(call)
            if let authError { return (401, ["error": authError]) }
            if let refusal = state.refusal { return (refusal.status, ["error": refusal.message]) }
            if method == "DELETE" {
                return state.rules.removeValue(forKey: ruleID) == nil ? (404, ["error": "no rule \(ruleID)"]) : (204, [:])
            }
            let push: RulePush
            do {
                push = try ControlJSON.decodeStrict(RulePush.self, from: body, allowed: RulePush.fields)
            } catch {
                return (400, ["error": "\(error)"])
            }
            let port: Int
            if let fixed = push.port {
                if state.taken.contains(fixed) { return (409, ["error": "port: \(fixed)/tcp is already taken by another rule"]) }
                port = fixed
            } else {
                port = state.nextPort
                state.nextPort += 1
            }
            state.rules[ruleID] = (push, port)
            return (201, ["id": ruleID, "port": port, "listen": "0.0.0.0:\(port)"])
        }
    }

    private static func json(_ status: Int, _ object: [String: Any]) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object)) ?? Data()
        return Response(status: .init(code: status), headers: [.contentType: "application/json"],
                        body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }

    private final class Box: @unchecked Sendable {
        var gateway: FakeGateway?
    }
}

/// Sends a signed gateway-agent call as a gateway would.
/// - Returns: the reply and the Authorization header sent (to replay it).
func agentCall(_ broker: TestBroker, _ path: String, _ body: [String: Any], gatewayID: Int, key: ControlKey,
               direction: ControlDirection = .gatewayToBroker, signedPath: String? = nil, signedBody: Data? = nil,
               now: Int64? = nil, header: String? = nil) async throws -> (reply: HTTPReply, header: String) {
    let data = try JSONSerialization.data(withJSONObject: body, options: [.sortedKeys])
    let signer = ControlSigner(gatewayID: gatewayID, key: key)
    let authorization = header ?? signer.authorize(direction: direction, method: "POST", path: signedPath ?? path,
                                                   body: Array(signedBody ?? data),
                                                   now: now ?? Int64(broker.clock.now.timeIntervalSince1970))
    let reply = try await broker.client.send("POST", path, body: data,
                                             headers: ["Authorization": authorization, "Content-Type": "application/json"])
    return (reply, authorization)
}
