/// Why a grant or a key was refused. Descriptions are safe to log: they never
/// hold a token or key material.
public enum GrantError: Error, Equatable, CustomStringConvertible {
    case unreadableKey(String)
    case weakKey(String)
    case unreadableCertificate(String)
    case weakCertificate(String)
    case malformed(String)
    case algorithmNotAllowed(String)
    case badSignature
    case expired
    case notYetValid
    case issuedInFuture
    case wrongAudience(String)
    case replayed
    case invalidClaim(String)

    public var description: String {
        switch self {
        case .unreadableKey(let why): "signing key: \(why)"
        case .weakKey(let why): "signing key refused: \(why)"
        case .unreadableCertificate(let why): "verifying certificate: \(why)"
        case .weakCertificate(let why): "verifying certificate refused: \(why)"
        case .malformed(let why): "grant: malformed: \(why)"
        case .algorithmNotAllowed(let alg): "grant: algorithm \(alg) is not accepted"
        case .badSignature: "grant: signature does not verify"
        case .expired: "grant: expired"
        case .notYetValid: "grant: not yet valid"
        case .issuedInFuture: "grant: issued in the future"
        case .wrongAudience(let aud): "grant: for gateway group \"\(aud)\", not this one"
        case .replayed: "grant: single-use grant already used (replay)"
        case .invalidClaim(let why): "grant: \(why)"
        }
    }
}
