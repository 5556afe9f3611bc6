import ControlProtocol
import Foundation
import SystemLayer

/// A PROXY protocol v2 header (the HAProxy spec, section 2.2), as a gateway's
/// broker forwarding sends it ahead of a client's bytes
/// (docs/CONTROL-PROTOCOL.md, "Broker forwarding"). Pure parsing and
/// encoding; the broker's listener does the I/O.
public struct ProxyHeader: Sendable, Equatable {
    /// The 12 bytes every v2 header starts with.
    public static let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    /// TLV types of the custom range this product uses.
    public static let signatureTLV: UInt8 = 0xE0
    public static let authenticationTLV: UInt8 = 0xE1
    /// Longest header accepted (16 bytes of fixed part plus addresses and TLVs).
    public static let maxLength = 16 + 1024

    /// PROXY (a relayed connection) or LOCAL (the proxy's own, e.g. a health check).
    public var isLocal: Bool
    /// Client address and port (nil for LOCAL or an unspecified family).
    public var source: (ip: String, port: Int)?
    /// The address and port the client connected to on the proxy.
    public var destination: (ip: String, port: Int)?
    /// TLVs by type (the last wins when one repeats).
    public var tlvs: [UInt8: [UInt8]]

    public init(isLocal: Bool = false, source: (ip: String, port: Int)?, destination: (ip: String, port: Int)?,
                tlvs: [UInt8: [UInt8]] = [:]) {
        self.isLocal = isLocal
        self.source = source
        self.destination = destination
        self.tlvs = tlvs
    }

    public static func == (a: ProxyHeader, b: ProxyHeader) -> Bool {
        a.isLocal == b.isLocal && a.source?.ip == b.source?.ip && a.source?.port == b.source?.port
            && a.destination?.ip == b.destination?.ip && a.destination?.port == b.destination?.port && a.tlvs == b.tlvs
    }

    public enum Parse: Sendable, Equatable {
        /// The bytes do not start with the v2 signature: a direct client.
        case notProxy
        /// A prefix of a header: read more.
        case needMore
        /// A v2 header that is malformed: close the connection.
        case invalid(String)
        /// A header of `length` bytes.
        case header(ProxyHeader, length: Int)
    }

    /// Parses the start of a connection's bytes.
    public static func parse(_ bytes: [UInt8]) -> Parse {
        let prefix = min(bytes.count, signature.count)
        guard Array(bytes[0..<prefix]) == Array(signature[0..<prefix]) else { return .notProxy }
        guard bytes.count >= 16 else { return .needMore }
        let versionCommand = bytes[12]
        guard versionCommand >> 4 == 2 else { return .invalid("PROXY header version \(versionCommand >> 4), expected 2") }
        let command = versionCommand & 0x0F
        guard command <= 1 else { return .invalid("PROXY header command \(command), expected LOCAL (0) or PROXY (1)") }
        let family = bytes[13] >> 4
        let transport = bytes[13] & 0x0F
        let length = Int(bytes[14]) << 8 | Int(bytes[15])
        guard 16 + length <= maxLength else { return .invalid("PROXY header of \(16 + length) bytes is longer than \(maxLength)") }
        guard bytes.count >= 16 + length else { return .needMore }
        let body = Array(bytes[16..<(16 + length)])
        var header = ProxyHeader(isLocal: command == 0, source: nil, destination: nil)
        var offset = 0
        switch family {
        case 0:
            break
        case 1, 2:
            guard transport == 1 else { return .invalid("PROXY header transport \(transport), expected STREAM (1)") }
            let size = family == 1 ? 4 : 16
            guard body.count >= 2 * size + 4 else { return .invalid("PROXY header too short for its addresses") }
            let source = address(Array(body[0..<size]))
            let destination = address(Array(body[size..<(2 * size)]))
            let sourcePort = Int(body[2 * size]) << 8 | Int(body[2 * size + 1])
            let destinationPort = Int(body[2 * size + 2]) << 8 | Int(body[2 * size + 3])
            header.source = (source, sourcePort)
            header.destination = (destination, destinationPort)
            offset = 2 * size + 4
        default:
            return .invalid("PROXY header address family \(family), expected AF_INET (1) or AF_INET6 (2)")
        }
        while offset < body.count {
            guard body.count - offset >= 3 else { return .invalid("PROXY header TLV truncated") }
            let type = body[offset]
            let valueLength = Int(body[offset + 1]) << 8 | Int(body[offset + 2])
            guard body.count - offset - 3 >= valueLength else { return .invalid("PROXY header TLV 0x\(String(type, radix: 16)) truncated") }
            header.tlvs[type] = Array(body[(offset + 3)..<(offset + 3 + valueLength)])
            offset += 3 + valueLength
        }
        return .header(header, length: 16 + length)
    }

    /// The header's bytes (AF_INET or AF_INET6 + STREAM, PROXY command).
    public func encoded() -> [UInt8] {
        var body: [UInt8] = []
        var family: UInt8 = 0
        if let source, let destination, let s = IPAddress(source.ip), let d = IPAddress(destination.ip), s.isIPv4 == d.isIPv4 {
            family = s.isIPv4 ? 0x11 : 0x21
            body += Self.bytes(s) + Self.bytes(d)
            body += [UInt8(source.port >> 8), UInt8(source.port & 0xFF), UInt8(destination.port >> 8), UInt8(destination.port & 0xFF)]
        }
        for (type, value) in tlvs.sorted(by: { $0.key < $1.key }) {
            body += [type, UInt8(value.count >> 8), UInt8(value.count & 0xFF)] + value
        }
        return Self.signature + [isLocal ? 0x20 : 0x21, family, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    }

    private static func address(_ bytes: [UInt8]) -> String {
        if bytes.count == 4 {
            return IPAddress.v4(bytes.reduce(0) { $0 << 8 | UInt32($1) }).description
        }
        let high = bytes[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let low = bytes[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        return IPAddress.v6(high, low).description
    }

    private static func bytes(_ address: IPAddress) -> [UInt8] {
        switch address {
        case .v4(let value): return (0..<4).map { UInt8(truncatingIfNeeded: value >> (24 - 8 * UInt32($0))) }
        case .v6(let high, let low):
            return (0..<8).map { UInt8(truncatingIfNeeded: high >> (56 - 8 * UInt64($0))) }
                + (0..<8).map { UInt8(truncatingIfNeeded: low >> (56 - 8 * UInt64($0))) }
        }
    }
}

/// Who a verified PROXY header says is on the other end.
public struct ProxyOrigin: Sendable, Equatable {
    /// The client's address, from the header.
    public var clientIP: String
    /// The gateway that relayed the connection.
    public var gatewayID: Int64
}

/// The `0xE1` TLV: `gw=<id>,ts=<unix seconds>,mac=<base64url>`, and its check.
public enum ProxyAuthentication {
    /// The text the MAC covers.
    public static func macText(gatewayID: Int64, timestamp: Int64, source: (ip: String, port: Int),
                               destination: (ip: String, port: Int)) -> [UInt8] {
        Array("proxy-v2\n\(gatewayID)\n\(timestamp)\n\(source.ip)\n\(source.port)\n\(destination.ip)\n\(destination.port)".utf8)
    }

    /// The TLV value a gateway sends (used by tests and by gateways written in Swift).
    public static func tlv(gatewayID: Int64, key: ControlKey, timestamp: Int64, source: (ip: String, port: Int),
                           destination: (ip: String, port: Int)) -> [UInt8] {
        let mac = ControlCrypto.hmacSHA256(key: key.bytes, message: macText(gatewayID: gatewayID, timestamp: timestamp,
                                                                             source: source, destination: destination))
        return Array("gw=\(gatewayID),ts=\(timestamp),mac=\(ControlCrypto.base64url(mac))".utf8)
    }

    /// The gateway id the header claims, so its key can be looked up.
    /// - Throws: a reason when the header carries no well-formed `0xE1`.
    public static func claimedGateway(_ header: ProxyHeader) throws(ProxyRefusal) -> Int64 {
        try fields(header).gateway
    }

    /// Checks the header's `0xE1` TLV under `key`, with a timestamp within
    /// `ControlSigner.window` seconds of `now`.
    /// - Returns: the client address and the gateway.
    /// - Throws: `ProxyRefusal` saying why (never holding the key).
    public static func verify(_ header: ProxyHeader, key: ControlKey?, now: Int64) throws(ProxyRefusal) -> ProxyOrigin {
        let (gateway, timestamp, mac) = try fields(header)
        guard let key else { throw ProxyRefusal("gateway \(gateway) is not enrolled") }
        guard let source = header.source, let destination = header.destination, !header.isLocal else {
            throw ProxyRefusal("a PROXY header from a gateway must carry the client's address (PROXY command, AF_INET or AF_INET6)")
        }
        let skew = timestamp - now
        guard abs(skew) <= ControlSigner.window else {
            throw ProxyRefusal("timestamp is \(skew) s away from this host's clock (at most \(ControlSigner.window) s allowed)")
        }
        let expected = ControlCrypto.hmacSHA256(key: key.bytes, message: macText(gatewayID: gateway, timestamp: timestamp,
                                                                                  source: source, destination: destination))
        guard ControlCrypto.constantTimeEqual(expected, mac) else {
            throw ProxyRefusal("the MAC of gateway \(gateway) does not verify")
        }
        // An IPv4 client in a mapped IPv6 header (the gateway maps when the families differ) is recorded as IPv4.
        return ProxyOrigin(clientIP: IPAddress(source.ip)?.unmapped.description ?? source.ip, gatewayID: gateway)
    }

    private static func fields(_ header: ProxyHeader) throws(ProxyRefusal) -> (gateway: Int64, timestamp: Int64, mac: [UInt8]) {
        guard let value = header.tlvs[ProxyHeader.authenticationTLV] else {
            throw ProxyRefusal("no gateway authentication (TLV 0xE1) in the PROXY header")
        }
        var fields: [String: String] = [:]
        for part in String(decoding: value, as: UTF8.self).split(separator: ",") {
            let pair = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2 else { throw ProxyRefusal("TLV 0xE1 must be gw=<id>,ts=<seconds>,mac=<base64url>") }
            fields[pair[0]] = pair[1]
        }
        guard let gateway = fields["gw"].flatMap({ Int64($0) }), gateway > 0,
              let timestamp = fields["ts"].flatMap({ Int64($0) }),
              let mac = fields["mac"].flatMap(ControlCrypto.fromBase64url), mac.count == 32 else {
            throw ProxyRefusal("TLV 0xE1 must be gw=<id>,ts=<seconds>,mac=<base64url>")
        }
        return (gateway, timestamp, mac)
    }
}

/// Why a PROXY header was refused (the connection is closed).
public struct ProxyRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
