import CSystemShim
import Glibc

/// An IPv4 or IPv6 address held as plain integers, so matching a client
/// against a rule never allocates.
public enum IPAddress: Hashable, Sendable, CustomStringConvertible {
    /// IPv4 in host byte order.
    case v4(UInt32)
    /// IPv6 as two 64-bit halves in host byte order (high, low).
    case v6(UInt64, UInt64)

    /// Parses a numeric IPv4 or IPv6 address (no brackets, no port).
    /// - Returns: nil when `text` is not a numeric address.
    public init?(_ text: String) {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            self = .v4(UInt32(bigEndian: v4.s_addr))
            return
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            self = IPAddress(in6: v6)
            return
        }
        return nil
    }

    init(in6 addr: in6_addr) {
        var high: UInt64 = 0, low: UInt64 = 0
        withUnsafeBytes(of: addr) { bytes in
            for i in 0..<8 { high = high << 8 | UInt64(bytes[i]) }
            for i in 8..<16 { low = low << 8 | UInt64(bytes[i]) }
        }
        self = .v6(high, low)
    }

    var in6: in6_addr {
        guard case .v6(let high, let low) = self else { return in6_addr() }
        var addr = in6_addr()
        withUnsafeMutableBytes(of: &addr) { bytes in
            for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: high >> (56 - 8 * UInt64(i))) }
            for i in 0..<8 { bytes[8 + i] = UInt8(truncatingIfNeeded: low >> (56 - 8 * UInt64(i))) }
        }
        return addr
    }

    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as plain IPv4; anything else unchanged.
    public var unmapped: IPAddress {
        if case .v6(0, let low) = self, low >> 32 == 0xffff { return .v4(UInt32(truncatingIfNeeded: low)) }
        return self
    }

    public var isIPv4: Bool { if case .v4 = self { true } else { false } }

    /// 127.0.0.0/8 or ::1 (also as a v4-mapped address).
    public var isLoopback: Bool {
        switch unmapped {
        case .v4(let a): a >> 24 == 127
        case .v6(let h, let l): h == 0 && l == 1
        }
    }

    /// The wildcard address of the same family.
    public var isUnspecified: Bool {
        switch self {
        case .v4(let a): a == 0
        case .v6(let h, let l): h == 0 && l == 0
        }
    }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        switch self {
        case .v4(let value):
            // Written here: glibc's inet_ntop formats IPv4 with sprintf,
            // which was 4 % of the gateway's CPU in a batch of rule pushes.
            var text: [UInt8] = []
            text.reserveCapacity(15)
            for shift in stride(from: 24, through: 0, by: -8) {
                let octet = UInt8(truncatingIfNeeded: value >> UInt32(shift))
                if shift != 24 { text.append(UInt8(ascii: ".")) }
                if octet >= 100 { text.append(UInt8(ascii: "0") + octet / 100) }
                if octet >= 10 { text.append(UInt8(ascii: "0") + octet / 10 % 10) }
                text.append(UInt8(ascii: "0") + octet % 10)
            }
            return String(decoding: text, as: UTF8.self)
        case .v6:
            var addr = in6
            inet_ntop(AF_INET6, &addr, &buffer, socklen_t(buffer.count))
        }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A network prefix such as `10.0.0.0/8` or `2001:db8::/32`, for allow-lists.
public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    public let address: IPAddress
    public let prefixLength: Int

    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a /32 or /128).
    /// - Returns: nil when the text is not a valid prefix.
    public init?(_ text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let address = IPAddress(String(parts[0])) else { return nil }
        let maxLength = address.isIPv4 ? 32 : 128
        var length = maxLength
        if parts.count == 2 {
            guard let n = Int(parts[1]), (0...maxLength).contains(n), !parts[1].hasPrefix("+") else { return nil }
            length = n
        }
        self.init(address: address, prefixLength: length)
    }

    public init(address: IPAddress, prefixLength: Int) {
        self.prefixLength = prefixLength
        self.address = CIDR.mask(address, prefixLength)
    }

    /// True when `candidate` (IPv4-mapped IPv6 counts as IPv4) lies inside this prefix.
    @inlinable
    public func contains(_ candidate: IPAddress) -> Bool {
        CIDR.mask(candidate.unmapped, prefixLength) == address
    }

    @usableFromInline
    static func mask(_ address: IPAddress, _ length: Int) -> IPAddress {
        switch address {
        case .v4(let value):
            let mask: UInt32 = length == 0 ? 0 : ~UInt32(0) << UInt32(32 - min(length, 32))
            return .v4(value & mask)
        case .v6(let high, let low):
            let highMask: UInt64 = length >= 64 ? ~0 : (length == 0 ? 0 : ~UInt64(0) << UInt64(64 - length))
            let lowMask: UInt64 = length <= 64 ? 0 : (length >= 128 ? ~0 : ~UInt64(0) << UInt64(128 - length))
            return .v6(high & highMask, low & lowMask)
        }
    }

    public var description: String { "\(address)/\(prefixLength)" }
}

/// An IP address and port, convertible to and from `sockaddr`.
public struct SocketAddress: Hashable, Sendable, CustomStringConvertible {
    public let ip: IPAddress
    public let port: UInt16

    public init(ip: IPAddress, port: UInt16) {
        self.ip = ip
        self.port = port
    }

    /// Parses `a.b.c.d:port` or `[v6]:port` with a numeric address.
    /// - Returns: nil when the text is not of that form or the port is not 0-65535.
    public init?(_ text: String) {
        guard let (host, port) = SocketAddress.splitHostPort(text), let ip = IPAddress(host) else { return nil }
        self.init(ip: ip, port: port)
    }

    /// Splits `host:port` or `[v6]:port` into its parts, checking only the port.
    public static func splitHostPort(_ text: String) -> (host: String, port: UInt16)? {
        var host: Substring
        var portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return nil }
            portText = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            if host.contains(":") { return nil } // IPv6 without brackets is ambiguous
        }
        guard !host.isEmpty, !portText.isEmpty, portText.allSatisfy(\.isASCII),
              portText.allSatisfy(\.isNumber), let port = UInt16(portText) else { return nil }
        return (String(host), port)
    }

    /// Resolves `host` (a numeric address or a DNS name) with getaddrinfo,
    /// preferring IPv4. Blocking: for configuration time only.
    /// - Throws: `AddressResolutionError` naming the host.
    public static func resolve(host: String, port: UInt16) throws(AddressResolutionError) -> SocketAddress {
        if let ip = IPAddress(host) { return SocketAddress(ip: ip, port: port) }
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, nil, &hints, &result)
        guard rc == 0, let first = result else {
            throw AddressResolutionError(host: host, reason: String(cString: gai_strerror(rc)))
        }
        defer { freeaddrinfo(first) }
        var candidates: [IPAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let entry = cursor {
            if let sa = entry.pointee.ai_addr, let address = SocketAddress(sockaddr: sa, length: entry.pointee.ai_addrlen) {
                candidates.append(address.ip)
            }
            cursor = entry.pointee.ai_next
        }
        guard let chosen = candidates.first(where: \.isIPv4) ?? candidates.first else {
            throw AddressResolutionError(host: host, reason: "no address")
        }
        return SocketAddress(ip: chosen, port: port)
    }

    public var family: Int32 { ip.isIPv4 ? AF_INET : AF_INET6 }

    public var description: String {
        switch ip {
        case .v4: "\(ip):\(port)"
        case .v6: "[\(ip)]:\(port)"
        }
    }

    /// Reads an address from a `sockaddr` filled in by the kernel.
    init?(sockaddr pointer: UnsafePointer<sockaddr>, length: socklen_t) {
        switch Int32(pointer.pointee.sa_family) {
        case AF_INET:
            // Safe: the family says the storage holds a sockaddr_in.
            let sin = UnsafeRawPointer(pointer).loadUnaligned(as: sockaddr_in.self)
            self.init(ip: .v4(UInt32(bigEndian: sin.sin_addr.s_addr)), port: UInt16(bigEndian: sin.sin_port))
        case AF_INET6:
            // Safe: the family says the storage holds a sockaddr_in6.
            let sin6 = UnsafeRawPointer(pointer).loadUnaligned(as: sockaddr_in6.self)
            self.init(ip: IPAddress(in6: sin6.sin6_addr), port: UInt16(bigEndian: sin6.sin6_port))
        default:
            return nil
        }
    }

    /// This address as a `sockaddr_storage`.
    var storage: sockaddr_storage {
        var storage = sockaddr_storage()
        withSockAddr { pointer, length in
            // Safe: copies `length` bytes of a live sockaddr into storage, which is larger.
            withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: UnsafeRawBufferPointer(start: pointer, count: Int(length))) }
        }
        return storage
    }

    /// Calls `body` with this address as a `sockaddr` and its length.
    func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        switch ip {
        case .v4(let value):
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            sin.sin_addr = in_addr(s_addr: value.bigEndian)
            // Safe: sockaddr_in starts with the sockaddr header and lives for the call.
            return withUnsafePointer(to: &sin) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
        case .v6:
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = port.bigEndian
            sin6.sin6_addr = ip.in6
            // Safe: as above, for sockaddr_in6.
            return withUnsafePointer(to: &sin6) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
            }
        }
    }
}

/// A host name that could not be resolved.
public struct AddressResolutionError: Error, Sendable, CustomStringConvertible {
    public let host: String
    public let reason: String
    public var description: String { "cannot resolve \"\(host)\": \(reason)" }
}
