import CTLSClient

/// How a TLS client trusts its server.
public enum TLSTrust: Sendable, Equatable {
    /// The chain must verify against this CA file (PEM) and name the host.
    case caFile(String)
    /// The server certificate's DER must hash (SHA-256) to these 32 bytes.
    case pin([UInt8])
    /// Nothing is verified: only to learn a certificate's hash (the first pin at enrollment).
    case learn
}

/// Why a TLS session failed: the step and OpenSSL's reason.
public struct TLSClientError: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}

/// A blocking TLS client session on a connected socket, on the system's
/// OpenSSL (CTLSClient): TLS 1.2 or later. The socket stays the caller's.
public final class TLSClientSession {
    private let handle: OpaquePointer

    /// Handshakes on `fd` (which becomes blocking, with the timeout on every read and write).
    public init(fd: FileDescriptor, host: String, trust: TLSTrust, timeoutMilliseconds: Int32) throws(TLSClientError) {
        BlockingCallCheck.check("TLS handshake with \(host)")
        var error = [CChar](repeating: 0, count: 512)
        let made: OpaquePointer?
        switch trust {
        case .caFile(let path):
            made = rdg_tls_connect(fd.rawValue, host, path, nil, timeoutMilliseconds, &error, error.count)
        case .pin(let hash):
            guard hash.count == 32 else { throw TLSClientError(description: "a pin must be 32 bytes (SHA-256), got \(hash.count)") }
            made = hash.withUnsafeBufferPointer { pin in
                rdg_tls_connect(fd.rawValue, host, nil, pin.baseAddress, timeoutMilliseconds, &error, error.count)
            }
        case .learn:
            made = rdg_tls_connect(fd.rawValue, host, nil, nil, timeoutMilliseconds, &error, error.count)
        }
        guard let made else { throw TLSClientError(description: Self.text(error)) }
        handle = made
    }

    deinit { rdg_tls_free(handle) }

    /// SHA-256 of the server certificate's DER.
    public var peerSHA256: [UInt8]? {
        var out = [UInt8](repeating: 0, count: 32)
        return rdg_tls_peer_sha256(handle, &out) == 0 ? out : nil
    }

    public func writeAll(_ bytes: [UInt8]) throws(TLSClientError) {
        var error = [CChar](repeating: 0, count: 512)
        let result = bytes.withUnsafeBytes { raw in rdg_tls_write_all(handle, raw.baseAddress, raw.count, &error, error.count) }
        if result != 0 { throw TLSClientError(description: Self.text(error)) }
    }

    /// Reads what arrives: an empty array at the end of the stream.
    public func read(maximum: Int = 16384) throws(TLSClientError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: maximum)
        var error = [CChar](repeating: 0, count: 512)
        let got = buffer.withUnsafeMutableBytes { raw in rdg_tls_read(handle, raw.baseAddress, raw.count, &error, error.count) }
        if got < 0 { throw TLSClientError(description: Self.text(error)) }
        return Array(buffer.prefix(Int(got)))
    }

    private static func text(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// "SHA256:AB:CD:..." as OpenSSL's `x509 -fingerprint -sha256` prints it.
    public static func fingerprint(_ hash: [UInt8]) -> String {
        "SHA256:" + hash.map { String($0, radix: 16, uppercase: true).leftPadded(2) }.joined(separator: ":")
    }

    /// Parses "SHA256:AB:CD:..." (or 64 hex digits, with or without colons).
    public static func parseFingerprint(_ text: String) -> [UInt8]? {
        var hex = text.uppercased()
        if hex.hasPrefix("SHA256:") { hex.removeFirst(7) }
        hex = hex.replacingOccurrences(of: ":", with: "")
        guard hex.utf8.count == 64 else { return nil }
        var bytes: [UInt8] = []
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            guard let byte = UInt8(hex[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        return bytes
    }
}

private extension String {
    func leftPadded(_ width: Int) -> String { count >= width ? self : String(repeating: "0", count: width - count) + self }
    func replacingOccurrences(of target: String, with replacement: String) -> String {
        split(separator: Character(target), omittingEmptySubsequences: false).joined(separator: replacement)
    }
}
