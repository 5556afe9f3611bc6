import AsyncHTTPClient
import Foundation
import NIOCore
import ServiceSupport
import NIOHTTP1
import NIOSSL
import PCoIPBrokerProtocol

/// Why a call to the broker or a Security Gateway got no usable answer.
public struct UpstreamFailure: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The broker at `BrokerUrl`, over HTTPS (AsyncHTTPClient, swift-nio-ssl):
/// verified against the system's CAs or `BrokerCaCert`, or not at all only
/// with `BrokerAllowSelfSigned = true`; TLS 1.2 or later.
public final class BrokerClient: Sendable {
    public let url: BrokerURL
    private let client: HTTPClient
    private let timeout: TimeAmount

    /// - Throws: `UpstreamFailure` when the CA file cannot be used.
    public init(url: BrokerURL, caFile: String, allowSelfSigned: Bool, timeoutSeconds: Int64 = 15) throws(UpstreamFailure) {
        self.url = url
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        if !caFile.isEmpty {
            do {
                tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
            } catch {
                throw UpstreamFailure("BrokerCaCert \(caFile): \(error)")
            }
        }
        if allowSelfSigned { tls.certificateVerification = .none }
        var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
        configuration.timeout = .init(connect: .seconds(5), read: .seconds(timeoutSeconds))
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 64)
        configuration.redirectConfiguration = .disallow
        client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        timeout = .seconds(timeoutSeconds)
    }

    /// Relays one message.
    /// - Parameters:
    ///   - cookie: the broker's session cookie for this client, if it set one.
    ///   - clientAddress: sent as `X-Forwarded-For`.
    /// - Returns: the answer's body and the broker's new `JSESSIONID`, if it set one.
    public func send(_ body: [UInt8], cookie: String?, clientAddress: String, clientLogID: String?) async throws(UpstreamFailure) -> (body: [UInt8], cookie: String?) {
        var request = HTTPClientRequest(url: url.endpoint)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: PCoIPBroker.contentType)
        if let cookie { request.headers.add(name: "Cookie", value: "\(PCoIPBroker.cookieName)=\(cookie)") }
        if !clientAddress.isEmpty { request.headers.add(name: "X-Forwarded-For", value: clientAddress) }
        if let clientLogID { request.headers.add(name: PCoIPBroker.clientLogIDHeader, value: clientLogID) }
        request.body = .bytes(ByteBuffer(bytes: body))
        do {
            let response = try await client.execute(request, timeout: timeout)
            let bytes = try await response.body.collect(upTo: 256 * 1024)
            guard response.status == .ok else {
                throw UpstreamFailure("the broker answered HTTP \(response.status.code)")
            }
            return (Array(bytes.readableBytesView), Self.sessionCookie(response.headers))
        } catch let failure as UpstreamFailure {
            throw failure
        } catch {
            throw UpstreamFailure("cannot reach the broker at \(url): \(error)")
        }
    }

    /// Whether the broker answers at all (any HTTP status): nil, or why not.
    public func probe() async -> String? {
        var request = HTTPClientRequest(url: url.endpoint)
        request.method = .GET
        do {
            let response = try await client.execute(request, timeout: .seconds(5))
            _ = try await response.body.collect(upTo: 64 * 1024)
            return nil
        } catch {
            return "\(error)"
        }
    }

    static func sessionCookie(_ headers: HTTPHeaders) -> String? {
        for value in headers["Set-Cookie"] {
            let first = value.split(separator: ";", maxSplits: 1).first.map(String.init) ?? ""
            let parts = first.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            if parts.count == 2, parts[0] == PCoIPBroker.cookieName, !parts[1].isEmpty { return parts[1] }
        }
        return nil
    }

    public func shutdown() async {
        try? await client.shutdown()
    }
}

/// The Security Gateways' control endpoints: HTTPS trusting only the
/// certificates of `SecurityGatewayCaCert` (issue 14), or plain HTTP when the
/// config says so; a grant is admitted only if its signature verifies.
public final class SecurityGatewayClient: Sendable {
    private let client: HTTPClient
    private let tls: TLSConfiguration?

    /// - Parameter tls: the client TLS for the control endpoints; nil: plain HTTP.
    public init(tls: TLSConfiguration?) {
        self.tls = tls
        var configuration = HTTPClient.Configuration()
        configuration.timeout = .init(connect: .seconds(2), read: .seconds(5))
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 32)
        client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    private func base(_ gateway: SecurityGatewayAddress) -> String { "\(tls == nil ? "http" : "https")://\(gateway.control)" }

    /// `GET /health` then `GET /v1/status`: healthy, and its active sessions.
    public func check(_ gateway: SecurityGatewayAddress, now: Double) async -> GatewayPool.Health {
        do {
            let health = try await get(base(gateway) + "/health")
            guard health.status == 200 else {
                let reason = (try? JSONSerialization.jsonObject(with: Data(health.body)) as? [String: Any])?["reason"] as? String
                return GatewayPool.Health(healthy: false, activeSessions: 0, problem: "health \(health.status): \(reason ?? "no reason")", checkedAt: now)
            }
            let status = try await get(base(gateway) + "/v1/status")
            let object = (try? JSONSerialization.jsonObject(with: Data(status.body))) as? [String: Any]
            let active = (object?["active_sessions"] as? Int) ?? 0
            return GatewayPool.Health(healthy: true, activeSessions: active, problem: nil, checkedAt: now)
        } catch {
            return GatewayPool.Health(healthy: false, activeSessions: 0, problem: "does not answer: \(error)", checkedAt: now)
        }
    }

    /// Prepares to one Security Gateway at once: the first four alone, the
    /// ones that wait behind them in one `{"grants": [...]}` batch (a
    /// reconnect storm costs the gateway one request and one fdatasync per
    /// batch). At most 64 grants of about 700 bytes: within its 128 KiB body.
    private let batcher = CallBatcher<String, String, String?>(maxBatch: 64, maxWait: 5_000_000_000)

    /// Prepares `token` on `gateway`, alone or in a batch with others waiting for it.
    /// - Returns: nil when prepared (201 or 200), else why not.
    public func prepare(_ gateway: SecurityGatewayAddress, token: String) async -> String? {
        await batcher.submit(token, to: "\(gateway.control)", one: { await self.prepareAlone(gateway, token: $0) },
                             many: { await self.prepareMany(gateway, tokens: $0) },
                             expired: { _, waited in "waited \(waited / 1_000_000) ms behind earlier prepares to this gateway, longer than a prepare may take" })
    }

    /// Batches sent, and the grants they carried.
    public var batchFigures: (batches: Int, calls: Int) { batcher.batchFigures }

    /// `POST /v1/sessions {"grants": [...]}`: each grant's outcome, in order;
    /// nil when the gateway does not take batches (one older than this).
    private func prepareMany(_ gateway: SecurityGatewayAddress, tokens: [String]) async -> [String?]? {
        let status: Int, answer: String
        do {
            (status, answer) = try await postSessions(gateway, ["grants": tokens], limit: 1 << 20)
        } catch {
            return tokens.map { _ in "\(error)" }
        }
        guard status == 200 else {
            // An older gateway: no batches (it names `grants` an unknown field, or misses `grant`).
            if status == 400, answer.contains("grants: unknown field") || answer.contains("grant: missing") { return nil }
            let why = "HTTP \(status): \(answer.prefix(200))"
            return tokens.map { _ in why }
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(answer.utf8)) as? [String: Any],
              let results = object["results"] as? [[String: Any]], results.count == tokens.count else {
            return tokens.map { _ in "a batch answer without one result per grant" }
        }
        return results.map { item in
            let status = item["status"] as? Int ?? 0
            if status == 201 || status == 200 { return nil }
            return "HTTP \(status): \((item["error"] as? String ?? "(no message)").prefix(200))"
        }
    }

    private func prepareAlone(_ gateway: SecurityGatewayAddress, token: String) async -> String? {
        do {
            let (status, answer) = try await postSessions(gateway, ["grant": token], limit: 64 * 1024)
            return status == 201 || status == 200 ? nil : "HTTP \(status): \(answer.prefix(200))"
        } catch {
            return "\(error)"
        }
    }

    /// `POST /v1/sessions` with `object` as its JSON body: the status and the answer's text.
    private func postSessions(_ gateway: SecurityGatewayAddress, _ object: [String: Any], limit: Int) async throws -> (Int, String) {
        var request = HTTPClientRequest(url: base(gateway) + "/v1/sessions")
        request.tlsConfiguration = tls
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        let body = (try? JSONSerialization.data(withJSONObject: object)) ?? Data()
        request.body = .bytes(ByteBuffer(bytes: Array(body)))
        let response = try await client.execute(request, timeout: .seconds(5))
        let answer = try await response.body.collect(upTo: limit)
        return (Int(response.status.code), String(buffer: answer))
    }

    private func get(_ url: String) async throws -> (status: Int, body: [UInt8]) {
        var request = HTTPClientRequest(url: url)
        request.tlsConfiguration = tls
        let response = try await client.execute(request, timeout: .seconds(5))
        let body = try await response.body.collect(upTo: 256 * 1024)
        return (Int(response.status.code), Array(body.readableBytesView))
    }

    public func shutdown() async {
        try? await client.shutdown()
    }
}
