import Base64URL
import COpenSSL
import Foundation

/// The few cryptographic primitives the control plane and the broker need,
/// from OpenSSL: SHA-256, HMAC-SHA-256, random bytes, base64url.
public enum ControlCrypto {
    /// `count` bytes from the system's CSPRNG (getrandom(2) through
    /// `SystemRandomNumberGenerator`), eight per call: asking for one
    /// `UInt8` at a time made a system call per byte (issue 15: 2 % of the
    /// broker's CPU per connect, for a rule id and a signature nonce).
    public static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count)
        while bytes.count < count {
            let remaining = count - bytes.count
            withUnsafeBytes(of: generator.next() as UInt64) { bytes.append(contentsOf: $0.prefix(remaining)) }
        }
        return bytes
    }

    /// Whether `text` starts and ends with a visible ASCII character, so no
    /// whitespace trim (of any kind) would change it.
    public static func visibleASCIIAtBothEnds(_ text: String) -> Bool {
        guard let first = text.utf8.first, let last = text.utf8.last else { return false }
        return (0x21...0x7E).contains(first) && (0x21...0x7E).contains(last)
    }

    /// `text` without the whitespace around it (Foundation's `.whitespaces`,
    /// or `.whitespacesAndNewlines` with `newlines`), through NSString only
    /// when an end could need it: a key or token as stored or sent has none
    /// (issue 15: the trim was 1.5 % of a connect call).
    public static func trimmingWhitespace(_ text: String, newlines: Bool = true) -> String {
        if visibleASCIIAtBothEnds(text) { return text }
        return text.trimmingCharacters(in: newlines ? .whitespacesAndNewlines : .whitespaces)
    }

    /// SHA-256 of `bytes` (32 bytes).
    public static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        var length = 0
        // EVP_Q_digest reads `bytes` and writes at most 32 bytes (SHA-256) into `digest`.
        let ok = bytes.withUnsafeBytes { input in
            digest.withUnsafeMutableBufferPointer { output in
                EVP_Q_digest(nil, "SHA256", nil, input.baseAddress, input.count, output.baseAddress, &length)
            }
        }
        precondition(ok == 1 && length == 32, "OpenSSL SHA-256 failed")
        return digest
    }

    /// HMAC-SHA-256 of `message` under `key` (32 bytes).
    public static func hmacSHA256(key: [UInt8], message: [UInt8]) -> [UInt8] {
        var mac = [UInt8](repeating: 0, count: 32)
        var length = 0
        // EVP_Q_mac reads `key` and `message` and writes at most `mac.count` bytes into `mac`.
        let result = key.withUnsafeBytes { keyBytes in
            message.withUnsafeBytes { messageBytes in
                mac.withUnsafeMutableBufferPointer { output in
                    EVP_Q_mac(nil, "HMAC", nil, "SHA256", nil, keyBytes.baseAddress, keyBytes.count,
                              messageBytes.bindMemory(to: UInt8.self).baseAddress, messageBytes.count,
                              output.baseAddress, output.count, &length)
                }
            }
        }
        precondition(result != nil && length == 32, "OpenSSL HMAC-SHA-256 failed")
        return mac
    }

    /// Equality that takes the same time wherever the first difference is.
    public static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for i in a.indices { difference |= a[i] ^ b[i] }
        return difference == 0
    }

    public static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Unpadded base64url (RFC 4648 §5).
    public static func base64url(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count * 4 + 2) / 3)
        var index = 0
        func emit(_ group: UInt32, _ characters: Int) {
            for shift in stride(from: 18, to: 18 - 6 * characters, by: -6) {
                out.append(base64urlAlphabet[Int((group >> UInt32(shift)) & 0x3F)])
            }
        }
        while index + 3 <= bytes.count {
            emit(UInt32(bytes[index]) << 16 | UInt32(bytes[index + 1]) << 8 | UInt32(bytes[index + 2]), 4)
            index += 3
        }
        switch bytes.count - index {
        case 1: emit(UInt32(bytes[index]) << 16, 2)
        case 2: emit(UInt32(bytes[index]) << 16 | UInt32(bytes[index + 1]) << 8, 3)
        default: break
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static let base64urlAlphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

    /// Decodes unpadded (or padded) base64url; nil when the text is not base64url.
    public static func fromBase64url(_ text: String) -> [UInt8]? {
        Base64URL.decode(text.utf8, allowingPadding: true)
    }
}
