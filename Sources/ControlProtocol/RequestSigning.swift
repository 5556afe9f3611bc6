import Synchronization

/// Which way a control request goes; part of the signed text, so a request
/// signed for one direction never verifies in the other (no reflection).
public enum ControlDirection: String, Sendable {
    case gatewayToBroker = "gateway-to-broker"
    case brokerToGateway = "broker-to-gateway"
}

/// The parsed `Authorization: LEO-HMAC-SHA256 gw=..., ts=..., nonce=..., sig=...` header.
public struct ControlAuthorization: Sendable, Equatable {
    public static let scheme = "LEO-HMAC-SHA256"

    public let gatewayID: Int
    public let timestamp: Int64
    public let nonce: String
    public let signature: [UInt8]

    public init(gatewayID: Int, timestamp: Int64, nonce: String, signature: [UInt8]) {
        self.gatewayID = gatewayID
        self.timestamp = timestamp
        self.nonce = nonce
        self.signature = signature
    }

    /// The header value.
    public var headerValue: String {
        "\(Self.scheme) gw=\(gatewayID), ts=\(timestamp), nonce=\(nonce), sig=\(ControlCrypto.base64url(signature))"
    }

    /// Parses a header value.
    /// - Throws: `ControlAuthError.malformed` naming the part that is wrong.
    public init(header: String) throws(ControlAuthError) {
        // Bytes, not Foundation's string search: this runs for every control request.
        func trimmed(_ part: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
            var part = part
            while let first = part.first, first == 0x20 || first == 0x09 { part.removeFirst() }
            while let last = part.last, last == 0x20 || last == 0x09 { part.removeLast() }
            return part
        }
        let value = trimmed(Array(header.utf8)[...])
        let prefix = Array((Self.scheme + " ").utf8)
        guard value.starts(with: prefix) else {
            throw .malformed("expected the \(Self.scheme) scheme")
        }
        var fields: [String: String] = [:]
        for part in value.dropFirst(prefix.count).split(separator: 0x2C) {
            guard let equals = part.firstIndex(of: 0x3D) else {
                throw .malformed("expected key=value pairs gw, ts, nonce and sig, each once")
            }
            let key = String(decoding: trimmed(part[..<equals]), as: UTF8.self)
            let field = String(decoding: trimmed(part[(equals + 1)...]), as: UTF8.self)
            guard !key.isEmpty, fields[key] == nil else {
                throw .malformed("expected key=value pairs gw, ts, nonce and sig, each once")
            }
            fields[key] = field
        }
        guard fields.count == 4 else { throw .malformed("expected exactly gw, ts, nonce and sig") }
        guard let gw = fields["gw"].flatMap({ Int($0) }), gw > 0 else { throw .malformed("gw must be a positive gateway id") }
        guard let ts = fields["ts"].flatMap({ Int64($0) }) else { throw .malformed("ts must be unix seconds") }
        guard let nonce = fields["nonce"], nonce.utf8.count == 32,
              nonce.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else {
            throw .malformed("nonce must be 32 lower-case hex digits")
        }
        guard let sig = fields["sig"].flatMap(ControlCrypto.fromBase64url), sig.count == 32 else {
            throw .malformed("sig must be 32 bytes of base64url")
        }
        self.init(gatewayID: gw, timestamp: ts, nonce: nonce, signature: sig)
    }
}

/// Why a control request was not accepted. Descriptions are safe to return
/// to the peer and to log: they never hold the key or the signature.
public enum ControlAuthError: Error, Equatable, CustomStringConvertible {
    case missing
    case malformed(String)
    case unknownGateway(Int)
    case clockSkew(seconds: Int64)
    case replayed
    case badSignature

    public var description: String {
        switch self {
        case .missing: "Authorization: a signed control request is required (\(ControlAuthorization.scheme))"
        case .malformed(let why): "Authorization: \(why)"
        case .unknownGateway(let id): "Authorization: gateway \(id) is not enrolled"
        case .clockSkew(let s): "Authorization: timestamp is \(s) s away from this host's clock (at most \(ControlSigner.window) s allowed)"
        case .replayed: "Authorization: this request was already received (replay)"
        case .badSignature: "Authorization: signature does not verify (wrong key: not the enrolled gateway or its registered broker)"
        }
    }
}

/// Signs and verifies control requests with one gateway's key.
public struct ControlSigner: Sendable {
    /// How far a request's timestamp may be from the receiver's clock.
    public static let window: Int64 = 60

    public let gatewayID: Int
    public let key: ControlKey

    public init(gatewayID: Int, key: ControlKey) {
        self.gatewayID = gatewayID
        self.key = key
    }

    static func signedText(direction: ControlDirection, method: String, path: String,
                           timestamp: Int64, nonce: String, body: [UInt8]) -> [UInt8] {
        let text = "\(ControlAuthorization.scheme)\n\(direction.rawValue)\n\(method.uppercased())\n\(path)\n\(timestamp)\n\(nonce)\n"
            + ControlCrypto.hex(ControlCrypto.sha256(body))
        return Array(text.utf8)
    }

    /// The Authorization header value for a request.
    public func authorize(direction: ControlDirection, method: String, path: String, body: [UInt8],
                          now: Int64 = ControlClock.unixSeconds()) -> String {
        let nonce = ControlCrypto.hex(ControlCrypto.randomBytes(16))
        let mac = ControlCrypto.hmacSHA256(key: key.bytes, message: ControlSigner.signedText(
            direction: direction, method: method, path: path, timestamp: now, nonce: nonce, body: body))
        return ControlAuthorization(gatewayID: gatewayID, timestamp: now, nonce: nonce, signature: mac).headerValue
    }

    /// Checks a request's signature and freshness (the caller found this
    /// signer by `authorization.gatewayID`), and records its nonce.
    public func verify(_ authorization: ControlAuthorization, direction: ControlDirection, method: String,
                       path: String, body: [UInt8], replay: ReplayGuard,
                       now: Int64 = ControlClock.unixSeconds()) throws(ControlAuthError) {
        guard authorization.gatewayID == gatewayID else { throw .unknownGateway(authorization.gatewayID) }
        let skew = authorization.timestamp - now
        guard abs(skew) <= ControlSigner.window else { throw .clockSkew(seconds: skew) }
        let expected = ControlCrypto.hmacSHA256(key: key.bytes, message: ControlSigner.signedText(
            direction: direction, method: method, path: path, timestamp: authorization.timestamp,
            nonce: authorization.nonce, body: body))
        guard ControlCrypto.constantTimeEqual(expected, authorization.signature) else { throw .badSignature }
        guard replay.firstSight(gatewayID: gatewayID, nonce: authorization.nonce, timestamp: authorization.timestamp, now: now) else {
            throw .replayed
        }
    }
}

/// Nonces seen within the freshness window, per gateway: a request replayed
/// within the window is refused; one replayed later fails the timestamp check.
///
/// A nonce is kept exactly as long as its request could pass that check
/// (until its timestamp + `ControlSigner.window`), in buckets by that
/// second, so forgetting is O(1) per nonce, never a pass over the table
/// under the lock a push waits for. At a steady rate R the table holds
/// about R x 60 nonces; `capacity` bounds it.
public final class ReplayGuard: Sendable {
    /// A nonce as 16 bytes (its 32 hex digits; another text by its SHA-256).
    private struct Entry: Hashable {
        let gateway: Int
        let high: UInt64
        let low: UInt64
    }

    private struct Table {
        /// Each nonce seen, with the last second its request is fresh.
        var seen: [Entry: Int64] = [:]
        /// The same nonces by that second.
        var byExpiry: [Int64: [Entry]] = [:]
        /// The second of the last sweep: one sweep per second at most.
        var sweptAt = Int64.min
    }

    private let table = Mutex(Table())
    /// Bound on remembered nonces. Beyond it, requests are refused until
    /// nonces expire (a flood of fresh ones): never forgotten early.
    private let capacity: Int

    /// - Parameter capacity: nonces kept at most (about 40 MB at the
    ///   default; a rate of 8,000 requests/s held for a minute).
    public init(capacity: Int = 500_000) { self.capacity = capacity }

    /// True the first time (gateway, nonce) is seen within the window.
    public func firstSight(gatewayID: Int, nonce: String, timestamp: Int64, now: Int64) -> Bool {
        let entry = Self.entry(gatewayID: gatewayID, nonce: nonce)
        // Fresh until this second: a replay later fails the timestamp check.
        let expiry = timestamp + ControlSigner.window
        return table.withLock { table in
            if table.sweptAt != now {
                table.sweptAt = now
                // The expired seconds first: removing while iterating the keys would copy the table.
                let expired = table.byExpiry.keys.filter { $0 < now }
                for second in expired {
                    for old in table.byExpiry.removeValue(forKey: second) ?? [] { table.seen[old] = nil }
                }
            }
            guard table.seen[entry] == nil else { return false }
            // Still full of fresh entries: refuse rather than forget (a flood).
            guard table.seen.count < capacity else { return false }
            table.seen[entry] = expiry
            table.byExpiry[expiry, default: []].append(entry)
            return true
        }
    }

    /// Nonces remembered now (tests).
    public var count: Int { table.withLock { $0.seen.count } }

    private static func entry(gatewayID: Int, nonce: String) -> Entry {
        var high: UInt64 = 0, low: UInt64 = 0, digits = 0
        for byte in nonce.utf8 {
            let value: UInt8
            switch byte {
            case 0x30...0x39: value = byte - 0x30
            case 0x61...0x66: value = byte - 0x61 + 10
            default: value = 0xFF
            }
            guard value != 0xFF, digits < 32 else { digits = -1; break }
            if digits < 16 { high = high << 4 | UInt64(value) } else { low = low << 4 | UInt64(value) }
            digits += 1
        }
        if digits == 32 { return Entry(gateway: gatewayID, high: high, low: low) }
        // Not the header's form (it is checked before): the text's digest.
        let digest = ControlCrypto.sha256(Array(nonce.utf8))
        return Entry(gateway: gatewayID,
                     high: digest[0..<8].reduce(0) { $0 << 8 | UInt64($1) },
                     low: digest[8..<16].reduce(0) { $0 << 8 | UInt64($1) })
    }
}

/// Wall-clock seconds (the signed timestamps compare clocks of two hosts).
public enum ControlClock {
    public static func unixSeconds() -> Int64 { Int64(Date().timeIntervalSince1970) }
}

import Foundation
