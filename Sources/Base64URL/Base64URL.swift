/// Decoding base64url (RFC 4648 §5), shared by the control plane's keys and
/// signatures (`ControlCrypto`) and the Security Gateway's grant tokens
/// (`GrantToken`). No Foundation: the Security Gateway loads none.
public enum Base64URL {
    /// Decodes `text`'s bytes; nil for a byte outside the alphabet (and `=`
    /// unless `allowingPadding`, which skips it), or one character left over
    /// at the end. Bits left over at the end are ignored, as Foundation's
    /// decoder ignores them.
    @inlinable   // specialized in the caller: unspecialized, each byte went through the iterator witness (6 % of a prepare burst)
    public static func decode<Bytes: Collection>(_ text: Bytes, allowingPadding: Bool) -> [UInt8]? where Bytes.Element == UInt8 {
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
            case 0x3D where allowingPadding: continue
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
        // One character left over (6 bits) cannot end base64.
        return bits >= 6 ? nil : out
    }
}
