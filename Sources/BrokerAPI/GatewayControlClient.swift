import BrokerCore
import ControlProtocol
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import ServiceSupport
import Synchronization

/// Why a gateway did not carry out a push or a delete. Descriptions name the
/// gateway and what it said; they never hold its key.
enum GatewayCallError: Error, Sendable, CustomStringConvertible {
    /// The gateway answered with an error status.
    case refused(gateway: String, status: Int, message: String)
    /// No answer: connection refused, timeout, bad URL.
    case unreachable(gateway: String, reason: String)
    /// An answer that is not what the protocol says.
    case badAnswer(gateway: String, reason: String)

    var description: String {
        switch self {
        case .refused(let gateway, let status, let message): "gateway \(gateway) refused the rule: \(status) \(message)"
        case .unreachable(let gateway, let reason): "gateway \(gateway) cannot be reached: \(reason)"
        case .badAnswer(let gateway, let reason): "gateway \(gateway) answered in a way the broker does not understand: \(reason)"
        }
    }
}

/// Calls a gateway's control API (`PUT`/`DELETE /control/v1/rules/{id}` and
/// `POST /control/v1/rules` under its `control_url`), each request signed
/// broker-to-gateway with the gateway's control key.
///
/// Calls to one gateway go through its queue (`GatewayCallQueue`): at most
/// four requests at once; the puts and deletes
/// that arrive meanwhile go together in the next request, one batch (issue
/// 15: a burst of connects costs the gateway one request, one change of its
/// listeners and one fdatasync per batch rather than per rule). A call
/// alone is sent alone, as before.
struct GatewayControlClient: Sendable {
    /// How long one call may take, connect included.
    let timeout: TimeAmount
    /// Kept-alive connections to the gateways.
    let connections = GatewayConnections()
    let queue: GatewayCallQueue

    init(timeout: TimeAmount) {
        self.timeout = timeout
        // A call waits for a request slot no longer than a request may take.
        queue = GatewayCallQueue(maxWait: UInt64(max(0, timeout.nanoseconds)))
    }

    /// Pushes a rule.
    /// - Returns: the public port the gateway opened.
    /// - Throws: `GatewayCallError`.
    func put(ruleID: String, push: RulePush, gateway: Gateway, key: ControlKey) async throws(GatewayCallError) -> Int {
        try await queue.submit(.init(ruleID: ruleID, push: push, gateway: gateway, key: key), client: self).get()
    }

    /// Deletes a rule; a rule the gateway does not know (404) counts as deleted.
    func delete(ruleID: String, gateway: Gateway, key: ControlKey) async throws(GatewayCallError) {
        _ = try await queue.submit(.init(ruleID: ruleID, push: nil, gateway: gateway, key: key), client: self).get()
    }

    /// One call, alone.
    func send(_ call: GatewayCallQueue.Call) async -> Result<Int, GatewayCallError> {
        do throws(GatewayCallError) {
            if let push = call.push {
                return .success(try await putAlone(ruleID: call.ruleID, push: push, gateway: call.gateway, key: call.key))
            }
            try await deleteAlone(ruleID: call.ruleID, gateway: call.gateway, key: call.key)
            return .success(0)
        } catch {
            return .failure(error)
        }
    }

    /// Calls in one `POST /control/v1/rules`, each with its own outcome.
    /// - Returns: nil when the gateway does not know batches (404 or 405:
    ///   a gateway older than the broker); the outcomes otherwise, in the
    ///   order of `calls` (a failure of the request fails every call).
    func sendBatch(_ calls: [GatewayCallQueue.Call]) async -> [Result<Int, GatewayCallError>]? {
        let gateway = calls[0].gateway
        let puts = calls.filter { $0.push != nil }, deletes = calls.filter { $0.push == nil }
        let body = ControlJSON.encodeBatch(put: puts.map { ($0.ruleID, $0.push!) }, delete: deletes.map(\.ruleID))
        let status: Int, answer: [UInt8]
        do throws(GatewayCallError) {
            (status, answer) = try await call(.POST, ruleID: nil, body: body, gateway: gateway, key: calls[0].key, retryable: true)
        } catch {
            return calls.map { _ in .failure(error) }
        }
        if status == 404 || status == 405 { return nil }
        let name = Self.name(gateway)
        guard status == 200 else {
            return calls.map { _ in .failure(.refused(gateway: name, status: status, message: Self.errorText(answer))) }
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(answer)) as? [String: Any],
              let putItems = object["put"] as? [[String: Any]], let deleteItems = object["delete"] as? [[String: Any]],
              putItems.count == puts.count, deleteItems.count == deletes.count else {
            return calls.map { _ in .failure(.badAnswer(gateway: name, reason: "a batch answer without one item per call")) }
        }
        var byID: [String: Result<Int, GatewayCallError>] = [:]
        for (call, item) in zip(puts, putItems) {
            let itemStatus = item["status"] as? Int ?? 0
            if itemStatus == 200 || itemStatus == 201 {
                guard let port = item["port"] as? Int, (1...65535).contains(port) else {
                    byID[call.ruleID] = .failure(.badAnswer(gateway: name, reason: "status \(itemStatus) without a \"port\" of 1 to 65535"))
                    continue
                }
                byID[call.ruleID] = .success(port)
            } else {
                byID[call.ruleID] = .failure(.refused(gateway: name, status: itemStatus, message: item["error"] as? String ?? "(no message)"))
            }
        }
        for (call, item) in zip(deletes, deleteItems) {
            let itemStatus = item["status"] as? Int ?? 0
            byID[call.ruleID] = itemStatus == 204 || itemStatus == 200 || itemStatus == 404 ? .success(0)
                : .failure(.refused(gateway: name, status: itemStatus, message: item["error"] as? String ?? "(no message)"))
        }
        return calls.map { byID[$0.ruleID] ?? .failure(.badAnswer(gateway: name, reason: "no answer for rule \($0.ruleID)")) }
    }

    private func putAlone(ruleID: String, push: RulePush, gateway: Gateway, key: ControlKey) async throws(GatewayCallError) -> Int {
        let body = ControlJSON.encodePush(push)
        let (status, answer) = try await call(.PUT, ruleID: ruleID, body: body, gateway: gateway, key: key)
        guard status == 200 || status == 201 else {
            throw .refused(gateway: Self.name(gateway), status: status, message: Self.errorText(answer))
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(answer)) as? [String: Any],
              let port = object["port"] as? Int, (1...65535).contains(port) else {
            throw .badAnswer(gateway: Self.name(gateway), reason: "status \(status) without a \"port\" of 1 to 65535")
        }
        return port
    }

    private func deleteAlone(ruleID: String, gateway: Gateway, key: ControlKey) async throws(GatewayCallError) {
        let (status, answer) = try await call(.DELETE, ruleID: ruleID, body: [], gateway: gateway, key: key)
        guard status == 204 || status == 200 || status == 404 else {
            throw .refused(gateway: Self.name(gateway), status: status, message: Self.errorText(answer))
        }
    }

    /// - Parameters:
    ///   - ruleID: the rule's path, or nil for the rules' path (a batch).
    ///   - retryable: the request may be sent again when a kept connection
    ///     closes without answering (a batch of puts and deletes is: a put
    ///     seen twice is answered with the rule held, a delete with 404).
    private func call(_ method: HTTPMethod, ruleID: String?, body: [UInt8], gateway: Gateway,
                      key: ControlKey, retryable: Bool? = nil) async throws(GatewayCallError) -> (Int, [UInt8]) {
        let base = gateway.controlURL.hasSuffix("/") ? String(gateway.controlURL.dropLast()) : gateway.controlURL
        let url = ruleID.map { "\(base)/control/v1/rules/\($0)" } ?? "\(base)/control/v1/rules"
        guard let parts = URLComponents(string: url), let scheme = parts.scheme?.lowercased(), scheme == "http" || scheme == "https",
              var host = parts.host, !host.isEmpty else {
            throw .unreachable(gateway: Self.name(gateway), reason: "its control_url \(Validate.quotedForAPI(gateway.controlURL)) is not an http or https URL")
        }
        let path = parts.percentEncodedPath
        guard !path.isEmpty else {
            throw .unreachable(gateway: Self.name(gateway), reason: "its control_url \(Validate.quotedForAPI(gateway.controlURL)) is not a URL")
        }
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        let port = parts.port ?? (scheme == "https" ? 443 : 80)
        var tls: GatewayConnections.PinnedContext?
        if scheme == "https" {
            // Only the certificate the gateway registered (signed with its
            // control key) is trusted; its name is not what identifies it.
            guard let pem = gateway.controlCertificate, let pinned = Self.pinned.context(trusting: pem) else {
                throw .unreachable(gateway: Self.name(gateway), reason: "its https control endpoint registered no usable certificate")
            }
            tls = pinned
        }
        let signer = ControlSigner(gatewayID: Int(gateway.id), key: key)
        let hostHeader = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        do {
            // Signed for each sending: a request sent again carries a new nonce.
            let answer = try await connections.send(.init(host: host, port: port, tls: tls), body: body, timeout: timeout,
                                                    retryable: retryable ?? GatewayConnections.idempotent(method)) {
                var headers = HTTPHeaders()
                headers.add(name: "Host", value: hostHeader)
                headers.add(name: "Authorization", value: signer.authorize(direction: .brokerToGateway, method: method.rawValue, path: path, body: body))
                if !body.isEmpty { headers.add(name: "Content-Type", value: "application/json") }
                headers.add(name: "Content-Length", value: String(body.count))
                return HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: headers)
            }
            return (answer.status, answer.body)
        } catch {
            throw .unreachable(gateway: Self.name(gateway), reason: "\(method.rawValue) \(url): \(error)")
        }
    }

    static func name(_ gateway: Gateway) -> String { "\(gateway.id) ('\(gateway.name)')" }

    /// Client TLS per registered certificate, made once (not on every push).
    private static let pinned = PinnedTLS()

    private final class PinnedTLS: Sendable {
        private let byPEM = Mutex<[String: GatewayConnections.PinnedContext]>([:])

        func context(trusting pem: String) -> GatewayConnections.PinnedContext? {
            if let known = byPEM.withLock({ $0[pem] }) { return known }
            guard let certificates = try? NIOSSLCertificate.fromPEMBytes(Array(pem.utf8)), !certificates.isEmpty else { return nil }
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.minimumTLSVersion = .tlsv12
            tls.trustRoots = .certificates(certificates)
            tls.certificateVerification = .noHostnameVerification
            guard let context = try? NIOSSLContext(configuration: tls) else { return nil }
            let pinned = GatewayConnections.PinnedContext(pem: pem, context: context)
            byPEM.withLock { table in
                // Bounded: replaced certificates do not pile up.
                if table.count >= 4096 { table.removeAll() }
                table[pem] = pinned
            }
            return pinned
        }
    }

    /// The `error` of a JSON answer, or the start of the text.
    private static func errorText(_ answer: [UInt8]) -> String {
        if let object = try? JSONSerialization.jsonObject(with: Data(answer)) as? [String: Any],
           let error = object["error"] as? String {
            return error
        }
        let text = String(decoding: answer.prefix(200), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return text.isEmpty ? "(no message)" : text
    }
}

/// The calls to the gateways, gathered per gateway by a `CallBatcher`: at
/// most four requests to a gateway at once; the calls that wait behind them
/// go together in one batch (up to 64, one per rule id).
final class GatewayCallQueue: Sendable {
    /// A put (with its push) or a delete (push nil).
    struct Call: Sendable {
        let ruleID: String
        let push: RulePush?
        let gateway: Gateway
        let key: ControlKey
    }

    /// One gateway as the calls address it: its record and key may change
    /// (a new control_url, a new enrolment); calls made with other ones
    /// go to another queue.
    private struct Target: Hashable, Sendable {
        let gatewayID: Int64
        let controlURL: String
        let certificate: String?
        let key: [UInt8]
    }

    /// Calls in one batch (the gateway takes up to 256 and a 64 KiB body;
    /// a call is at most about 400 bytes).
    static let maxBatch = 64

    private let batcher: CallBatcher<Target, Call, Result<Int, GatewayCallError>>

    /// - Parameter maxWait: nanoseconds a call may wait before it is sent.
    init(maxWait: UInt64) {
        batcher = CallBatcher(maxBatch: Self.maxBatch, key: { $0.ruleID }, maxWait: maxWait)
    }

    /// Calls to a gateway (whatever its record and key) not yet answered.
    func pendingCalls(gatewayID: Int64) -> Int {
        batcher.pendingCalls { $0.gatewayID == gatewayID }
    }

    func submit(_ call: Call, client: GatewayControlClient) async -> Result<Int, GatewayCallError> {
        let target = Target(gatewayID: call.gateway.id, controlURL: call.gateway.controlURL,
                            certificate: call.gateway.controlCertificate, key: call.key.bytes)
        return await batcher.submit(call, to: target, one: { await client.send($0) }, many: { await client.sendBatch($0) },
                                    expired: { call, waited in
                                        .failure(.unreachable(gateway: GatewayControlClient.name(call.gateway),
                                                              reason: "the call waited \(waited / 1_000_000) ms behind earlier calls to it, longer than a call may take"))
                                    })
    }
}
