import Synchronization

/// The Connection Manager's client sessions: its own `JSESSIONID` for each
/// client, the broker session it keeps for that client (one per client,
/// never shared), and the client's `Client-Log-Id` for clients that drop the
/// cookie. In memory: a session only lives between a client's hello and its
/// allocation; the grant it ends with is kept by the Security Gateways.
///
/// Pure state behind a lock, with an injected clock (tested without sockets).
public final class ClientSessions: Sendable {
    public struct Session: Sendable, Equatable {
        /// Our cookie's value.
        public let token: String
        /// The broker's `JSESSIONID` for this client, once it set one.
        public var brokerCookie: String?
        public var clientLogID: String?
        public var clientAddress: String
        /// The username of the last authenticate (for logs; never the password).
        public var username: String?
        public var lastUsed: Double
    }

    private struct State {
        var byToken: [String: Session] = [:]
        var byLogID: [String: String] = [:]
    }

    private let state = Mutex(State())
    public let idleSeconds: Double
    public let capacity: Int
    private let makeToken: @Sendable () -> String

    /// - Parameters:
    ///   - idleSeconds: a session unused this long is forgotten.
    ///   - capacity: at most this many sessions (the oldest idle ones go first).
    ///   - makeToken: a new unguessable cookie value.
    public init(idleSeconds: Double, capacity: Int = 100_000, makeToken: @escaping @Sendable () -> String) {
        self.idleSeconds = idleSeconds
        self.capacity = capacity
        self.makeToken = makeToken
    }

    /// The session a request belongs to: by its cookie, else by its
    /// `Client-Log-Id`, else a new one.
    /// - Returns: the session and whether it is new (then the answer sets the cookie).
    public func resolve(cookie: String?, clientLogID: String?, clientAddress: String, now: Double) -> (session: Session, isNew: Bool) {
        state.withLock { s in
            if let cookie, var session = s.byToken[cookie], now - session.lastUsed < idleSeconds {
                session.lastUsed = now
                if let clientLogID, session.clientLogID != clientLogID {
                    if let old = session.clientLogID { s.byLogID[old] = nil }
                    session.clientLogID = clientLogID
                    s.byLogID[clientLogID] = session.token
                }
                s.byToken[cookie] = session
                return (session, false)
            }
            if let clientLogID, let token = s.byLogID[clientLogID], var session = s.byToken[token],
               now - session.lastUsed < idleSeconds, session.clientAddress == clientAddress {
                // The client dropped the cookie but names its log id, from the same address.
                session.lastUsed = now
                s.byToken[token] = session
                return (session, false)
            }
            if s.byToken.count >= capacity { Self.evictOldest(&s) }
            let session = Session(token: makeToken(), brokerCookie: nil, clientLogID: clientLogID, clientAddress: clientAddress,
                                  username: nil, lastUsed: now)
            s.byToken[session.token] = session
            if let clientLogID { s.byLogID[clientLogID] = session.token }
            return (session, true)
        }
    }

    /// Records what the broker answered for a session: its cookie (when it set one) and the username.
    public func update(_ token: String, brokerCookie: String?, username: String?) {
        state.withLock { s in
            guard var session = s.byToken[token] else { return }
            if let brokerCookie { session.brokerCookie = brokerCookie }
            if let username { session.username = username }
            s.byToken[token] = session
        }
    }

    /// Ends a session (`bye`).
    public func remove(_ token: String) {
        state.withLock { s in
            if let session = s.byToken.removeValue(forKey: token), let logID = session.clientLogID, s.byLogID[logID] == token {
                s.byLogID[logID] = nil
            }
        }
    }

    /// Forgets sessions idle longer than `idleSeconds`. - Returns: how many went.
    @discardableResult
    public func sweep(now: Double) -> Int {
        state.withLock { s in
            let expired = s.byToken.values.filter { now - $0.lastUsed >= idleSeconds }
            for session in expired {
                s.byToken[session.token] = nil
                if let logID = session.clientLogID, s.byLogID[logID] == session.token { s.byLogID[logID] = nil }
            }
            return expired.count
        }
    }

    public var count: Int { state.withLock { $0.byToken.count } }

    public func session(_ token: String) -> Session? { state.withLock { $0.byToken[token] } }

    private static func evictOldest(_ s: inout State) {
        guard let oldest = s.byToken.values.min(by: { $0.lastUsed < $1.lastUsed }) else { return }
        s.byToken[oldest.token] = nil
        if let logID = oldest.clientLogID, s.byLogID[logID] == oldest.token { s.byLogID[logID] = nil }
    }
}

/// A limit on things in progress at once (client communications, session
/// establishments): `enter` answers at once, never waits.
public final class ConcurrencyLimit: Sendable {
    public let limit: Int
    private let current = Atomic<Int>(0)
    private let refused = Atomic<Int>(0)

    public init(limit: Int) { self.limit = limit }

    /// Takes a place when one is free. - Returns: false (and counts a refusal) when full.
    public func enter() -> Bool {
        var value = current.load(ordering: .relaxed)
        while value < limit {
            let (exchanged, original) = current.compareExchange(expected: value, desired: value + 1, ordering: .acquiringAndReleasing)
            if exchanged { return true }
            value = original
        }
        refused.wrappingAdd(1, ordering: .relaxed)
        return false
    }

    public func leave() { current.wrappingSubtract(1, ordering: .acquiringAndReleasing) }

    public var inProgress: Int { current.load(ordering: .relaxed) }
    public var refusals: Int { refused.load(ordering: .relaxed) }
}
