/// The 256-bit key an enrolled gateway shares with its broker. It prints as
/// `<redacted>` so that it cannot reach a log by accident.
public struct ControlKey: Sendable, Equatable, CustomStringConvertible, CustomDebugStringConvertible {
    public let bytes: [UInt8]

    /// A fresh random key.
    public static func generate() -> ControlKey { ControlKey(unchecked: ControlCrypto.randomBytes(32)) }

    private init(unchecked bytes: [UInt8]) { self.bytes = bytes }

    /// Parses the text form (43 characters of base64url, surrounding white
    /// space ignored).
    /// - Throws: `ControlKeyError` saying what is wrong, never echoing the text.
    public init(text: String) throws(ControlKeyError) {
        let trimmed = ControlCrypto.trimmingWhitespace(text)
        guard !trimmed.isEmpty else { throw .empty }
        guard let bytes = ControlCrypto.fromBase64url(trimmed) else { throw .notBase64url }
        guard bytes.count == 32 else { throw .wrongLength(bytes.count) }
        self.bytes = bytes
    }

    /// The text form: what the broker shows once and the gateway stores.
    public var text: String { ControlCrypto.base64url(bytes) }

    public var description: String { "<redacted>" }
    public var debugDescription: String { "<redacted>" }
}

public enum ControlKeyError: Error, Equatable, CustomStringConvertible {
    case empty
    case notBase64url
    case wrongLength(Int)

    public var description: String {
        switch self {
        case .empty: "the control key is empty"
        case .notBase64url: "the control key is not base64url text (expected 43 characters of A-Z a-z 0-9 - _)"
        case .wrongLength(let n): "the control key holds \(n) bytes; it must hold 32"
        }
    }
}

import Foundation
