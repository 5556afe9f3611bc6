import Foundation
import SystemLayer

/// A field that failed validation, and why. Its description names the field first,
/// as the REST API's `{"error": ...}` shows it.
public struct FieldError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The field as the API spells it (`use_src_ip`, `protocols[1].port`).
    public let field: String
    /// What is wrong with it, for a person.
    public let message: String

    public init(_ field: String, _ message: String) {
        self.field = field
        self.message = message
    }

    public var description: String { "\(field): \(message)" }
}

/// The limits of LEOSTREAM-REST.md and of the product's own calls, in one place.
public enum Limits {
    public static let nameLength = 1...100
    public static let addressMaxLength = 255
    public static let signatureMaxLength = 100
    public static let notesMaxLength = 4095
    public static let loginLength = 1...64
    public static let passwordLength = 3...100
    public static let displayNameMaxLength = 100
    public static let domainMaxLength = 255
    public static let protocolNameLength = 1...32
    public static let protocolsPerDesktop = 1...32
    public static let port = 1...65535
}

/// Field checks shared by the domain types. Each throws a `FieldError` naming the field.
public enum Validate {
    /// A one-line text: `length` characters, no control characters, not only blanks.
    public static func name(_ value: String, field: String, length: ClosedRange<Int> = Limits.nameLength) throws(FieldError) {
        if value.isEmpty && length.lowerBound > 0 {
            throw FieldError(field, "is required (\(length.lowerBound) to \(length.upperBound) characters)")
        }
        try self.length(value, field: field, length)
        try noControlCharacters(value, field: field)
        if length.lowerBound > 0 && value.allSatisfy(\.isWhitespace) {
            throw FieldError(field, "must not be only blanks")
        }
    }

    /// Free text up to `max` characters; line breaks and tabs allowed, other control characters not.
    public static func notes(_ value: String, field: String, max: Int = Limits.notesMaxLength) throws(FieldError) {
        try length(value, field: field, 0...max)
        for scalar in value.unicodeScalars where isControl(scalar) && !["\n", "\r", "\t"].contains(scalar) {
            throw FieldError(field, "must not contain control character U+\(hex(scalar.value))")
        }
    }

    /// A printable token without blanks (a signature, a broker address), up to `max` characters.
    public static func token(_ value: String, field: String, max: Int) throws(FieldError) {
        try length(value, field: field, 0...max)
        try noControlCharacters(value, field: field)
        if value.contains(where: \.isWhitespace) {
            throw FieldError(field, "must not contain blanks")
        }
    }

    /// An IP address or a DNS name, up to 255 characters; empty only when not `required`.
    public static func host(_ value: String, field: String, required: Bool) throws(FieldError) {
        if value.isEmpty {
            if required { throw FieldError(field, "is required (an IP address or a DNS name)") }
            return
        }
        try length(value, field: field, 0...Limits.addressMaxLength)
        if IPAddress(value) != nil { return }
        var name = Substring(value)
        if name.hasSuffix(".") { name = name.dropLast() }
        let labels = name.split(separator: ".", omittingEmptySubsequences: false)
        let valid = !name.isEmpty && labels.allSatisfy { label in
            (1...63).contains(label.utf8.count)
                && label.utf8.allSatisfy { byte in
                    (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A)
                        || (byte >= 0x61 && byte <= 0x7A) || byte == 0x2D || byte == 0x5F
                }
                && label.first != "-" && label.last != "-"
        }
        if !valid {
            throw FieldError(field, "must be an IP address or a DNS name (letters, digits, '-', '_' in dot-separated labels of 1 to 63), got \(quoted(value))")
        }
    }

    /// A password of `Limits.passwordLength` characters.
    public static func password(_ value: String, field: String = "password") throws(FieldError) {
        try length(value, field: field, Limits.passwordLength)
    }

    /// A number inside `range`.
    public static func range(_ value: Int, field: String, _ range: ClosedRange<Int>) throws(FieldError) {
        if !range.contains(value) {
            throw FieldError(field, "must be \(range.lowerBound) to \(range.upperBound), got \(value)")
        }
    }

    static func length(_ value: String, field: String, _ length: ClosedRange<Int>) throws(FieldError) {
        let count = value.count
        if !length.contains(count) {
            let limit = length.lowerBound == 0 ? "at most \(length.upperBound)" : "\(length.lowerBound) to \(length.upperBound)"
            throw FieldError(field, "must be \(limit) characters, got \(count)")
        }
    }

    static func noControlCharacters(_ value: String, field: String) throws(FieldError) {
        for scalar in value.unicodeScalars where isControl(scalar) {
            throw FieldError(field, "must not contain control character U+\(hex(scalar.value))")
        }
    }

    private static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value)
    }

    private static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    /// A gateway's control endpoint: `http://HOST:PORT` or `https://HOST:PORT`,
    /// optionally with a path, without a query, fragment or credentials.
    public static func controlURL(_ value: String, field: String = "control_url") throws(FieldError) {
        try length(value, field: field, 1...Limits.addressMaxLength)
        guard let components = URLComponents(string: value), let scheme = components.scheme?.lowercased(),
              scheme == "http" || scheme == "https", let host = components.host, !host.isEmpty,
              components.query == nil, components.fragment == nil, components.user == nil, components.password == nil
        else {
            throw FieldError(field, "must be http://HOST:PORT or https://HOST:PORT, got \(quoted(value))")
        }
        if let port = components.port, !(1...65535).contains(port) {
            throw FieldError(field, "port must be 1 to 65535, got \(port)")
        }
    }

    /// A numeric IPv4 or IPv6 address.
    public static func ipAddress(_ value: String, field: String) throws(FieldError) {
        if IPAddress(value) == nil {
            throw FieldError(field, "must be a numeric IPv4 or IPv6 address, got \(quoted(value))")
        }
    }

    /// `value` in quotes, shortened to 60 characters so an error stays readable.
    static func quoted(_ value: String) -> String {
        value.count > 60 ? "'\(value.prefix(60))…'" : "'\(value)'"
    }
}

extension SourceIPMode {
    /// Parses the API's integer (0, 1 or 2).
    /// - Throws: `FieldError` naming `field` for any other number.
    public static func parse(_ value: Int, field: String = "use_src_ip") throws(FieldError) -> SourceIPMode {
        guard let mode = SourceIPMode(rawValue: value) else {
            throw FieldError(field, "must be 0 (random port, anyone), 1 (protocol port, client IP only) or 2 (random port, client IP only), got \(value)")
        }
        return mode
    }
}

extension GatewayForwarding {
    /// Parses the API's string: "" (the gateway's default), userspace, kernel or offload.
    /// - Throws: `FieldError` naming `field` for anything else.
    public static func parse(_ value: String, field: String = "forwarding_path") throws(FieldError) -> GatewayForwarding {
        guard let path = GatewayForwarding(rawValue: value) else {
            throw FieldError(field, "must be \"\" (the gateway's own default), userspace, kernel or offload, got \(Validate.quoted(value))")
        }
        return path
    }
}

extension LoadBalanceMethod {
    /// Parses the API's letter (`E`, `P` or `L`).
    /// - Throws: `FieldError` naming `field` for anything else.
    public static func parse(_ value: String, field: String = "load_balance_via") throws(FieldError) -> LoadBalanceMethod {
        guard let method = LoadBalanceMethod(rawValue: value) else {
            throw FieldError(field, "must be E (all gateways), P (the login gateway) or L (fewest connections), got \(Validate.quoted(value))")
        }
        return method
    }
}

extension Transport {
    /// Parses `tcp`, `udp` or `both`.
    public static func parse(_ value: String, field: String) throws(FieldError) -> Transport {
        guard let transport = Transport(rawValue: value) else {
            throw FieldError(field, "must be tcp, udp or both, got \(Validate.quoted(value))")
        }
        return transport
    }
}

extension UserRole {
    /// Parses `admin` or `user`.
    public static func parse(_ value: String, field: String = "role") throws(FieldError) -> UserRole {
        guard let role = UserRole(rawValue: value) else {
            throw FieldError(field, "must be admin or user, got \(Validate.quoted(value))")
        }
        return role
    }
}

extension Gateway {
    /// Checks every field against LEOSTREAM-REST.md.
    public func validate() throws(FieldError) {
        try Validate.name(name, field: "name")
        try Validate.host(address, field: "address", required: true)
        try Validate.host(addressPrivate, field: "address_private", required: false)
        if let loadBalancerID, loadBalancerID < 1 {
            throw FieldError("load_balancer_id", "must be the id of a gateway cluster, got \(loadBalancerID)")
        }
        try Validate.token(forwardTo, field: "forward_to", max: Limits.addressMaxLength)
        try Validate.token(signature, field: "signature", max: Limits.signatureMaxLength)
        try Validate.notes(notes, field: "notes")
    }
}

extension GatewayCluster {
    /// Checks every field against LEOSTREAM-REST.md.
    public func validate() throws(FieldError) {
        try Validate.name(name, field: "name")
        try Validate.host(address, field: "address", required: false)
        try Validate.notes(notes, field: "notes")
    }
}

extension DesktopProtocol {
    /// Checks the protocol at `index` of a desktop's list.
    public func validate(index: Int) throws(FieldError) {
        let prefix = "protocols[\(index)]"
        try Validate.length(name, field: "\(prefix).name", Limits.protocolNameLength)
        let allowed = name.utf8.allSatisfy { byte in
            (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39) || byte == 0x2D || byte == 0x5F || byte == 0x2E
        }
        if !allowed {
            throw FieldError("\(prefix).name", "must use only a-z, 0-9, '-', '_' and '.', got \(Validate.quoted(name))")
        }
        try Validate.range(port, field: "\(prefix).port", Limits.port)
    }
}

extension Desktop {
    /// Checks every field.
    public func validate() throws(FieldError) {
        try Validate.name(name, field: "name")
        try Validate.host(address, field: "address", required: true)
        if protocols.isEmpty {
            throw FieldError("protocols", "is required: at least one protocol with its port")
        }
        if protocols.count > Limits.protocolsPerDesktop.upperBound {
            throw FieldError("protocols", "must hold at most \(Limits.protocolsPerDesktop.upperBound) entries, got \(protocols.count)")
        }
        var seen = Set<String>()
        for (index, entry) in protocols.enumerated() {
            try entry.validate(index: index)
            if !seen.insert(entry.name).inserted {
                throw FieldError("protocols[\(index)].name", "\(Validate.quoted(entry.name)) appears twice")
            }
        }
        for (field, id) in [("gateway_id", gatewayID), ("load_balancer_id", loadBalancerID)] {
            if let id, id < 1 { throw FieldError(field, "must be a positive id, got \(id)") }
        }
        try Validate.notes(notes, field: "notes")
    }
}

extension User {
    /// Checks every field (the password is checked where it is hashed).
    public func validate() throws(FieldError) {
        try Validate.name(login, field: "login", length: Limits.loginLength)
        if login.first?.isWhitespace == true || login.last?.isWhitespace == true {
            throw FieldError("login", "must not begin or end with a blank")
        }
        try Validate.name(displayName, field: "display_name", length: 0...Limits.displayNameMaxLength)
    }
}
