/// The PCoIP broker protocol's messages (docs/PCOIP-BROKER-PROTOCOL.md):
/// XML bodies of `POST /pcoip-broker/xml`. Requests come under the root
/// `pcoip-client`, answers go under `pcoip-broker`, each with `version="2.1"`.
/// Pure: no I/O, no Foundation.
public enum PCoIPBroker {
    public static let path = "/pcoip-broker/xml"
    public static let version = "2.1"
    public static let requestRoot = "pcoip-client"
    public static let answerRoot = "pcoip-broker"
    public static let cookieName = "JSESSIONID"
    public static let clientLogIDHeader = "Client-Log-Id"
    public static let contentType = "application/xml; charset=UTF-8"
    /// The protocol's own port: clients connect to agents (and gateways) on it.
    public static let pcoipPort = 4172
}

/// A request from a client (or relayed by a Connection Manager).
public enum BrokerRequest: Sendable, Equatable {
    case hello(Hello)
    case authenticate(Authenticate)
    case getResourceList(ResourceListQuery)
    case allocateResource(Allocation)
    case bye

    public struct Hello: Sendable, Equatable {
        public var productName: String
        public var productVersion: String
        public var platform: String
        public var locale: String
        public var hostname: String

        public init(productName: String, productVersion: String = "", platform: String = "", locale: String = "en_US",
                    hostname: String = "") {
            self.productName = productName
            self.productVersion = productVersion
            self.platform = platform
            self.locale = locale
            self.hostname = hostname
        }
    }

    public struct Authenticate: Sendable, Equatable, CustomStringConvertible {
        public var method: String
        public var username: String
        public var password: String
        public var domain: String

        public init(method: String = "password", username: String, password: String, domain: String = "") {
            self.method = method
            self.username = username
            self.password = password
            self.domain = domain
        }

        /// Never shows the password.
        public var description: String { "authenticate(\(method), user \(username), domain \(domain))" }
    }

    public struct ResourceListQuery: Sendable, Equatable {
        public var resourceType: String
        public var resourceProtocol: String

        public init(resourceType: String = "DESKTOP", resourceProtocol: String = "PCOIP") {
            self.resourceType = resourceType
            self.resourceProtocol = resourceProtocol
        }
    }

    public struct Allocation: Sendable, Equatable {
        public var resourceID: String
        public var resourceType: String
        public var resourceProtocol: String
        /// The client's idea of where it is (passed through; may be empty).
        public var clientLocation: String

        public init(resourceID: String, resourceType: String = "DESKTOP", resourceProtocol: String = "PCOIP",
                    clientLocation: String = "") {
            self.resourceID = resourceID
            self.resourceType = resourceType
            self.resourceProtocol = resourceProtocol
            self.clientLocation = clientLocation
        }
    }

    /// The message's element name (`hello`, `authenticate`, ...).
    public var kind: BrokerMessageKind {
        switch self {
        case .hello: .hello
        case .authenticate: .authenticate
        case .getResourceList: .getResourceList
        case .allocateResource: .allocateResource
        case .bye: .bye
        }
    }

    /// Reads a request document.
    /// - Throws: `BrokerProtocolError` naming what is wrong (root, version,
    ///   message, missing field); a `BrokerXML.ParseError` as `.malformed`.
    public static func parse(_ bytes: some Collection<UInt8>, limits: BrokerXML.Limits = .standard) throws(BrokerProtocolError) -> BrokerRequest {
        let root: BrokerXML.Element
        do throws(BrokerXML.ParseError) {
            root = try BrokerXML.parse(bytes, limits: limits)
        } catch {
            throw .malformed(error.description)
        }
        return try parse(root)
    }

    public static func parse(_ root: BrokerXML.Element) throws(BrokerProtocolError) -> BrokerRequest {
        guard root.name == PCoIPBroker.requestRoot else {
            throw .invalid("the root element is <\(root.name)>, not <\(PCoIPBroker.requestRoot)>")
        }
        guard let version = root.attribute("version"), !version.isEmpty else {
            throw .invalid("<\(PCoIPBroker.requestRoot)> has no version attribute")
        }
        guard version.hasPrefix("1.") || version.hasPrefix("2.") else {
            throw .invalid("protocol version \(version) is not supported (1.x and 2.x are)")
        }
        guard root.children.count == 1, let message = root.children.first else {
            throw .invalid("<\(PCoIPBroker.requestRoot)> must hold exactly one message, it holds \(root.children.count)")
        }
        guard let kind = BrokerMessageKind(rawValue: message.name) else {
            throw .unknownMessage(message.name)
        }
        func required(_ name: String, in element: BrokerXML.Element) throws(BrokerProtocolError) -> String {
            guard let value = element.childText(name), !value.isEmpty else { throw .missing("\(element.name)/\(name)") }
            return value
        }
        switch kind {
        case .hello:
            let info = message.child("client-info") ?? BrokerXML.Element("client-info")
            return .hello(Hello(productName: info.childText("product-name") ?? "", productVersion: info.childText("product-version") ?? "",
                                platform: info.childText("platform") ?? "", locale: info.childText("locale") ?? "",
                                hostname: info.childText("hostname") ?? ""))
        case .authenticate:
            let method = message.attribute("method") ?? "password"
            guard method == "password" else { throw .invalid("authentication method \(method) is not supported (password is)") }
            let username = try required("username", in: message)
            // A password may legitimately be empty only if the broker says so; it must be present.
            guard let password = message.child("password")?.text else { throw .missing("authenticate/password") }
            return .authenticate(Authenticate(method: method, username: username, password: password,
                                              domain: message.childText("domain") ?? ""))
        case .getResourceList:
            return .getResourceList(ResourceListQuery(resourceType: message.childText("resource-type") ?? "DESKTOP",
                                                      resourceProtocol: message.childText("resource-protocol") ?? "PCOIP"))
        case .allocateResource:
            return .allocateResource(Allocation(resourceID: try required("resource-id", in: message),
                                                resourceType: message.childText("resource-type") ?? "DESKTOP",
                                                resourceProtocol: message.childText("resource-protocol") ?? "PCOIP",
                                                clientLocation: message.childText("client-location") ?? ""))
        case .bye:
            return .bye
        }
    }

    /// The request as a document (a client, or tests).
    public var document: BrokerXML.Element {
        let message: BrokerXML.Element
        switch self {
        case .hello(let hello):
            message = BrokerXML.Element("hello", children: [
                BrokerXML.Element("client-info", children: [
                    .leaf("product-name", hello.productName), .leaf("product-version", hello.productVersion),
                    .leaf("platform", hello.platform), .leaf("locale", hello.locale), .leaf("hostname", hello.hostname),
                ]),
            ])
        case .authenticate(let auth):
            message = BrokerXML.Element("authenticate", attributes: [.init("method", auth.method)], children: [
                .leaf("username", auth.username), .leaf("password", auth.password), .leaf("domain", auth.domain),
            ])
        case .getResourceList(let query):
            message = BrokerXML.Element("get-resource-list", children: [
                .leaf("resource-type", query.resourceType), .leaf("resource-protocol", query.resourceProtocol),
            ])
        case .allocateResource(let allocation):
            message = BrokerXML.Element("allocate-resource", children: [
                .leaf("resource-id", allocation.resourceID), .leaf("resource-type", allocation.resourceType),
                .leaf("resource-protocol", allocation.resourceProtocol), .leaf("client-location", allocation.clientLocation),
            ])
        case .bye:
            message = BrokerXML.Element("bye")
        }
        return BrokerXML.Element(PCoIPBroker.requestRoot, attributes: [.init("version", PCoIPBroker.version)], children: [message])
    }
}

/// The five messages a client sends.
public enum BrokerMessageKind: String, Sendable, CaseIterable {
    case hello
    case authenticate
    case getResourceList = "get-resource-list"
    case allocateResource = "allocate-resource"
    case bye

    /// The answer's element name.
    public var answerName: String { rawValue + "-resp" }
}

/// Why a request document was refused.
public enum BrokerProtocolError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Not well-formed XML, or beyond the limits.
    case malformed(String)
    /// Well-formed, but not a request of this protocol.
    case invalid(String)
    case unknownMessage(String)
    /// A required element is missing or empty (its path).
    case missing(String)

    public var description: String {
        switch self {
        case .malformed(let why): why
        case .invalid(let why): why
        case .unknownMessage(let name): "<\(name)> is not a message of the PCoIP broker protocol"
        case .missing(let path): "\(path) is missing or empty"
        }
    }
}

/// The result codes of answers (`<result><result-id>`).
public enum BrokerResult: String, Sendable, CaseIterable {
    case authSuccessful = "AUTH_SUCCESSFUL_AND_COMPLETE"
    case authFailedCredentials = "AUTH_FAILED_UNKNOWN_USERNAME_OR_PASSWORD"
    case authFailedDisabled = "AUTH_FAILED_ACCOUNT_DISABLED"
    case authFailedSequence = "AUTH_FAILED_INVALID_SEQUENCE"
    case authFailedBusy = "AUTH_FAILED_SERVER_BUSY"
    case authFailedBroker = "AUTH_FAILED_BROKER_UNAVAILABLE"
    case listSuccessful = "LIST_SUCCESSFUL"
    case listFailedNotAuthenticated = "LIST_FAILED_NOT_AUTHENTICATED"
    case listFailedBusy = "LIST_FAILED_SERVER_BUSY"
    case listFailedBroker = "LIST_FAILED_BROKER_UNAVAILABLE"
    case allocSuccessful = "ALLOC_SUCCESSFUL"
    case allocFailedNotAuthenticated = "ALLOC_FAILED_NOT_AUTHENTICATED"
    case allocFailedUnknownResource = "ALLOC_FAILED_UNKNOWN_RESOURCE"
    case allocFailedNoGateway = "ALLOC_FAILED_NO_SECURITY_GATEWAY"
    case allocFailedBusy = "ALLOC_FAILED_TOO_MANY_SESSION_ESTABLISHMENTS"
    case allocFailedBroker = "ALLOC_FAILED_BROKER_UNAVAILABLE"
    case allocFailed = "ALLOC_FAILED"
    case errorMalformed = "ERROR_MALFORMED_REQUEST"
    case errorBusy = "ERROR_SERVER_BUSY"
    case errorBroker = "ERROR_BROKER_UNAVAILABLE"

    public var succeeded: Bool { self == .authSuccessful || self == .listSuccessful || self == .allocSuccessful }
}

/// A resource (desktop) in a `get-resource-list-resp`.
public struct BrokerResource: Sendable, Equatable {
    public var name: String
    public var id: String
    public var sessionType: String
    public var state: String

    public init(name: String, id: String, sessionType: String = "VDI", state: String = "UNKNOWN") {
        self.name = name
        self.id = id
        self.sessionType = sessionType
        self.state = state
    }
}

/// Where a client connects for an allocated session (`<target>`).
public struct BrokerTarget: Sendable, Equatable {
    public var ipAddress: String
    public var hostname: String
    public var sni: String
    public var port: Int
    public var sessionID: String
    public var connectTag: String

    public init(ipAddress: String, hostname: String, sni: String, port: Int, sessionID: String, connectTag: String) {
        self.ipAddress = ipAddress
        self.hostname = hostname
        self.sni = sni
        self.port = port
        self.sessionID = sessionID
        self.connectTag = connectTag
    }

    var element: BrokerXML.Element {
        BrokerXML.Element("target", children: [
            .leaf("ip-address", ipAddress), .leaf("hostname", hostname), .leaf("sni", sni), .leaf("port", String(port)),
            .leaf("session-id", sessionID), .leaf("connect-tag", connectTag),
        ])
    }

    /// Reads a `<target>` element.
    /// - Throws: `.missing` naming the first field that is absent or not a port.
    public init(_ element: BrokerXML.Element) throws(BrokerProtocolError) {
        guard let ip = element.childText("ip-address"), !ip.isEmpty else { throw .missing("target/ip-address") }
        guard let portText = element.childText("port"), let port = Int(portText), (1...65535).contains(port) else {
            throw .missing("target/port")
        }
        guard let sni = element.childText("sni"), !sni.isEmpty else { throw .missing("target/sni") }
        self.init(ipAddress: ip, hostname: element.childText("hostname") ?? "", sni: sni, port: port,
                  sessionID: element.childText("session-id") ?? "", connectTag: element.childText("connect-tag") ?? "")
    }
}

/// Builders for the answers this package writes (the broker core, and the
/// Connection Manager's own failures).
public enum BrokerAnswer {
    public static func document(_ message: BrokerXML.Element) -> BrokerXML.Element {
        BrokerXML.Element(PCoIPBroker.answerRoot, attributes: [.init("version", PCoIPBroker.version)], children: [message])
    }

    static func result(_ id: BrokerResult, _ text: String) -> BrokerXML.Element {
        BrokerXML.Element("result", children: [.leaf("result-id", id.rawValue), .leaf("result-str", text)])
    }

    public struct BrokerInfo: Sendable, Equatable {
        public var productName: String
        public var productVersion: String
        public var platform: String
        public var locale: String
        public var ipAddress: String
        public var hostname: String

        public init(productName: String, productVersion: String, platform: String = "linux", locale: String = "en_US",
                    ipAddress: String = "", hostname: String = "") {
            self.productName = productName
            self.productVersion = productVersion
            self.platform = platform
            self.locale = locale
            self.ipAddress = ipAddress
            self.hostname = hostname
        }
    }

    public static func hello(_ info: BrokerInfo, domains: [String]) -> BrokerXML.Element {
        document(BrokerXML.Element("hello-resp", children: [
            BrokerXML.Element("brokers-info", children: [
                BrokerXML.Element("broker-info", children: [
                    .leaf("product-name", info.productName), .leaf("product-version", info.productVersion),
                    .leaf("platform", info.platform), .leaf("locale", info.locale),
                    .leaf("ip-address", info.ipAddress), .leaf("hostname", info.hostname),
                ]),
            ]),
            BrokerXML.Element("next-authentication", children: [
                BrokerXML.Element("authentication-methods", children: [.leaf("method", "AUTHENTICATE_VIA_PASSWORD")]),
                BrokerXML.Element("domains", children: domains.map { .leaf("domain", $0) }),
            ]),
        ]))
    }

    public static func authenticate(_ id: BrokerResult, _ text: String) -> BrokerXML.Element {
        document(BrokerXML.Element("authenticate-resp", attributes: [.init("method", "password")], children: [result(id, text)]))
    }

    public static func resourceList(_ resources: [BrokerResource]) -> BrokerXML.Element {
        var children = [result(.listSuccessful, "\(resources.count) resource(s)")]
        for resource in resources {
            children.append(BrokerXML.Element("resource", children: [
                .leaf("resource-name", resource.name), .leaf("resource-id", resource.id),
                .leaf("resource-type", "DESKTOP", attributes: [.init("session-type", resource.sessionType)]),
                .leaf("resource-state", resource.state),
                BrokerXML.Element("protocols", children: [.leaf("protocol", "PCOIP", attributes: [.init("is-default", "true")])]),
            ]))
        }
        return document(BrokerXML.Element("get-resource-list-resp", children: children))
    }

    public static func resourceListFailure(_ id: BrokerResult, _ text: String) -> BrokerXML.Element {
        document(BrokerXML.Element("get-resource-list-resp", children: [result(id, text)]))
    }

    public static func allocated(_ target: BrokerTarget, resourceID: String) -> BrokerXML.Element {
        document(BrokerXML.Element("allocate-resource-resp", children: [
            result(.allocSuccessful, "the resource is allocated"), target.element,
            .leaf("resource-id", resourceID), .leaf("protocol", "PCOIP"),
        ]))
    }

    public static func allocationFailure(_ id: BrokerResult, _ text: String) -> BrokerXML.Element {
        document(BrokerXML.Element("allocate-resource-resp", children: [result(id, text)]))
    }

    public static func bye() -> BrokerXML.Element {
        document(BrokerXML.Element("bye-resp"))
    }

    /// For a request that cannot be answered in its own terms (malformed, or
    /// refused before it was read).
    public static func error(_ id: BrokerResult, _ text: String) -> BrokerXML.Element {
        document(BrokerXML.Element("error-resp", children: [result(id, text)]))
    }

    /// The failure answer for a message of `kind` (`error-resp` for hello and bye).
    public static func failure(for kind: BrokerMessageKind?, _ id: (auth: BrokerResult, list: BrokerResult, alloc: BrokerResult, other: BrokerResult),
                               _ text: String) -> BrokerXML.Element {
        switch kind {
        case .authenticate?: authenticate(id.auth, text)
        case .getResourceList?: resourceListFailure(id.list, text)
        case .allocateResource?: allocationFailure(id.alloc, text)
        default: error(id.other, text)
        }
    }
}

/// Reading an answer (the Connection Manager reads the broker's; test clients read any).
public struct BrokerAnswerView: Sendable, Equatable {
    public let root: BrokerXML.Element
    /// The message element (`hello-resp`, `allocate-resource-resp`, ...).
    public let message: BrokerXML.Element

    /// - Throws: `.invalid` when the document is not an answer of this protocol.
    public init(_ root: BrokerXML.Element) throws(BrokerProtocolError) {
        guard root.name == PCoIPBroker.answerRoot || root.name == PCoIPBroker.requestRoot else {
            throw .invalid("the answer's root element is <\(root.name)>, not <\(PCoIPBroker.answerRoot)>")
        }
        guard root.children.count == 1, let message = root.children.first else {
            throw .invalid("the answer must hold exactly one message, it holds \(root.children.count)")
        }
        self.root = root
        self.message = message
    }

    /// The result code, when the message has one.
    public var resultID: String? { message.child("result")?.childText("result-id") }
    public var resultText: String? { message.child("result")?.childText("result-str") }

    /// Whether the message reports success (`*_SUCCESSFUL*`), or has no result at all (hello, bye).
    public var succeeded: Bool {
        guard let id = resultID else { return message.name != "error-resp" }
        return id.hasSuffix("_SUCCESSFUL") || id.hasSuffix("_SUCCESSFUL_AND_COMPLETE")
    }

    /// The target of a successful allocation.
    public func target() throws(BrokerProtocolError) -> BrokerTarget {
        guard let element = message.child("target") else { throw .missing("allocate-resource-resp/target") }
        return try BrokerTarget(element)
    }

    /// The same answer with the allocation's target address and port
    /// replaced (the Connection Manager sends the client through a Security
    /// Gateway), keeping every other field, and the ordered list of
    /// gateways a client may fail over to.
    public func redirected(to address: String, port: Int, alternates: [(address: String, port: Int)]) -> BrokerXML.Element {
        guard var target = message.child("target") else { return root }
        target = target.replacing("ip-address", with: .leaf("ip-address", address))
            .replacing("port", with: .leaf("port", String(port)))
        var rewritten = message.replacing("target", with: target)
        if !alternates.isEmpty {
            rewritten = rewritten.replacing("alternate-targets", with: BrokerXML.Element("alternate-targets", children: alternates.map {
                BrokerXML.Element("alternate-target", children: [.leaf("ip-address", $0.address), .leaf("port", String($0.port))])
            }))
        }
        var root = self.root
        root.children = [rewritten]
        return root
    }
}
