import Foundation

/// `protocol` of a pushed rule.
public enum RuleProtocol: String, Codable, Sendable, CaseIterable {
    case tcp
    case udp
    case both = "tcp+udp"
}

/// The broker's `use_src_ip`, as the routing method of one rule.
public enum RoutingMethod: Int, Codable, Sendable, CaseIterable {
    /// A random free port of the gateway's range, open to anyone.
    case randomPort = 0
    /// The protocol's own port, open only to the client's address.
    case protocolPortClientOnly = 1
    /// A random free port, open only to the client's address.
    case randomPortClientOnly = 2
}

/// How a rule's traffic crosses the gateway (`forwarding_path`).
public enum ForwardingPath: String, Codable, Sendable, CaseIterable {
    /// The userspace relay: admission control, the allow-list and accounting per connection.
    case userspace
    /// nftables DNAT and masquerade in the gateway's own table: kernel speed, counters per rule.
    case kernel
    /// The userspace relay admits a client's first connection; the client's
    /// later connections and flows go through the kernel path.
    case offload
}

/// Bytes and packets the kernel path carried for a rule.
public struct KernelTraffic: Codable, Sendable, Equatable {
    /// New connections and UDP flows DNATed.
    public var flows: UInt64
    public var packets: UInt64
    public var bytes: UInt64
    /// Clients the rule's flows are offloaded for (`offload` rules).
    public var offloadedClients: Int

    enum CodingKeys: String, CodingKey {
        case flows, packets, bytes
        case offloadedClients = "offloaded_clients"
    }

    public init(flows: UInt64 = 0, packets: UInt64 = 0, bytes: UInt64 = 0, offloadedClients: Int = 0) {
        self.flows = flows
        self.packets = packets
        self.bytes = bytes
        self.offloadedClients = offloadedClients
    }
}

/// `PUT /control/v1/rules/{id}`: a rule the broker asks the gateway to open.
public struct RulePush: Codable, Sendable, Equatable {
    public var `protocol`: RuleProtocol
    public var method: RoutingMethod
    /// `HOST:PORT` of the desktop (numeric address).
    public var target: String
    /// Required for methods 1 and 2.
    public var clientIP: String?
    /// Required for method 1 (the protocol's own port), absent otherwise.
    public var port: Int?
    /// Removed when no connection used it within this many seconds of its creation.
    public var unusedExpirySeconds: Int?
    /// The path the rule's traffic takes; absent: the gateway's default.
    public var forwardingPath: ForwardingPath?

    public static let fields: Set<String> = ["protocol", "method", "target", "client_ip", "port", "unused_expiry_s", "forwarding_path"]

    enum CodingKeys: String, CodingKey {
        case `protocol`, method, target, port
        case clientIP = "client_ip"
        case unusedExpirySeconds = "unused_expiry_s"
        case forwardingPath = "forwarding_path"
    }

    public init(protocol: RuleProtocol, method: RoutingMethod, target: String, clientIP: String? = nil,
                port: Int? = nil, unusedExpirySeconds: Int? = nil, forwardingPath: ForwardingPath? = nil) {
        self.protocol = `protocol`
        self.method = method
        self.target = target
        self.clientIP = clientIP
        self.port = port
        self.unusedExpirySeconds = unusedExpirySeconds
        self.forwardingPath = forwardingPath
    }
}

/// The gateway's answer to a push, and one entry of `GET /control/v1/rules`.
public struct RuleState: Codable, Sendable, Equatable {
    public var id: String
    public var push: RulePush
    /// The public port the client must use.
    public var port: Int
    /// Unix seconds.
    public var created: Int64
    /// Unix seconds of the last connection or datagram, nil if never used.
    public var lastUsed: Int64?
    /// Live connections and UDP flows (of the userspace relay).
    public var sessions: Int
    /// `offload` rules: the clients (IPv4) whose traffic the kernel path carries.
    public var offloaded: [String]?
    /// What the kernel path carried (kernel and offload rules; not stored).
    public var kernel: KernelTraffic?

    enum CodingKeys: String, CodingKey {
        case id, push, port, created, sessions, offloaded, kernel
        case lastUsed = "last_used"
    }

    public init(id: String, push: RulePush, port: Int, created: Int64, lastUsed: Int64? = nil, sessions: Int = 0,
                offloaded: [String]? = nil, kernel: KernelTraffic? = nil) {
        self.id = id
        self.push = push
        self.port = port
        self.created = created
        self.lastUsed = lastUsed
        self.sessions = sessions
        self.offloaded = offloaded
        self.kernel = kernel
    }

    /// The path the rule's traffic takes (userspace when the push did not say).
    public var forwardingPath: ForwardingPath { push.forwardingPath ?? .userspace }
}

/// `POST /control/v1/rules`: many puts and deletes in one call (a broker's
/// burst). `{"put": [{"id": ID, ...the push's fields}], "delete": [ID]}`;
/// either list may be left out. Every put's fields are checked as strictly
/// as a single push's: an unknown one refuses the whole batch, naming
/// `put.N.field`.
public struct RuleBatch: Decodable, Sendable, Equatable {
    public struct Put: Decodable, Sendable, Equatable {
        public var id: String
        public var push: RulePush

        public init(id: String, push: RulePush) {
            self.id = id
            self.push = push
        }

        private enum IDKey: String, CodingKey { case id }

        public init(from decoder: any Decoder) throws {
            let keys = try decoder.container(keyedBy: AnyKey.self).allKeys.map(\.stringValue)
            if let unknown = keys.sorted().first(where: { $0 != "id" && !RulePush.fields.contains($0) }) {
                throw StrictRefusal.unknownField(ControlJSON.path(decoder.codingPath) + "." + unknown)
            }
            id = try decoder.container(keyedBy: IDKey.self).decode(String.self, forKey: .id)
            push = try RulePush(from: decoder)
        }
    }

    public var put: [Put]
    public var delete: [String]

    public static let fields: Set<String> = ["put", "delete"]
    /// Items in one batch, puts and deletes together.
    public static let maxItems = 256

    enum CodingKeys: String, CodingKey { case put, delete }

    public init(put: [Put] = [], delete: [String] = []) {
        self.put = put
        self.delete = delete
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        put = try container.decodeIfPresent([Put].self, forKey: .put) ?? []
        delete = try container.decodeIfPresent([String].self, forKey: .delete) ?? []
    }
}

/// Any key of a JSON object, to list them.
struct AnyKey: CodingKey {
    let stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

public struct PortRange: Codable, Sendable, Equatable {
    public var first: Int
    public var last: Int
    public init(first: Int, last: Int) {
        self.first = first
        self.last = last
    }
}

/// `POST /v1/gateway-agent/register`.
public struct RegisterRequest: Codable, Sendable, Equatable {
    public var gatewayID: Int
    public var version: String
    public var controlURL: String
    public var portRange: PortRange
    public var rules: [RuleState]
    /// The PEM certificate of an `https://` control endpoint: the broker
    /// trusts exactly this certificate for its pushes (the registration is
    /// signed with the control key, so nobody else can set it).
    public var controlCertificate: String?

    enum CodingKeys: String, CodingKey {
        case version, rules
        case gatewayID = "gateway_id"
        case controlURL = "control_url"
        case portRange = "port_range"
        case controlCertificate = "control_certificate"
    }

    public init(gatewayID: Int, version: String, controlURL: String, portRange: PortRange, rules: [RuleState],
                controlCertificate: String? = nil) {
        self.gatewayID = gatewayID
        self.version = version
        self.controlURL = controlURL
        self.portRange = portRange
        self.rules = rules
        self.controlCertificate = controlCertificate
    }
}

/// The broker's answer to a registration.
public struct RegisterResponse: Codable, Sendable, Equatable {
    public var heartbeatIntervalSeconds: Int
    public var offlineAfterSeconds: Int
    /// Ids of the gateway's rules the broker still wants; the others go.
    public var keep: [String]

    enum CodingKeys: String, CodingKey {
        case keep
        case heartbeatIntervalSeconds = "heartbeat_interval_s"
        case offlineAfterSeconds = "offline_after_s"
    }

    public init(heartbeatIntervalSeconds: Int, offlineAfterSeconds: Int, keep: [String]) {
        self.heartbeatIntervalSeconds = heartbeatIntervalSeconds
        self.offlineAfterSeconds = offlineAfterSeconds
        self.keep = keep
    }
}

/// `POST /v1/gateway-agent/heartbeat`.
public struct Heartbeat: Codable, Sendable, Equatable {
    public var gatewayID: Int
    public var sessions: Int
    public var rules: Int
    /// One-minute load average divided by the CPU count.
    public var load: Double

    enum CodingKeys: String, CodingKey {
        case sessions, rules, load
        case gatewayID = "gateway_id"
    }

    public init(gatewayID: Int, sessions: Int, rules: Int, load: Double) {
        self.gatewayID = gatewayID
        self.sessions = sessions
        self.rules = rules
        self.load = load
    }
}

/// JSON for control messages: snake_case keys as declared, strict decoding.
public enum ControlJSON {
    public static func encode<T: Encodable>(_ value: T) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        // Encoding these plain structs cannot fail.
        return [UInt8]((try? encoder.encode(value)) ?? Data("{}".utf8))
    }

    /// Decodes `bytes` as `T`, refusing a body that is not a JSON object, has
    /// a field outside `allowed`, or has a field of the wrong type.
    /// - Throws: `ControlMessageError` naming the field.
    /// A coding path as the errors name a field: `put.3.target`.
    static func path(_ codingPath: [any CodingKey]) -> String {
        codingPath.map { key in key.intValue.map(String.init) ?? key.stringValue }.joined(separator: ".")
    }

    public static func decodeStrict<T: Decodable>(_ type: T.Type, from bytes: [UInt8],
                                                  allowed: Set<String>) throws(ControlMessageError) -> T {
        // One parse: the keys are checked inside the decode (`Strict`), not
        // by a JSONSerialization pass before it (issue 15: 4 % of a push).
        let decoder = JSONDecoder()
        decoder.userInfo[Strict<T>.allowedKey] = allowed
        do {
            return try decoder.decode(Strict<T>.self, from: Data(bytes)).value
        } catch let refusal as StrictRefusal {
            switch refusal {
            case .notAnObject: throw .malformed("the body must be a JSON object")
            case .unknownField(let name): throw .unknownField(name)
            }
        } catch let DecodingError.typeMismatch(_, context) {
            throw .wrongType(path(context.codingPath))
        } catch let DecodingError.valueNotFound(_, context) {
            throw .wrongType(path(context.codingPath))
        } catch let DecodingError.keyNotFound(key, context) {
            throw .missingField(path(context.codingPath + [key]))
        } catch let DecodingError.dataCorrupted(context) {
            let field = path(context.codingPath)
            throw field.isEmpty ? .malformed("the body is not valid JSON") : .wrongType(field)
        } catch {
            throw .malformed("\(error)")
        }
    }
}

/// What `Strict` refuses before the value is decoded.
private enum StrictRefusal: Error {
    case notAnObject
    case unknownField(String)
}

/// `T` from a JSON object whose every key is one of `allowed` (the
/// decoder's user info): the keys are read from the same parse as the value.
private struct Strict<T: Decodable>: Decodable {
    static var allowedKey: CodingUserInfoKey { CodingUserInfoKey(rawValue: "ControlJSON.allowed")! }

    let value: T

    init(from decoder: any Decoder) throws {
        let keys: [String]
        do { keys = try decoder.container(keyedBy: AnyKey.self).allKeys.map(\.stringValue) } catch {
            throw StrictRefusal.notAnObject
        }
        let allowed = decoder.userInfo[Self.allowedKey] as? Set<String> ?? []
        if let unknown = keys.sorted().first(where: { !allowed.contains($0) }) { throw StrictRefusal.unknownField(unknown) }
        value = try T(from: decoder)
    }
}

public enum ControlMessageError: Error, Equatable, CustomStringConvertible {
    case malformed(String)
    case unknownField(String)
    case missingField(String)
    case wrongType(String)
    case invalid(field: String, reason: String)

    public var field: String? {
        switch self {
        case .malformed: nil
        case .unknownField(let f), .missingField(let f), .wrongType(let f): f
        case .invalid(let f, _): f
        }
    }

    public var description: String {
        switch self {
        case .malformed(let why): why
        case .unknownField(let f): "\(f): unknown field"
        case .missingField(let f): "\(f): required"
        case .wrongType(let f): "\(f): wrong type or value"
        case .invalid(let f, let why): "\(f): \(why)"
        }
    }
}

/// The JSON texts every push writes, straight to bytes: the push itself (the
/// broker), the rule's journal record and the answer (the gateway). They are the exact bytes `ControlJSON.encode`
/// (JSONEncoder, sorted keys) writes for the same values (tested), at a
/// fraction of the cost: JSONEncoder was 9 % of the gateway's CPU per rule
/// operation (issue 15).
extension ControlJSON {
    /// `encode(rule)`.
    public static func encodeRule(_ rule: RuleState) -> [UInt8] {
        var object = ObjectWriter(capacity: 192)
        object.int("created", rule.created)
        object.string("id", rule.id)
        if let kernel = rule.kernel {
            object.object("kernel") { traffic in
                traffic.int("bytes", kernel.bytes)
                traffic.int("flows", kernel.flows)
                traffic.int("offloaded_clients", kernel.offloadedClients)
                traffic.int("packets", kernel.packets)
            }
        }
        if let lastUsed = rule.lastUsed { object.int("last_used", lastUsed) }
        if let offloaded = rule.offloaded {
            object.raw("offloaded") { out in
                out.append(UInt8(ascii: "["))
                for (index, client) in offloaded.enumerated() {
                    if index > 0 { out.append(UInt8(ascii: ",")) }
                    appendString(client, to: &out)
                }
                out.append(UInt8(ascii: "]"))
            }
        }
        object.int("port", rule.port)
        object.object("push") { fields in writePush(rule.push, to: &fields) }
        object.int("sessions", rule.sessions)
        return object.finish()
    }

    /// `encode(push)`: the body of a push, and how the broker stores it.
    public static func encodePush(_ push: RulePush) -> [UInt8] {
        var object = ObjectWriter(capacity: 128)
        writePush(push, to: &object)
        return object.finish()
    }

    private static func writePush(_ push: RulePush, to fields: inout ObjectWriter) {
        if let client = push.clientIP { fields.string("client_ip", client) }
        if let path = push.forwardingPath { fields.string("forwarding_path", path.rawValue) }
        fields.int("method", push.method.rawValue)
        if let port = push.port { fields.int("port", port) }
        fields.string("protocol", push.protocol.rawValue)
        fields.string("target", push.target)
        if let expiry = push.unusedExpirySeconds { fields.int("unused_expiry_s", expiry) }
    }

    /// `encode(["delete": id])`: a removal's journal record.
    public static func encodeDelete(_ id: String) -> [UInt8] {
        var object = ObjectWriter(capacity: 64)
        object.string("delete", id)
        return object.finish()
    }

    /// `{"id":…,"listen":…,"port":…}`: the answer to a push.
    public static func encodePutAnswer(id: String, port: Int, listen: String) -> [UInt8] {
        var object = ObjectWriter(capacity: 64)
        object.string("id", id)
        object.string("listen", listen)
        object.int("port", port)
        return object.finish()
    }

    /// A batch (`POST /control/v1/rules`): `{"delete": [ids], "put": [{"id": ..., push fields}]}`,
    /// each put's fields as `encodePush` writes them, after its id.
    public static func encodeBatch(put: [(id: String, push: RulePush)], delete: [String]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(32 + 200 * put.count + 40 * delete.count)
        out.append(contentsOf: Array("{\"delete\":[".utf8))
        for (i, id) in delete.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            appendString(id, to: &out)
        }
        out.append(contentsOf: Array("],\"put\":[".utf8))
        for (i, item) in put.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            out.append(contentsOf: Array("{\"id\":".utf8))
            appendString(item.id, to: &out)
            let push = encodePush(item.push)
            // The push's own object without its opening brace, after the id.
            if push.count > 2 { out.append(UInt8(ascii: ",")) }
            out.append(contentsOf: push.dropFirst())
        }
        out.append(contentsOf: Array("]}".utf8))
        return out
    }

    /// One item of a batch's answer: its id and the status it would have
    /// had alone, with the port and listen address of a put in effect, or
    /// the error (and the field it names) of a refusal.
    public struct BatchItemAnswer: Sendable, Equatable {
        public var id: String
        public var status: Int
        public var port: Int?
        public var listen: String?
        public var error: String?
        public var field: String?

        public init(id: String, status: Int, port: Int? = nil, listen: String? = nil, error: String? = nil, field: String? = nil) {
            self.id = id
            self.status = status
            self.port = port
            self.listen = listen
            self.error = error
            self.field = field
        }
    }

    /// `{"delete": [...], "put": [...]}`, each item's keys sorted.
    public static func encodeBatchAnswer(put: [BatchItemAnswer], delete: [BatchItemAnswer]) -> [UInt8] {
        func list(_ items: [BatchItemAnswer], into out: inout [UInt8]) {
            out.append(UInt8(ascii: "["))
            for (i, item) in items.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                var object = ObjectWriter(capacity: 96)
                if let error = item.error { object.string("error", error) }
                if let field = item.field { object.string("field", field) }
                object.string("id", item.id)
                if let listen = item.listen { object.string("listen", listen) }
                if let port = item.port { object.int("port", port) }
                object.int("status", item.status)
                out.append(contentsOf: object.finish())
            }
            out.append(UInt8(ascii: "]"))
        }
        var object = ObjectWriter(capacity: 64 + 96 * (put.count + delete.count))
        object.raw("delete") { list(delete, into: &$0) }
        object.raw("put") { list(put, into: &$0) }
        return object.finish()
    }

    /// An object's fields, written in the order given (the callers give
    /// them sorted, as `.sortedKeys` does).
    struct ObjectWriter {
        private var out: [UInt8] = []
        private var first = true

        init(capacity: Int) {
            out.reserveCapacity(capacity)
            out.append(UInt8(ascii: "{"))
        }

        private mutating func key(_ name: StaticString) {
            if !first { out.append(UInt8(ascii: ",")) }
            first = false
            out.append(UInt8(ascii: "\""))
            name.withUTF8Buffer { out.append(contentsOf: $0) }
            out.append(contentsOf: [UInt8(ascii: "\""), UInt8(ascii: ":")])
        }

        mutating func string(_ name: StaticString, _ value: String) {
            key(name)
            ControlJSON.appendString(value, to: &out)
        }

        mutating func int(_ name: StaticString, _ value: some BinaryInteger) {
            key(name)
            out.append(contentsOf: String(value).utf8)
        }

        /// A value written by `write` as it is (an array).
        mutating func raw(_ name: StaticString, _ write: (inout [UInt8]) -> Void) {
            key(name)
            write(&out)
        }

        /// A nested object: `body` writes its fields with this same writer.
        mutating func object(_ name: StaticString, _ body: (inout ObjectWriter) -> Void) {
            key(name)
            out.append(UInt8(ascii: "{"))
            first = true
            body(&self)
            out.append(UInt8(ascii: "}"))
            first = false
        }

        consuming func finish() -> [UInt8] {
            out.append(UInt8(ascii: "}"))
            return out
        }
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)

    /// `text` as JSONEncoder writes a string: `"`, `\` and `/` escaped with
    /// a backslash (`/` not with `escapingSlashes` false, as
    /// `.withoutEscapingSlashes`); \b \f \n \r \t; other control characters
    /// as \u00XX; everything else as its UTF-8 bytes.
    public static func appendString(_ text: String, to out: inout [UInt8], escapingSlashes: Bool = true) {
        out.append(UInt8(ascii: "\""))
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "/") where !escapingSlashes: out.append(byte)
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(contentsOf: [UInt8(ascii: "\\"), byte])
            case 0x08: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "b")])
            case 0x0C: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "f")])
            case 0x0A: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "t")])
            case 0..<0x20:
                out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"),
                                        hexDigits[Int(byte >> 4)], hexDigits[Int(byte & 0x0F)]])
            default: out.append(byte)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}
