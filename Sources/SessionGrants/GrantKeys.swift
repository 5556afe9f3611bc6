import Crypto
import FoundationEssentials
import JWTKit
import Synchronization
import X509
import _CryptoExtras

/// The algorithms grants may use.
public enum GrantAlgorithm: String, Sendable {
    case rs256 = "RS256"
    case es256 = "ES256"
}

/// Signs grants with the CM's private key (`--jwt-signing-key`): RSA of at
/// least 2,048 bits (RS256) or ECDSA P-256 (ES256). Anything else is refused
/// when the key is loaded, with the reason.
public struct GrantSigner: Sendable {
    public let algorithm: GrantAlgorithm
    private let keys: JWTKeyCollection

    /// - Throws: `GrantError.unreadableKey` / `.weakKey` naming the problem.
    public static func load(pem: String) async throws(GrantError) -> GrantSigner {
        if pem.contains("BEGIN DSA PRIVATE KEY") {
            throw .weakKey("DSA keys are not accepted; use RSA (2,048 bits or more) or ECDSA P-256")
        }
        let keys = JWTKeyCollection()
        if let ec = try? ES256PrivateKey(pem: pem) {
            await keys.add(ecdsa: ec)
            return GrantSigner(algorithm: .es256, keys: keys)
        }
        if let backing = try? _RSA.Signing.PrivateKey(pemRepresentation: pem) {
            guard backing.keySizeInBits >= 2048 else {
                throw .weakKey("RSA key of \(backing.keySizeInBits) bits; at least 2,048 are required")
            }
            do {
                await keys.add(rsa: try Insecure.RSA.PrivateKey(backing: backing), digestAlgorithm: .sha256)
            } catch {
                throw .unreadableKey("cannot use the RSA key")
            }
            return GrantSigner(algorithm: .rs256, keys: keys)
        }
        // swift-crypto refuses RSA under 2,048 bits outright; read it the
        // unsafe way only to say how small it is.
        if let small = try? _RSA.Signing.PrivateKey(unsafePEMRepresentation: pem) {
            throw .weakKey("RSA key of \(small.keySizeInBits) bits; at least 2,048 are required")
        }
        if pem.contains("BEGIN PRIVATE KEY") || pem.contains("BEGIN EC PRIVATE KEY") {
            throw .weakKey("not an RSA or ECDSA P-256 key (DSA, other curves and Ed25519 are not accepted)")
        }
        throw .unreadableKey("not a PEM private key")
    }

    /// The signed compact JWT.
    public func sign(_ grant: SessionGrant) async throws(GrantError) -> String {
        do {
            return try await keys.sign(grant, header: ["typ": "JWT"])
        } catch {
            throw .unreadableKey("signing failed: \(error)")
        }
    }
}

/// Verifies grants with the CM's certificate (`--jwt-verifying-cert`).
/// Accepts only the algorithm of that certificate's key, checks the
/// signature, time (with leeway), the gateway group, and replay of
/// single-use grants.
public final class GrantVerifier: Sendable {
    public let algorithm: GrantAlgorithm
    public let audience: String
    public let leeway: TimeInterval
    private let key: PublicKey
    private let used = Mutex<[String: Date]>([:])

    /// The certificate's key. The check is a plain call on the caller's
    /// thread: jwt-kit's key collection is an actor, and awaiting it moved
    /// every prepare to another thread and back.
    private enum PublicKey: Sendable {
        case es256(P256.Signing.PublicKey)
        case rs256(_RSA.Signing.PublicKey)

        /// RFC 7515 / 7518: ES256 is the raw 64-byte r || s over SHA-256 of
        /// the signing input; RS256 is RSASSA-PKCS1-v1_5 with SHA-256.
        func isValid(_ signature: [UInt8], for input: [UInt8]) -> Bool {
            let digest = SHA256.hash(data: input)
            switch self {
            case .es256(let key):
                guard signature.count == 64, let parsed = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
                return key.isValidSignature(parsed, for: digest)
            case .rs256(let key):
                guard signature.count == key.keySizeInBits / 8 else { return false }
                return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature), for: digest, padding: .insecurePKCS1v1_5)
            }
        }
    }

    /// - Throws: `GrantError.unreadableCertificate` / `.weakCertificate`.
    public static func load(certificatePEM pem: String, audience: String, leeway: TimeInterval = 30) async throws(GrantError) -> GrantVerifier {
        let certificate: Certificate
        do { certificate = try Certificate(pemEncoded: pem) } catch {
            guard pem.contains("BEGIN CERTIFICATE") else { throw .unreadableCertificate("not a PEM X.509 certificate") }
            // swift-certificates refuses what we refuse; say which it was.
            let why = "\(error)"
            if why.contains("1.2.840.113549.1.1.4") || why.lowercased().contains("md5") { throw .weakCertificate("signed with MD5") }
            if why.contains("1.2.840.10040.4") { throw .weakCertificate("DSA keys are not accepted; use RSA (2,048 bits or more) or ECDSA P-256") }
            if why.contains("incorrectParameterSize") { throw .weakCertificate("its RSA key is smaller than 2,048 bits") }
            throw .weakCertificate("its key or signature algorithm is not supported (\(why.prefix(160)))")
        }
        let signatureName = "\(certificate.signatureAlgorithm)".lowercased()
        if signatureName.contains("md5") || signatureName.contains("1.2.840.113549.1.1.4") {
            throw .weakCertificate("signed with MD5")
        }
        if let ec = P256.Signing.PublicKey(certificate.publicKey) {
            return GrantVerifier(algorithm: .es256, audience: audience, leeway: leeway, key: .es256(ec))
        }
        if let rsa = _RSA.Signing.PublicKey(certificate.publicKey) {
            guard rsa.keySizeInBits >= 2048 else {
                throw .weakCertificate("RSA key of \(rsa.keySizeInBits) bits; at least 2,048 are required")
            }
            return GrantVerifier(algorithm: .rs256, audience: audience, leeway: leeway, key: .rs256(rsa))
        }
        throw .weakCertificate("its key is neither RSA nor ECDSA P-256")
    }

    private init(algorithm: GrantAlgorithm, audience: String, leeway: TimeInterval, key: PublicKey) {
        self.algorithm = algorithm
        self.audience = audience
        self.leeway = leeway
        self.key = key
    }

    /// Checks a compact JWT and returns its grant.
    /// - Parameter recordUse: when false, a single-use grant is checked but
    ///   not marked used (the caller enforces single use itself, as the
    ///   Security Gateway's grant store does at the connection).
    public func verify(_ token: String, now: Date = Date(), recordUse: Bool = true) async throws(GrantError) -> SessionGrant {
        try check(token, now: now, recordUse: recordUse)
    }

    /// `verify` without suspending: nothing in it waits (a signature check
    /// and a JSON decode), so a server handling the request on its own
    /// thread calls this.
    public func check(_ token: String, now: Date = Date(), recordUse: Bool = true) throws(GrantError) -> SessionGrant {
        // The header first: only this certificate's algorithm is accepted, so
        // `none` and HMAC-with-the-public-key are refused before any crypto.
        let outside = try GrantToken(parsing: token)
        guard outside.algorithm == algorithm.rawValue else { throw .algorithmNotAllowed(outside.algorithm) }
        guard key.isValid(outside.signature, for: outside.signingInput) else { throw .badSignature }
        let grant: SessionGrant
        do {
            grant = try JSONDecoder().decode(SessionGrant.self, from: Data(outside.payload))
        } catch {
            throw .malformed("the payload is not a grant (\(Self.shortDescription(error)))")
        }
        guard grant.expires.timeIntervalSince(grant.notBefore) > 0 else { throw .invalidClaim("exp is not after nbf") }
        guard now.timeIntervalSince(grant.expires) < leeway else { throw .expired }
        guard grant.notBefore.timeIntervalSince(now) <= leeway else { throw .notYetValid }
        guard grant.issuedAt.timeIntervalSince(now) <= leeway else { throw .issuedInFuture }
        guard grant.audience == audience else { throw .wrongAudience(grant.audience) }
        guard !grant.sessionID.isEmpty, !grant.id.isEmpty, !grant.serverName.isEmpty else {
            throw .invalidClaim("sid, sni and jti must not be empty")
        }
        if grant.singleUse && recordUse {
            let fresh = used.withLock { table -> Bool in
                table = table.filter { $0.value.addingTimeInterval(leeway) > now }
                guard table[grant.id] == nil else { return false }
                table[grant.id] = grant.expires
                return true
            }
            guard fresh else { throw .replayed }
        }
        return grant
    }

    /// A decoding error in a few words: the field and what was wrong.
    private static func shortDescription(_ error: any Error) -> String {
        switch error as? DecodingError {
        case .keyNotFound(let key, _)?: return "\(key.stringValue): missing"
        case .typeMismatch(_, let context)?, .valueNotFound(_, let context)?, .dataCorrupted(let context)?:
            let field = context.codingPath.map(\.stringValue).joined(separator: ".")
            return field.isEmpty ? "not a JSON object" : "\(field): \(context.debugDescription)"
        default: return "not JSON"
        }
    }
}
