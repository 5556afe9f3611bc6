import BrokerCore
import ControlProtocol
import Foundation
import Hummingbird
import Logging
import NIOCore

/// Per-request state: the logged-in session once `BearerAuthentication` found one,
/// and the client's address.
public struct BrokerRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    /// The session and its user; nil until authenticated.
    public var authenticated: AuthenticatedSession?
    /// The client's IP address: from a verified PROXY v2 header when a
    /// gateway relayed the connection, otherwise as the socket saw it ("" when unknown).
    public let clientAddress: String
    /// The gateway that relayed the connection (broker forwarding), if any.
    public let loginGatewayID: Int64?

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        if let origin = ProxyOrigins.shared.origin(for: source.channel) {
            clientAddress = origin.clientIP
            loginGatewayID = origin.gatewayID
        } else {
            clientAddress = source.channel.remoteAddress?.ipAddress ?? ""
            loginGatewayID = nil
        }
    }

    /// The user, or a 401 when the request is not authenticated (a route
    /// registered outside the authenticated group by mistake).
    func requireUser() throws(APIError) -> User {
        guard let user = authenticated?.user else {
            throw APIError.unauthorized("this call needs Authorization: Bearer <sid> (POST /v1/session/login)")
        }
        return user
    }

    /// The user when they are an admin; 403 otherwise.
    func requireAdmin() throws(APIError) -> User {
        let user = try requireUser()
        guard user.role == .admin else {
            throw APIError(.forbidden, "user '\(user.login)' has role \(user.role.rawValue); this call needs an admin")
        }
        return user
    }
}

/// Turns every error into a JSON `{"error": ...}` response: the outermost middleware.
struct ErrorMiddleware: RouterMiddleware {
    typealias Context = BrokerRequestContext

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as APIError {
            return try error.response(from: request, context: context)
        } catch let error as StoreError {
            if case .unavailable = error {
                context.logger.error("store unavailable: \(error)")
            }
            return try APIError.from(error).response(from: request, context: context)
        } catch let error as any HTTPResponseError {
            // Hummingbird's own: no route (404), body over the limit (413), ...
            let message: String
            switch error.status {
            case .notFound: message = "no such call: \(request.method) \(request.uri.path)"
            case .contentTooLarge: message = "request body is larger than the limit"
            default: message = error.status.reasonPhrase
            }
            return try APIError(error.status, message).response(from: request, context: context)
        } catch {
            context.logger.error("internal error on \(request.method) \(request.uri.path): \(error)")
            return try APIError(.internalServerError, "internal error").response(from: request, context: context)
        }
    }
}

/// Logs one line per request: method, path (never the query or headers, so no
/// token reaches a log), status and duration.
struct RequestLogMiddleware: RouterMiddleware {
    typealias Context = BrokerRequestContext

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        let response = try await next(request, context)
        let elapsed = ContinuousClock.now - start
        let milliseconds = Double(elapsed.components.attoseconds) / 1e15 + Double(elapsed.components.seconds) * 1000
        // A scraper calls /metrics every few seconds: not an event worth a line at info.
        context.logger.log(level: request.uri.path == "/metrics" ? .debug : .info,
                           "\(request.method) \(request.uri.path) \(response.status.code) \(Int(milliseconds.rounded())) ms",
                           metadata: context.clientAddress.isEmpty ? [:] : ["client": .string(context.clientAddress)])
        return response
    }
}

/// Finds the session named by `Authorization: Bearer <sid>`; 401 without a live one.
struct BearerAuthentication: RouterMiddleware {
    typealias Context = BrokerRequestContext
    let store: any BrokerStore
    let clock: @Sendable () -> Date

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let header = request.headers[.authorization] else {
            throw APIError.unauthorized("missing Authorization: Bearer <sid> header (log in with POST /v1/session/login)")
        }
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else {
            throw APIError.unauthorized("the Authorization header must be 'Bearer <sid>'")
        }
        let token = ControlCrypto.trimmingWhitespace(String(parts[1]), newlines: false)
        guard Secrets.looksLikeToken(token),
              let found = try await store.session(tokenHash: Secrets.sha256Hex(token), now: clock()) else {
            throw APIError.unauthorized("the session is unknown or has expired; log in again")
        }
        var context = context
        context.authenticated = found
        context.logger[metadataKey: "user"] = .string(found.user.login)
        return try await next(request, context)
    }
}

