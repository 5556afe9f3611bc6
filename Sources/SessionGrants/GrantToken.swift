// scripts/fuzz compiles this file with Base64URL.swift as one module.
#if canImport(Base64URL)
import Base64URL
#endif
import FoundationEssentials

/// The unverified outside of a compact JWT: three base64url parts and the
/// header's `alg`. Read before any cryptography so that a token with the
/// wrong algorithm is refused by name; pure, bounded, fuzzed.
public struct GrantToken: Sendable, Equatable {
    public static let maxLength = 8192

    public let algorithm: String
    public let payload: [UInt8]
    /// The signature's bytes, and what it signs (`header.payload`, as sent).
    public let signature: [UInt8]
    public let signingInput: [UInt8]

    /// - Throws: `GrantError.malformed` saying which part is wrong.
    public init(parsing token: String) throws(GrantError) {
        guard token.utf8.count <= GrantToken.maxLength else { throw .malformed("longer than \(GrantToken.maxLength) bytes") }
        // Split as bytes: splitting the String by Characters (grapheme
        // breaking) was half of this parse, 4 % of the Security Gateway's
        // CPU per session. A "." joined to a combining mark splits here and
        // not there; the parts are then not base64url either way.
        let bytes = Array(token.utf8)
        let parts = bytes.split(separator: UInt8(ascii: "."), maxSplits: 3, omittingEmptySubsequences: false)
        guard parts.count == 3 else { throw .malformed("not a compact JWT of three parts") }
        guard let headerBytes = Base64URL.decode(parts[0], allowingPadding: false),
              let header = try? JSONDecoder().decode(Header.self, from: Data(headerBytes)) else {
            throw .malformed("the header is not base64url JSON")
        }
        guard let alg = header.alg, !alg.isEmpty, alg.utf8.count <= 16 else { throw .malformed("the header has no alg") }
        guard !header.hasCrit else { throw .malformed("critical header extensions are not supported") }
        guard let payload = Base64URL.decode(parts[1], allowingPadding: false), !payload.isEmpty else { throw .malformed("the payload is not base64url") }
        guard let signature = Base64URL.decode(parts[2], allowingPadding: false) else { throw .malformed("the signature is not base64url") }
        algorithm = alg
        self.payload = payload
        self.signature = signature
        signingInput = Array(bytes[..<(parts[0].count + 1 + parts[1].count)])
    }

    /// The header fields read before any cryptography: `alg` when it is a
    /// string, and whether `crit` is there at all (whatever its value).
    /// Anything but a JSON object fails to decode.
    private struct Header: Decodable {
        let alg: String?
        let hasCrit: Bool

        private enum Keys: String, CodingKey { case alg, crit }

        init(from decoder: any Decoder) throws {
            let fields = try decoder.container(keyedBy: Keys.self)
            alg = try? fields.decode(String.self, forKey: .alg)
            hasCrit = fields.contains(.crit)
        }
    }
}
