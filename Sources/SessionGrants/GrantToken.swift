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
        signingInput = Array(bytes[..<(parts[0].count + 1 + parts[1].count)])
    }

    /// Strict unpadded base64url; nil for any other character.
    static func base64url(_ text: Substring) -> [UInt8]? {
        base64url(ArraySlice(text.utf8))
    }

    /// Strict unpadded base64url; nil for any other byte or a length that
    /// leaves one character over. Bits left over at the end are ignored, as
    /// Foundation's decoder (which this replaces: it went through a String
    /// and padding) ignores them; a test holds the two to the same answers.
    static func base64url(_ text: ArraySlice<UInt8>) -> [UInt8]? {
        guard text.count % 4 != 1 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(text.count * 3 / 4)
        var accumulator: UInt32 = 0
        var bits = 0
        for byte in text {
            let value: UInt32
            switch byte {
            case 0x41...0x5A: value = UInt32(byte - 0x41)
            case 0x61...0x7A: value = UInt32(byte - 0x61 + 26)
            case 0x30...0x39: value = UInt32(byte - 0x30 + 52)
            case 0x2D: value = 62
            case 0x5F: value = 63
            default: return nil
            }
            accumulator = accumulator << 6 | value
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: accumulator >> UInt32(bits)))
                accumulator &= (1 << UInt32(bits)) - 1
            }
        }
        return out
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
