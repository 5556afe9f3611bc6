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
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3 else { throw .malformed("not a compact JWT of three parts") }
        guard let headerBytes = GrantToken.base64url(parts[0]),
              let header = try? JSONDecoder().decode(Header.self, from: Data(headerBytes)) else {
            throw .malformed("the header is not base64url JSON")
        }
        guard let alg = header.alg, !alg.isEmpty, alg.utf8.count <= 16 else { throw .malformed("the header has no alg") }
        guard !header.hasCrit else { throw .malformed("critical header extensions are not supported") }
        guard let payload = GrantToken.base64url(parts[1]), !payload.isEmpty else { throw .malformed("the payload is not base64url") }
        guard let signature = GrantToken.base64url(parts[2]) else { throw .malformed("the signature is not base64url") }
        algorithm = alg
        self.payload = payload
        self.signature = signature
        signingInput = Array(token.utf8.prefix(parts[0].utf8.count + 1 + parts[1].utf8.count))
    }

    /// Strict unpadded base64url; nil for any other character.
    static func base64url(_ text: Substring) -> [UInt8]? {
        guard text.utf8.allSatisfy({ b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D || b == 0x5F
        }), text.utf8.count % 4 != 1 else { return nil }
        var base64 = text.utf8.map { $0 == 0x2D ? UInt8(ascii: "+") : $0 == 0x5F ? UInt8(ascii: "/") : $0 }
        while base64.count % 4 != 0 { base64.append(UInt8(ascii: "=")) }
        return Data(base64Encoded: String(decoding: base64, as: UTF8.self)).map { [UInt8]($0) }
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
