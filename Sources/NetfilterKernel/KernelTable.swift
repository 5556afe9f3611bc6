import CNetfilter
import Glibc
import SystemLayer

/// One port forward as the kernel path holds it: traffic to
/// `publicAddress`:`port` over `transport` (from `client` only, when set)
/// is DNATed to `target` and masqueraded on its way there, so replies come
/// back through the gateway. IPv4 only.
public struct KernelForward: Sendable, Hashable, CustomStringConvertible {
    public enum Transport: UInt8, Sendable, Hashable, CaseIterable {
        case tcp = 6
        case udp = 17

        public var name: String { self == .tcp ? "tcp" : "udp" }
    }

    public var client: IPAddress?
    public var publicAddress: IPAddress
    public var transport: Transport
    public var port: UInt16
    public var target: SocketAddress

    public init(client: IPAddress?, publicAddress: IPAddress, transport: Transport, port: UInt16, target: SocketAddress) {
        self.client = client
        self.publicAddress = publicAddress
        self.transport = transport
        self.port = port
        self.target = target
    }

    public var description: String {
        "\(client.map { "from \($0) " } ?? "")\(transport.name) \(publicAddress):\(port) -> \(target)"
    }

    /// The forward's identity in the kernel (its map key): everything but the target.
    public struct Key: Sendable, Hashable {
        public var client: IPAddress?
        public var publicAddress: IPAddress
        public var transport: Transport
        public var port: UInt16

        public init(client: IPAddress?, publicAddress: IPAddress, transport: Transport, port: UInt16) {
            self.client = client
            self.publicAddress = publicAddress
            self.transport = transport
            self.port = port
        }
    }

    public var key: Key { Key(client: client, publicAddress: publicAddress, transport: transport, port: port) }

    var mapName: String { client == nil ? NFK_MAP_OPEN : NFK_MAP_CLIENT }
    var trafficName: String { client == nil ? NFK_SET_TRAFFIC_OPEN : NFK_SET_TRAFFIC_CLIENT }

    /// The map key: each field in 4 bytes, network order (see CNetfilter.h).
    var keyBytes: [UInt8] {
        var bytes: [UInt8] = []
        if let client { bytes += Self.v4(client) }
        bytes += Self.v4(publicAddress)
        bytes += [transport.rawValue, 0, 0, 0]
        bytes += [UInt8(port >> 8), UInt8(port & 0xFF), 0, 0]
        return bytes
    }

    /// The map's data: the target's address and port.
    var dataBytes: [UInt8] {
        Self.v4(target.ip) + [UInt8(target.port >> 8), UInt8(target.port & 0xFF), 0, 0]
    }

    static func v4(_ ip: IPAddress) -> [UInt8] {
        guard case .v4(let value) = ip.unmapped else { return [0, 0, 0, 0] }
        return [UInt8(value >> 24), UInt8((value >> 16) & 0xFF), UInt8((value >> 8) & 0xFF), UInt8(value & 0xFF)]
    }

    static func address(_ bytes: ArraySlice<UInt8>) -> IPAddress {
        let b = Array(bytes)
        return .v4(UInt32(b[0]) << 24 | UInt32(b[1]) << 16 | UInt32(b[2]) << 8 | UInt32(b[3]))
    }

    /// A forward read back from a map element (nil when the bytes are not ours).
    init?(mapKey key: [UInt8], data: [UInt8], hasClient: Bool) {
        guard key.count == (hasClient ? 16 : 12), data.count == 8 else { return nil }
        var offset = 0
        client = hasClient ? Self.address(key[0..<4]) : nil
        if hasClient { offset = 4 }
        publicAddress = Self.address(key[offset..<(offset + 4)])
        guard let transport = Transport(rawValue: key[offset + 4]) else { return nil }
        self.transport = transport
        port = UInt16(key[offset + 8]) << 8 | UInt16(key[offset + 9])
        target = SocketAddress(ip: Self.address(data[0..<4]), port: UInt16(data[4]) << 8 | UInt16(data[5]))
    }
}

/// What the kernel says about one forward.
public struct KernelForwardState: Sendable, Equatable {
    public var forward: KernelForward
    /// The element's timeout in ms (0: none) and what is left of it.
    public var timeoutMilliseconds: UInt64
    public var expiresMilliseconds: UInt64
    /// New connections or flows DNATed (the nat hook sees each flow's first packet).
    public var flows: UInt64
    /// Packets and bytes of its flows through the gateway, both directions.
    public var packets: UInt64
    public var bytes: UInt64

    public init(forward: KernelForward, timeoutMilliseconds: UInt64, expiresMilliseconds: UInt64, flows: UInt64, packets: UInt64, bytes: UInt64) {
        self.forward = forward
        self.timeoutMilliseconds = timeoutMilliseconds
        self.expiresMilliseconds = expiresMilliseconds
        self.flows = flows
        self.packets = packets
        self.bytes = bytes
    }
}

/// A netlink failure: which operation, the errno, and which message of a batch.
public struct NetfilterError: Error, Sendable, Equatable, CustomStringConvertible {
    public let operation: String
    public let errno: Int32
    /// The forward the failing message was about, when known.
    public let detail: String?

    public init(operation: String, errno: Int32, detail: String?) {
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        let reason = String(cString: strerror(errno))
        let hint = errno == EPERM || errno == EACCES
            ? " (the kernel path needs CAP_NET_ADMIN: run as root or grant the capability, e.g. AmbientCapabilities=CAP_NET_ADMIN)" : ""
        return "\(operation): \(reason)\(detail.map { " (\($0))" } ?? "")\(hint)"
    }

    public var isPermission: Bool { errno == EPERM || errno == EACCES }
    /// The table or an element is not there.
    public var isMissing: Bool { errno == ENOENT }
    /// An element is there already.
    public var isAlreadyPresent: Bool { errno == EEXIST }
}

/// What the gateway needs of the kernel path: `KernelTable` in production;
/// the control plane's unit tests give it an in-memory one, and the
/// end-to-end tests run the real table in network namespaces.
public protocol KernelForwarding: Sendable {
    /// Makes the table hold exactly `publics` and `forwards`, changing as
    /// little as it can (elements the kernel already holds keep their
    /// counters and expiry); creates the table when it is missing.
    func reconcile(publics: [IPAddress], forwards: [(KernelForward, timeoutMilliseconds: UInt64?)]) throws(NetfilterError)
    /// Applies `changes` in one batch: all or none. Removing a forward the
    /// kernel no longer holds (it expired) is not an error.
    func apply(_ changes: [KernelTable.Change]) throws(NetfilterError)
    /// Every forward with its expiry and counters.
    func forwards() throws(NetfilterError) -> [KernelForwardState]
    /// Ends the flows of `forward` (their conntrack entries). - Returns: how many.
    func deleteConnections(of forward: KernelForward) throws(NetfilterError) -> Int
    /// Removes the table (uninstall).
    func delete() throws(NetfilterError)
}

/// The product's nftables table (`inet` family, named `name`), which it owns
/// alone: created and deleted whole, changed one element at a time, every
/// change one atomic netlink batch (a batch that fails changes nothing).
/// Works in the calling process's network namespace. Calls block on the
/// netlink socket: call them from threads made for blocking work.
public struct KernelTable: KernelForwarding {
    public static let defaultName = "rdgw"
    public let name: String

    public init(name: String = KernelTable.defaultName) {
        self.name = name
    }

    /// An element change.
    public enum Change: Sendable, Equatable {
        /// Adds the forward with an expiry done by the kernel (nil: none).
        case add(KernelForward, timeoutMilliseconds: UInt64?)
        case remove(KernelForward)
    }

    /// Whether the table exists.
    public func exists() throws(NetfilterError) -> Bool {
        BlockingCallCheck.check("netlink: is table \(name) there")
        let rc = nfk_table_exists(name)
        if rc < 0 { throw NetfilterError(operation: "reading table inet \(name)", errno: -rc, detail: nil) }
        return rc == 1
    }

    /// In one batch: the table deleted when present, then made anew with
    /// `publics` and `forwards`. Flows the kernel already carries live in
    /// conntrack and go on.
    public func replace(publics: [IPAddress], forwards: [(KernelForward, timeoutMilliseconds: UInt64?)]) throws(NetfilterError) {
        let present = try exists()
        var changes: [BatchItem] = []
        if present { changes.append(.deleteTable) }
        changes.append(.createTable)
        for address in publics { changes.append(.element(add: true, set: NFK_SET_PUBLICS, key: KernelForward.v4(address), data: nil, timeout: nil, about: "public \(address)")) }
        for (forward, timeout) in forwards { changes += Self.items(.add(forward, timeoutMilliseconds: timeout)) }
        try send(changes, operation: "installing table inet \(name)")
    }

    /// Applies `changes` in one batch: all of them, or none. When a removal
    /// names a forward the kernel no longer holds (it expired meanwhile), the
    /// batch is sent again without it, so that expiry never blocks a change.
    public func apply(_ changes: [Change]) throws(NetfilterError) {
        guard !changes.isEmpty else { return }
        do throws(NetfilterError) {
            try send(changes.flatMap(Self.items), operation: "changing table inet \(name)")
        } catch where error.errno == ENOENT && changes.contains(where: { if case .remove = $0 { true } else { false } }) {
            let held = Set(try forwards().map(\.forward.key))
            let kept = changes.filter { change in
                if case .remove(let forward) = change { return held.contains(forward.key) }
                return true
            }
            guard !kept.isEmpty else { return }
            try send(kept.flatMap(Self.items), operation: "changing table inet \(name)")
        }
    }

    /// See `KernelForwarding.reconcile`: a missing table, or one with other
    /// public addresses, is replaced whole in one batch; otherwise only the
    /// differing elements change, in one batch.
    public func reconcile(publics: [IPAddress], forwards wanted: [(KernelForward, timeoutMilliseconds: UInt64?)]) throws(NetfilterError) {
        guard try exists() else {
            try replace(publics: publics, forwards: wanted)
            return
        }
        let heldPublics = Set(try dump(NFK_SET_PUBLICS).map { KernelForward.address($0.key[...]) })
        guard heldPublics == Set(publics) else {
            try replace(publics: publics, forwards: wanted)
            return
        }
        var held: [KernelForward.Key: KernelForward] = [:]
        for state in try forwards() { held[state.forward.key] = state.forward }
        var changes: [Change] = []
        var wantedKeys = Set<KernelForward.Key>()
        for (forward, timeout) in wanted {
            wantedKeys.insert(forward.key)
            if let present = held[forward.key] {
                if present == forward { continue }
                changes.append(.remove(present))
            }
            changes.append(.add(forward, timeoutMilliseconds: timeout))
        }
        for (key, forward) in held where !wantedKeys.contains(key) { changes.append(.remove(forward)) }
        try apply(changes)
    }

    /// Deletes the table (uninstall). Nothing else is touched.
    public func delete() throws(NetfilterError) {
        guard try exists() else { return }
        try send([.deleteTable], operation: "deleting table inet \(name)")
    }

    /// Every forward with its timeout and counters.
    public func forwards() throws(NetfilterError) -> [KernelForwardState] {
        var result: [KernelForwardState] = []
        var traffic: [[UInt8]: (UInt64, UInt64)] = [:]
        for set in [NFK_SET_TRAFFIC_OPEN, NFK_SET_TRAFFIC_CLIENT] {
            for element in try dump(set) { traffic[element.key] = (element.packets, element.bytes) }
        }
        for (map, hasClient) in [(NFK_MAP_OPEN, false), (NFK_MAP_CLIENT, true)] {
            for element in try dump(map) {
                guard let forward = KernelForward(mapKey: element.key, data: element.data, hasClient: hasClient) else { continue }
                let counted = traffic[element.key] ?? (0, 0)
                result.append(KernelForwardState(forward: forward, timeoutMilliseconds: element.timeout, expiresMilliseconds: element.expires,
                                                 flows: element.packets, packets: counted.0, bytes: counted.1))
            }
        }
        return result
    }

    public func deleteConnections(of forward: KernelForward) throws(NetfilterError) -> Int {
        try Self.deleteConnections(of: forward)
    }

    /// Deletes the conntrack entries of `forward`'s flows (a revoked rule's
    /// live connections stop at once). - Returns: how many.
    public static func deleteConnections(of forward: KernelForward) throws(NetfilterError) -> Int {
        BlockingCallCheck.check("netlink: conntrack delete")
        var deleted: Int32 = 0
        let src = forward.client.map { Self.networkOrder($0) } ?? 0
        let rc = nfk_conntrack_delete(src, Self.networkOrder(forward.publicAddress), forward.transport.rawValue, forward.port.bigEndian, &deleted)
        if rc < 0 { throw NetfilterError(operation: "deleting the connections of \(forward)", errno: -rc, detail: nil) }
        return Int(deleted)
    }

    static func networkOrder(_ ip: IPAddress) -> UInt32 {
        guard case .v4(let value) = ip.unmapped else { return 0 }
        return value.bigEndian
    }

    // MARK: batches

    enum BatchItem: Equatable {
        case deleteTable
        case createTable
        case element(add: Bool, set: String, key: [UInt8], data: [UInt8]?, timeout: UInt64?, about: String)
    }

    static func items(_ change: Change) -> [BatchItem] {
        switch change {
        case .add(let forward, let timeout):
            return [.element(add: true, set: forward.mapName, key: forward.keyBytes, data: forward.dataBytes, timeout: timeout, about: "\(forward)"),
                    .element(add: true, set: forward.trafficName, key: forward.keyBytes, data: nil, timeout: timeout, about: "\(forward)")]
        case .remove(let forward):
            return [.element(add: false, set: forward.mapName, key: forward.keyBytes, data: nil, timeout: nil, about: "\(forward)"),
                    .element(add: false, set: forward.trafficName, key: forward.keyBytes, data: nil, timeout: nil, about: "\(forward)")]
        }
    }

    /// The netlink bytes of a batch (tests check them without a kernel).
    public func batchBytes(_ changes: [Change]) -> [UInt8] {
        guard let batch = build(changes.flatMap(Self.items)) else { return [] }
        defer { nfk_batch_free(batch) }
        var length = 0
        guard let bytes = nfk_batch_bytes(batch, &length) else { return [] }
        // Safe: the batch owns `length` bytes at `bytes` until it is freed, after this copy.
        return Array(UnsafeBufferPointer(start: bytes, count: length))
    }

    /// The bytes of a batch creating the table with `publics` (tests).
    public func creationBytes(publics: [IPAddress]) -> [UInt8] {
        var items: [BatchItem] = [.createTable]
        for address in publics { items.append(.element(add: true, set: NFK_SET_PUBLICS, key: KernelForward.v4(address), data: nil, timeout: nil, about: "")) }
        guard let batch = build(items) else { return [] }
        defer { nfk_batch_free(batch) }
        var length = 0
        guard let bytes = nfk_batch_bytes(batch, &length) else { return [] }
        return Array(UnsafeBufferPointer(start: bytes, count: length))
    }

    private func build(_ items: [BatchItem], messageEnds: UnsafeMutablePointer<[Int32]>? = nil) -> OpaquePointer? {
        guard let batch = nfk_batch_new() else { return nil }
        for item in items {
            let rc: Int32
            switch item {
            case .deleteTable: rc = nfk_batch_delete_table(batch, name)
            case .createTable: rc = nfk_batch_create_table(batch, name)
            case .element(let add, let set, let key, let data, let timeout, _):
                rc = key.withUnsafeBytes { keyBuffer in
                    if add {
                        return (data ?? []).withUnsafeBytes { dataBuffer in
                            nfk_batch_add_element(batch, name, set, keyBuffer.baseAddress, UInt32(key.count),
                                                  data == nil ? nil : dataBuffer.baseAddress, UInt32(data?.count ?? 0), timeout ?? 0)
                        }
                    }
                    return nfk_batch_delete_element(batch, name, set, keyBuffer.baseAddress, UInt32(key.count))
                }
            }
            if rc != 0 {
                nfk_batch_free(batch)
                return nil
            }
            messageEnds?.pointee.append(nfk_batch_count(batch))
        }
        return batch
    }

    private func send(_ items: [BatchItem], operation: String) throws(NetfilterError) {
        BlockingCallCheck.check("netlink: \(operation)")
        // After each item, how many messages the batch holds (an item may be many).
        var messageEnds: [Int32] = []
        guard let batch = build(items, messageEnds: &messageEnds) else { throw NetfilterError(operation: operation, errno: ENOMEM, detail: nil) }
        defer { nfk_batch_free(batch) }
        var failed: Int32 = -1
        let rc = nfk_send(batch, &failed)
        guard rc == 0 else {
            var detail: String?
            if failed >= 0, let index = messageEnds.firstIndex(where: { failed < $0 }) {
                switch items[index] {
                case .deleteTable: detail = "deleting the table"
                case .createTable: detail = "creating the table (message \(failed + 1) of \(messageEnds[index]))"
                case .element(let add, let set, _, _, _, let about): detail = "\(add ? "adding" : "removing") \(about) in \(set)"
                }
            }
            throw NetfilterError(operation: operation, errno: -rc, detail: detail)
        }
    }

    struct DumpedElement {
        var key: [UInt8]
        var data: [UInt8]
        var timeout: UInt64
        var expires: UInt64
        var packets: UInt64
        var bytes: UInt64
    }

    private final class Collector {
        var elements: [DumpedElement] = []
    }

    private func dump(_ set: String) throws(NetfilterError) -> [DumpedElement] {
        BlockingCallCheck.check("netlink: dump \(set)")
        let collector = Collector()
        let context = Unmanaged.passRetained(collector)
        defer { context.release() }
        let rc = nfk_dump_elements(name, set, { context, key, keyLength, data, dataLength, timeout, expires, packets, bytes in
            // Safe: `context` is the retained Collector passed below; the pointers are valid during this call.
            let collector = Unmanaged<Collector>.fromOpaque(context!).takeUnretainedValue()
            let keyBytes = key.map { Array(UnsafeBufferPointer(start: $0, count: Int(keyLength))) } ?? []
            let dataBytes = data.map { Array(UnsafeBufferPointer(start: $0, count: Int(dataLength))) } ?? []
            collector.elements.append(DumpedElement(key: keyBytes, data: dataBytes, timeout: timeout, expires: expires,
                                                    packets: packets, bytes: bytes))
        }, context.toOpaque())
        if rc < 0 { throw NetfilterError(operation: "reading \(set) of table inet \(name)", errno: -rc, detail: nil) }
        return collector.elements
    }
}
