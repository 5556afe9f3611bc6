import BrokerCore
import Foundation
import HTTPTypes
import Hummingbird
import PCoIPBrokerProtocol
import PCoIPHTTP

/// The broker core's side of the PCoIP broker protocol: `POST /pcoip-broker/xml`,
/// so a Connection Manager (this package's or HP's) can use it. Users,
/// desktops and entitlements come from the store: a desktop is a PCoIP
/// resource when it has a protocol named `pcoip` (its agent's port), and a
/// user sees the desktops that entitle them (or that entitle nobody).
///
/// The `JSESSIONID` cookie is the broker session's token (the same sessions
/// as the REST API's, same lifetime); it is set by a successful `authenticate`
/// and ended by `bye`. Every failure is an answer of the protocol (HTTP 200)
/// naming what went wrong; a password never reaches a log or an answer.
extension BrokerAPI {
    func addPCoIPRoutes(_ router: Router<BrokerRequestContext>) {
        router.post(RouterPath(String(PCoIPBroker.path.dropFirst()))) { request, context in
            await self.pcoip(request, context)
        }
    }

    func pcoip(_ request: Request, _ context: BrokerRequestContext) async -> Response {
        var request = request
        guard let body = await PCoIPHTTP.body(&request) else {
            return PCoIPHTTP.answer(BrokerAnswer.error(.errorMalformed, "the request body is larger than \(PCoIPHTTP.maxBodyBytes) bytes"),
                                    setCookie: nil)
        }
        let message: BrokerRequest
        do throws(BrokerProtocolError) {
            message = try BrokerRequest.parse(body)
        } catch {
            context.logger.notice("pcoip: refused a request: \(error)")
            return PCoIPHTTP.answer(BrokerAnswer.error(.errorMalformed, error.description), setCookie: nil)
        }
        let token = PCoIPHTTP.cookie(PCoIPBroker.cookieName, in: request.headers)
        do {
            switch message {
            case .hello:
                let info = BrokerAnswer.BrokerInfo(productName: "leostream-broker", productVersion: configuration.version,
                                                   hostname: ProcessInfo.processInfo.hostName)
                return PCoIPHTTP.answer(BrokerAnswer.hello(info, domains: []), setCookie: nil)
            case .authenticate(let auth):
                return try await pcoipAuthenticate(auth, context)
            case .getResourceList:
                guard let session = try await pcoipSession(token) else {
                    return PCoIPHTTP.answer(BrokerAnswer.resourceListFailure(.listFailedNotAuthenticated, Self.noSession(token)), setCookie: nil)
                }
                let resources = try await store.desktops().filter { $0.pcoip != nil && $0.entitles(session.user) }
                    .map { BrokerResource(name: $0.name, id: String($0.id)) }
                context.logger.info("pcoip: '\(session.user.login)' listed \(resources.count) resource(s)")
                return PCoIPHTTP.answer(BrokerAnswer.resourceList(resources), setCookie: nil)
            case .allocateResource(let allocation):
                guard let session = try await pcoipSession(token) else {
                    return PCoIPHTTP.answer(BrokerAnswer.allocationFailure(.allocFailedNotAuthenticated, Self.noSession(token)), setCookie: nil)
                }
                return try await pcoipAllocate(allocation, user: session.user, context)
            case .bye:
                if let token { try await store.deleteSession(tokenHash: Secrets.sha256Hex(token)) }
                return PCoIPHTTP.answer(BrokerAnswer.bye(), setCookie: PCoIPHTTP.sessionCookie(nil, path: "/", secure: false))
            }
        } catch {
            context.logger.error("pcoip: \(message.kind.rawValue): \(error)")
            return PCoIPHTTP.answer(BrokerAnswer.failure(for: message.kind, (.authFailedBroker, .listFailedBroker, .allocFailedBroker, .errorBroker),
                                                         "the broker cannot answer now: \(error)"), setCookie: nil)
        }
    }

    private static func noSession(_ token: String?) -> String {
        token == nil ? "not authenticated: no session cookie" : "the session has expired or ended; authenticate again"
    }

    /// The live session a cookie names, or nil.
    private func pcoipSession(_ token: String?) async throws -> AuthenticatedSession? {
        guard let token, Secrets.looksLikeToken(token) else { return nil }
        return try await store.session(tokenHash: Secrets.sha256Hex(token), now: clock())
    }

    private func pcoipAuthenticate(_ auth: BrokerRequest.Authenticate, _ context: BrokerRequestContext) async throws -> Response {
        let fail = { (id: BrokerResult, text: String) in PCoIPHTTP.answer(BrokerAnswer.authenticate(id, text), setCookie: nil) }
        guard (try? Validate.name(auth.username, field: "username", length: Limits.loginLength)) != nil,
              (try? Validate.password(auth.password)) != nil else {
            context.logger.notice("pcoip: authenticate refused: malformed username or password")
            return fail(.authFailedCredentials, "unknown username or wrong password")
        }
        let user: User
        switch try await checkPassword(login: auth.username, password: auth.password) {
        case .unknownLogin:
            context.logger.notice("pcoip: authenticate refused: unknown username")
            return fail(.authFailedCredentials, "unknown username or wrong password")
        case .wrongPassword(let who):
            context.logger.notice("pcoip: authenticate refused: wrong password for '\(who.login)'")
            return fail(.authFailedCredentials, "unknown username or wrong password")
        case .disabled(let who):
            return fail(.authFailedDisabled, "user '\(who.login)' is disabled")
        case .accepted(let who):
            user = who
        }
        let token = try await openSession(for: user, context)
        context.logger.info("pcoip: '\(user.login)' authenticated")
        return PCoIPHTTP.answer(BrokerAnswer.authenticate(.authSuccessful, "authenticated as \(user.login)"),
                                setCookie: PCoIPHTTP.sessionCookie(token, path: "/", secure: false))
    }

    private func pcoipAllocate(_ allocation: BrokerRequest.Allocation, user: User, _ context: BrokerRequestContext) async throws -> Response {
        let unknown = PCoIPHTTP.answer(BrokerAnswer.allocationFailure(.allocFailedUnknownResource,
                                                                      "resource \(allocation.resourceID) is not one of your PCoIP desktops"),
                                       setCookie: nil)
        guard let id = Int64(allocation.resourceID), id > 0 else { return unknown }
        let desktop: Desktop
        do {
            desktop = try await store.desktop(id: id)
        } catch {
            if case .notFound = error { return unknown }
            throw error
        }
        guard let pcoip = desktop.pcoip, desktop.entitles(user) else { return unknown }
        // The agent would issue these; the minimal broker does not talk to
        // agents, so it makes them: a 63-bit session id and a 48-byte tag.
        let sessionID = String(UInt64.random(in: 1...(UInt64(Int64.max))))
        let connectTag = Data(Secrets.randomBytes(48)).base64EncodedString()
        let target = BrokerTarget(ipAddress: desktop.address, hostname: desktop.name, sni: desktop.pcoipServerName,
                                  port: pcoip.port, sessionID: sessionID, connectTag: connectTag)
        context.logger.info("pcoip: '\(user.login)' allocated desktop \(desktop.id) ('\(desktop.name)'), session \(sessionID)")
        return PCoIPHTTP.answer(BrokerAnswer.allocated(target, resourceID: allocation.resourceID), setCookie: nil)
    }
}
