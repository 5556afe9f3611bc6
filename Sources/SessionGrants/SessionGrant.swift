import FoundationEssentials
import JWTKit

/// A signed session grant (JWT, RFC 7519): what a Connection Manager hands a
/// Security Gateway group so that any of its gateways admits one PCoIP
/// session, without asking the CM again.
public struct SessionGrant: JWTPayload, Equatable {
    /// The PCoIP session id.
    public var sessionID: String
    /// The agent's `HOST:PORT` (numeric address).
    public var agent: String
    /// The SNI the client will present (the agent's name from its allocate answer).
    public var serverName: String
    /// The client's address, when the CM knows it.
    public var client: String?
    /// The Security Gateway group (`aud`).
    public var audience: String
    public var issuedAt: Date
    public var notBefore: Date
    public var expires: Date
    /// A unique id (`jti`), for replay checks.
    public var id: String
    /// True when the grant may admit one connection only.
    public var singleUse: Bool

    enum CodingKeys: String, CodingKey {
        case sessionID = "sid"
        case agent
        case serverName = "sni"
        case client
        case audience = "aud"
        case issuedAt = "iat"
        case notBefore = "nbf"
        case expires = "exp"
        case id = "jti"
        case singleUse = "single_use"
    }

    public init(sessionID: String, agent: String, serverName: String, client: String? = nil, audience: String,
                issuedAt: Date, notBefore: Date? = nil, expires: Date, id: String = UUID().uuidString, singleUse: Bool = false) {
        self.sessionID = sessionID
        self.agent = agent
        self.serverName = serverName
        self.client = client
        self.audience = audience
        self.issuedAt = issuedAt
        self.notBefore = notBefore ?? issuedAt
        self.expires = expires
        self.id = id
        self.singleUse = singleUse
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        sessionID = try c.decode(String.self, forKey: .sessionID)
        agent = try c.decode(String.self, forKey: .agent)
        serverName = try c.decode(String.self, forKey: .serverName)
        client = try c.decodeIfPresent(String.self, forKey: .client)
        // `aud` may be a string or an array of one (RFC 7519 §4.1.3).
        if let one = try? c.decode(String.self, forKey: .audience) {
            audience = one
        } else {
            let many = try c.decode([String].self, forKey: .audience)
            guard many.count == 1 else {
                throw DecodingError.dataCorruptedError(forKey: .audience, in: c, debugDescription: "aud must name one gateway group")
            }
            audience = many[0]
        }
        issuedAt = Date(timeIntervalSince1970: try c.decode(Double.self, forKey: .issuedAt))
        notBefore = Date(timeIntervalSince1970: try c.decode(Double.self, forKey: .notBefore))
        expires = Date(timeIntervalSince1970: try c.decode(Double.self, forKey: .expires))
        id = try c.decode(String.self, forKey: .id)
        singleUse = try c.decodeIfPresent(Bool.self, forKey: .singleUse) ?? false
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(sessionID, forKey: .sessionID)
        try c.encode(agent, forKey: .agent)
        try c.encode(serverName, forKey: .serverName)
        try c.encodeIfPresent(client, forKey: .client)
        try c.encode(audience, forKey: .audience)
        try c.encode(Int64(issuedAt.timeIntervalSince1970), forKey: .issuedAt)
        try c.encode(Int64(notBefore.timeIntervalSince1970), forKey: .notBefore)
        try c.encode(Int64(expires.timeIntervalSince1970), forKey: .expires)
        try c.encode(id, forKey: .id)
        if singleUse { try c.encode(true, forKey: .singleUse) }
    }

    /// Time, audience and replay are checked by `GrantVerifier` (it knows the
    /// clock, the leeway and the group); nothing to do here.
    public func verify(using algorithm: some JWTAlgorithm) async throws {}
}
