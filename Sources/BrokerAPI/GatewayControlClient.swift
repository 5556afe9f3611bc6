import BrokerCore
import ControlProtocol
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
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

/// Calls a gateway's control API (`PUT`/`DELETE /control/v1/rules/{id}` under
/// its `control_url`), each request signed broker-to-gateway with the
/// gateway's control key.
struct GatewayControlClient: Sendable {
    /// How long one call may take, connect included.
    let timeout: TimeAmount
    /// Kept-alive connections to the gateways.
    let connections = GatewayConnections()

    /// Pushes a rule.
    /// - Returns: the public port the gateway opened.
    /// - Throws: `GatewayCallError`.
    func put(ruleID: String, push: RulePush, gateway: Gateway, key: ControlKey) async throws(GatewayCallError) -> Int {
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

    /// Deletes a rule; a rule the gateway does not know (404) counts as deleted.
    func delete(ruleID: String, gateway: Gateway, key: ControlKey) async throws(GatewayCallError) {
        let (status, answer) = try await call(.DELETE, ruleID: ruleID, body: [], gateway: gateway, key: key)
        guard status == 204 || status == 200 || status == 404 else {
            throw .refused(gateway: Self.name(gateway), status: status, message: Self.errorText(answer))
        }
    }

    private func call(_ method: HTTPMethod, ruleID: String, body: [UInt8], gateway: Gateway,
                      key: ControlKey) async throws(GatewayCallError) -> (Int, [UInt8]) {
        let base = gateway.controlURL.hasSuffix("/") ? String(gateway.controlURL.dropLast()) : gateway.controlURL
        let url = "\(base)/control/v1/rules/\(ruleID)"
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
            let answer = try await connections.send(.init(host: host, port: port, tls: tls), body: body, timeout: timeout) {
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
