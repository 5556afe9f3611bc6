import Foundation

/// The unverified outside of a compact JWT: three base64url parts and the
/// header's `alg`. Read before any cryptography so that a token with the
/// wrong algorithm is refused by name; pure, bounded, fuzzed.
public struct GrantToken: Sendable, Equatable {
    public static let maxLength = 8192

    public let algorithm: String
    public let payload: [UInt8]

    /// - Throws: `GrantError.malformed` saying which part is wrong.
    public init(parsing token: String) throws(GrantError) {
        guard token.utf8.count <= GrantToken.maxLength else { throw .malformed("longer than \(GrantToken.maxLength) bytes") }
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3 else { throw .malformed("not a compact JWT of three parts") }
        guard let headerBytes = GrantToken.base64url(parts[0]),
              let header = try? JSONSerialization.jsonObject(with: Data(headerBytes)) as? [String: Any] else {
            throw .malformed("the header is not base64url JSON")
        }
        guard let alg = header["alg"] as? String, !alg.isEmpty, alg.utf8.count <= 16 else { throw .malformed("the header has no alg") }
        guard header["crit"] == nil else { throw .malformed("critical header extensions are not supported") }
        guard let payload = GrantToken.base64url(parts[1]), !payload.isEmpty else { throw .malformed("the payload is not base64url") }
        guard GrantToken.base64url(parts[2]) != nil else { throw .malformed("the signature is not base64url") }
        algorithm = alg
        self.payload = payload
    }

    /// Strict unpadded base64url; nil for any other character.
    static func base64url(_ text: Substring) -> [UInt8]? {
        guard text.utf8.allSatisfy({ b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D || b == 0x5F
        }), text.utf8.count % 4 != 1 else { return nil }
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.utf8.count % 4 != 0 { base64 += "=" }
        return Data(base64Encoded: base64).map { [UInt8]($0) }
    }
}
