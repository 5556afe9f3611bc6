import BrokerCore

// The JSON forms of the domain, field by field as LEOSTREAM-REST.md names them
// (gateways, clusters), and in the same style for the product's own calls.

extension Gateway {
    static let writableFields: Set<String> = [
        "name", "address", "address_private", "load_balancer_id", "use_src_ip", "forward_to", "signature", "notes",
        "forwarding_path",
    ]
    static let readOnlyFields: Set<String> = ["id", "online", "version", "created", "updated"]

    var json: JSONValue {
        .object([
            "id": .int(id),
            "name": .string(name),
            "address": .string(address),
            "address_private": .string(addressPrivate),
            "load_balancer_id": .optional(loadBalancerID),
            "use_src_ip": .int(Int64(useSourceIP.rawValue)),
            "forward_to": .string(forwardTo),
            "signature": .string(signature),
            "notes": .string(notes),
            "forwarding_path": .string(forwardingPath.rawValue),
            "online": .bool(online),
            "version": .string(version),
            "created": .date(created),
            "updated": .date(updated),
        ])
    }

    /// The changes a body asks for; absent fields stay as they are.
    static func changes(from reader: FieldReader) throws(APIError) -> GatewayChanges {
        var changes = GatewayChanges()
        changes.name = try reader.string("name")
        changes.address = try reader.string("address")
        changes.addressPrivate = try reader.string("address_private", nullAs: "")
        changes.loadBalancerID = try reader.reference("load_balancer_id")
        if let mode = try reader.int("use_src_ip") {
            changes.useSourceIP = try validating { () throws(FieldError) in try SourceIPMode.parse(mode) }
        }
        changes.forwardTo = try reader.string("forward_to", nullAs: "")
        changes.signature = try reader.string("signature", nullAs: "")
        changes.notes = try reader.string("notes", nullAs: "")
        if let path = try reader.string("forwarding_path", nullAs: "") {
            changes.forwardingPath = try validating { () throws(FieldError) in try GatewayForwarding.parse(path) }
        }
        return changes
    }
}

extension GatewayCluster {
    static let writableFields: Set<String> = ["name", "address", "load_balance_via", "use_src_ip", "notes"]
    static let readOnlyFields: Set<String> = ["id", "created", "updated"]

    var json: JSONValue {
        .object([
            "id": .int(id),
            "name": .string(name),
            "address": .string(address),
            "load_balance_via": .string(loadBalanceVia.rawValue),
            "use_src_ip": .int(Int64(useSourceIP.rawValue)),
            "notes": .string(notes),
            "created": .date(created),
            "updated": .date(updated),
        ])
    }

    static func changes(from reader: FieldReader) throws(APIError) -> GatewayClusterChanges {
        var changes = GatewayClusterChanges()
        changes.name = try reader.string("name")
        changes.address = try reader.string("address", nullAs: "")
        if let method = try reader.string("load_balance_via") {
            changes.loadBalanceVia = try validating { () throws(FieldError) in try LoadBalanceMethod.parse(method) }
        }
        if let mode = try reader.int("use_src_ip") {
            changes.useSourceIP = try validating { () throws(FieldError) in try SourceIPMode.parse(mode) }
        }
        changes.notes = try reader.string("notes", nullAs: "")
        return changes
    }
}

extension Desktop {
    static let writableFields: Set<String> = ["name", "address", "protocols", "gateway_id", "load_balancer_id", "notes", "users"]
    static let readOnlyFields: Set<String> = ["id", "created", "updated"]
    static let protocolFields: Set<String> = ["name", "port", "transport"]

    var json: JSONValue {
        .object([
            "id": .int(id),
            "name": .string(name),
            "address": .string(address),
            "protocols": .array(protocols.map { entry in
                .object(["name": .string(entry.name), "port": .int(Int64(entry.port)),
                         "transport": .string(entry.transport.rawValue)])
            }),
            "gateway_id": .optional(gatewayID),
            "load_balancer_id": .optional(loadBalancerID),
            "notes": .string(notes),
            "users": .array(users.map { .int($0) }),
            "created": .date(created),
            "updated": .date(updated),
        ])
    }

    static func changes(from reader: FieldReader) throws(APIError) -> DesktopChanges {
        var changes = DesktopChanges()
        changes.name = try reader.string("name")
        changes.address = try reader.string("address")
        if let entries = try reader.array("protocols") {
            var protocols: [DesktopProtocol] = []
            for (index, entry) in entries.enumerated() {
                let item = try FieldReader(entry, known: protocolFields, policy: .strict, path: "protocols[\(index)]")
                guard let name = try item.string("name") else {
                    throw APIError.badField(item.qualified("name"), "is required (for example rdp, ssh, nomachine)")
                }
                guard let port = try item.int("port") else {
                    throw APIError.badField(item.qualified("port"), "is required (1 to 65535)")
                }
                var transport = Transport.tcp
                if let text = try item.string("transport") {
                    transport = try validating { () throws(FieldError) in try Transport.parse(text, field: item.qualified("transport")) }
                }
                protocols.append(DesktopProtocol(name: name, port: port, transport: transport))
            }
            changes.protocols = protocols
        }
        changes.gatewayID = try reader.reference("gateway_id")
        changes.loadBalancerID = try reader.reference("load_balancer_id")
        changes.notes = try reader.string("notes", nullAs: "")
        if let entries = try reader.array("users") {
            var users: [Int64] = []
            for (index, entry) in entries.enumerated() {
                guard case .int(let id) = entry, id > 0 else {
                    throw APIError.badField("users[\(index)]", "must be a user id (a positive whole number)")
                }
                users.append(id)
            }
            changes.users = users
        }
        return changes
    }
}

extension User {
    static let writableFields: Set<String> = ["login", "password", "display_name", "role", "enabled"]
    static let readOnlyFields: Set<String> = ["id", "created", "updated"]

    var json: JSONValue {
        .object([
            "id": .int(id),
            "login": .string(login),
            "display_name": .string(displayName),
            "role": .string(role.rawValue),
            "enabled": .bool(enabled),
            "created": .date(created),
            "updated": .date(updated),
        ])
    }

    /// The changes a body asks for, with the password checked but not yet hashed.
    static func changes(from reader: FieldReader) throws(APIError) -> (UserChanges, password: String?) {
        var changes = UserChanges()
        changes.login = try reader.string("login")
        let password = try reader.string("password")
        if let password {
            try validating { () throws(FieldError) in try Validate.password(password) }
        }
        changes.displayName = try reader.string("display_name", nullAs: "")
        if let role = try reader.string("role") {
            changes.role = try validating { () throws(FieldError) in try UserRole.parse(role) }
        }
        changes.enabled = try reader.bool("enabled")
        return (changes, password)
    }
}
