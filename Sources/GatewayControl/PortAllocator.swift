import ControlProtocol
import Relay
import SystemLayer

/// Chooses the public port of a pushed rule.
///
/// A port is free for a protocol when no rule of that protocol uses it and a
/// probe bind succeeds (so a port another process holds is never chosen).
/// Method 1 (the protocol's own port, one client only) may share a port with
/// other client-only rules of other clients: the relay tells them apart by
/// the client's address.
public struct PortAllocator: Sendable {
    /// One port in use by a rule (from the config file or pushed).
    public struct Use: Sendable, Equatable {
        public var port: Int
        public var transport: Transport
        public var allow: [CIDR]
        public init(port: Int, transport: Transport, allow: [CIDR]) {
            self.port = port
            self.transport = transport
            self.allow = allow
        }
    }

    /// Tries to bind `port` for `transport` and releases it; true when it could.
    public typealias Probe = (_ port: Int, _ transport: Transport) -> Bool

    public var range: ClosedRange<Int>

    public init(range: ClosedRange<Int> = 20001...22000) {
        self.range = range
    }

    /// The port for a rule.
    /// - Parameters:
    ///   - method: the routing method; 0 and 2 take a random free port of the range (or `requested`,
    ///     which must be one of it), 1 takes `requested` (any port).
    ///   - client: the only client of a method 1 or 2 rule.
    ///   - holders: the uses of one port by the rules held now (`PortUses.holders`):
    ///     a choice costs the ports tried, not the rules held.
    ///   - probe: the bind test (a real bind in production, a table in unit tests).
    /// - Throws: `ControlError` 409 naming the port when it is taken or the range is exhausted.
    public func allocate(method: RoutingMethod, requested: Int?, client: IPAddress?, transport: Transport,
                         holders: (Int) -> [Use], probe: Probe) throws(ControlError) -> Int {
        switch method {
        case .protocolPortClientOnly:
            guard let port = requested else { throw .badField("port", "required for method 1") }
            return try take(port, client: client, transport: transport, holders: holders, probe: probe)
        case .randomPort, .randomPortClientOnly:
            if let port = requested {
                // A cluster that places rules on every gateway (E) asks each
                // for the port the first one chose: it must be one of the range.
                guard range.contains(port) else {
                    throw .badField("port", "\(port) is outside this gateway's port range \(range.lowerBound)-\(range.upperBound)")
                }
                return try take(port, client: client, transport: transport, holders: holders, probe: probe)
            }
            let count = range.count
            let start = Int.random(in: range)
            for step in 0..<count {
                let port = range.lowerBound + (start - range.lowerBound + step) % count
                if holders(port).contains(where: { !$0.transport.isDisjoint(with: transport) }) { continue }
                if probe(port, transport) { return port }
            }
            throw ControlError(409, field: "port", "port: the port range \(range.lowerBound)-\(range.upperBound) is exhausted (all \(count) ports are in use)")
        }
    }

    /// A requested port: free for `transport`, or held only by client-only
    /// rules of other clients when this rule is client-only too.
    private func take(_ port: Int, client: IPAddress?, transport: Transport, holders uses: (Int) -> [Use], probe: Probe) throws(ControlError) -> Int {
        var needProbe: Transport = []
        let onPort = uses(port)
        for part in [Transport.tcp, .udp] where transport.contains(part) {
            let holders = onPort.filter { $0.transport.contains(part) }
            if holders.isEmpty { needProbe.insert(part); continue }
            // Shared only among client-only rules of other clients.
            let shareable = holders.allSatisfy { use in
                !use.allow.isEmpty && !use.allow.contains { client.map($0.contains) ?? true }
            }
            guard shareable else {
                throw ControlError(409, field: "port", "port: \(port)/\(part) is already taken by another rule")
            }
        }
        if !needProbe.isEmpty && !probe(port, needProbe) {
            throw ControlError(409, field: "port", "port: \(port)/\(needProbe) is already in use on this host (cannot bind it)")
        }
        return port
    }

    /// The production probe: binds `address`'s IP at `port` without SO_REUSEPORT.
    public static func bindProbe(on ip: IPAddress) -> Probe {
        { port, transport in
            guard let port = UInt16(exactly: port), port > 0 else { return false }
            let address = SocketAddress(ip: ip, port: port)
            do throws(SystemCallError) {
                if transport.contains(.tcp) { try Socket.probeFree(address) }
                if transport.contains(.udp) { try Socket.probeFreeUDP(address) }
                return true
            } catch {
                return false
            }
        }
    }
}
