import ControlProtocol
import Relay
import SystemLayer

/// Broker forwarding (docs/CONTROL-PROTOCOL.md, "Broker forwarding"): the
/// gateway's public HTTPS port relayed at L4 to the broker, each connection
/// opened with a PROXY protocol v2 header that carries the client's address
/// and two TLVs: `0xE0` the gateway's signature, `0xE1` an HMAC under the
/// control key that proves which enrolled gateway sent it.
public enum BrokerForwarding {
    /// The engine id of the forwarding rule (config forward names cannot hold ':').
    public static let ruleID = "control:broker-forward"
    public static let signatureTLV: UInt8 = 0xE0
    public static let authenticationTLV: UInt8 = 0xE1
    static let proxySignature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    /// The forwarding rule: `listen` relayed to `broker` with the header.
    public static func rule(listen: SocketAddress, broker: SocketAddress, signer: ControlSigner, signature: String,
                            clock: @escaping @Sendable () -> Int64 = { ControlClock.unixSeconds() }) -> RelayRule {
        var rule = RelayRule(id: ruleID, listen: listen, target: broker)
        // The key's fingerprint names the preamble, so a new key is a new rule value.
        let fingerprint = ControlCrypto.hex(Array(ControlCrypto.sha256(signer.key.bytes).prefix(4)))
        rule.preamble = ConnectionPreamble(name: "PROXY v2 header (gateway \(signer.gatewayID), key \(fingerprint))") { client, local in
            header(client: client, destination: local, signer: signer, signature: signature, timestamp: clock())
        }
        return rule
    }

    /// The header bytes (version 2, command PROXY, AF_INET/AF_INET6 + STREAM).
    public static func header(client: SocketAddress, destination: SocketAddress, signer: ControlSigner, signature: String,
                              timestamp: Int64) -> [UInt8] {
        var source = client
        var target = destination
        // Both addresses must be of one family: map IPv4 into IPv6 when they differ.
        if source.ip.unmapped.isIPv4 != target.ip.unmapped.isIPv4 {
            source = SocketAddress(ip: mapped(source.ip), port: source.port)
            target = SocketAddress(ip: mapped(target.ip), port: target.port)
        } else {
            source = SocketAddress(ip: source.ip.unmapped, port: source.port)
            target = SocketAddress(ip: target.ip.unmapped, port: target.port)
        }
        let text = "proxy-v2\n\(signer.gatewayID)\n\(timestamp)\n\(source.ip)\n\(source.port)\n\(target.ip)\n\(target.port)"
        let mac = ControlCrypto.hmacSHA256(key: signer.key.bytes, message: Array(text.utf8))
        let authentication = Array("gw=\(signer.gatewayID),ts=\(timestamp),mac=\(ControlCrypto.base64url(mac))".utf8)
        var body = bytes(source.ip) + bytes(target.ip)
        body += [UInt8(source.port >> 8), UInt8(source.port & 0xFF), UInt8(target.port >> 8), UInt8(target.port & 0xFF)]
        for (type, value) in [(signatureTLV, Array(signature.utf8.prefix(100))), (authenticationTLV, authentication)] {
            body += [type, UInt8(value.count >> 8), UInt8(value.count & 0xFF)] + value
        }
        let family: UInt8 = source.ip.isIPv4 ? 0x11 : 0x21
        return proxySignature + [0x21, family, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    }

    static func mapped(_ ip: IPAddress) -> IPAddress {
        switch ip {
        case .v4(let value): .v6(0, 0xFFFF_0000_0000 | UInt64(value))
        case .v6: ip
        }
    }

    static func bytes(_ ip: IPAddress) -> [UInt8] {
        switch ip {
        case .v4(let value): (0..<4).map { UInt8(truncatingIfNeeded: value >> (24 - 8 * UInt32($0))) }
        case .v6(let high, let low):
            (0..<8).map { UInt8(truncatingIfNeeded: high >> (56 - 8 * UInt64($0))) }
                + (0..<8).map { UInt8(truncatingIfNeeded: low >> (56 - 8 * UInt64($0))) }
        }
    }
}
