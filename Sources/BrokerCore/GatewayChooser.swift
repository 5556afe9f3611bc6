import Foundation

/// The gateway a connection goes through and how its port is opened.
public struct GatewayChoice: Sendable, Equatable {
    /// The gateway that chooses the port (the only one, except with `E`).
    public var gateway: Gateway
    /// With `E` (every gateway, behind an external load balancer): the other
    /// online gateways of the cluster, which open the same port.
    public var others: [Gateway]
    /// The `use_src_ip` that applies: the cluster's when the desktop names a
    /// cluster, otherwise the gateway's.
    public var method: SourceIPMode
    /// Where the client connects: the cluster's address with `E` (its load
    /// balancer) when it has one, otherwise the gateway's.
    public var address: String

    public init(gateway: Gateway, others: [Gateway] = [], method: SourceIPMode, address: String? = nil) {
        self.gateway = gateway
        self.others = others
        self.method = method
        self.address = address ?? gateway.address
    }

    /// Every gateway the rule goes to, `gateway` first.
    public var all: [Gateway] { [gateway] + others }
}

/// Why no gateway can carry a connection.
public enum GatewayChoiceError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The desktop names neither a gateway nor a cluster (a configuration problem: 409).
    case noRoute(String)
    /// Every gateway that could carry it is offline or not registered (503).
    case noneOnline(String)

    public var description: String {
        switch self {
        case .noRoute(let message), .noneOnline(let message): message
        }
    }
}

/// Picks the gateway for a connection to a desktop (DESIGN.md "Broker core"):
/// the desktop's own gateway, or one of its cluster's by the cluster's
/// `load_balance_via`, never one that is offline, unenrolled or unregistered.
/// Pure: the caller reads the rows and passes them in.
public enum GatewayChooser {
    /// - Parameters:
    ///   - desktop: the desktop asked for.
    ///   - gateways: every gateway (those of other clusters are ignored).
    ///   - cluster: the desktop's cluster, when it names one.
    ///   - ruleCounts: the broker's active rules per gateway (for `L`).
    ///   - loginGatewayID: the gateway the user logged in through, if known (for `P`).
    ///   - now, offlineAfter: a gateway silent for longer than `offlineAfter` is offline.
    /// - Throws: `GatewayChoiceError` saying why none fits.
    public static func choose(desktop: Desktop, gateways: [Gateway], cluster: GatewayCluster?,
                              ruleCounts: [Int64: Int], loginGatewayID: Int64?, now: Date,
                              offlineAfter: TimeInterval) throws(GatewayChoiceError) -> GatewayChoice {
        let usable = { (gateway: Gateway) -> Bool in
            gateway.enrolled && !gateway.controlURL.isEmpty && gateway.isLive(now: now, offlineAfter: offlineAfter)
        }
        if let gatewayID = desktop.gatewayID {
            guard let gateway = gateways.first(where: { $0.id == gatewayID }) else {
                throw .noRoute("desktop \(desktop.id) names gateway \(gatewayID), which does not exist")
            }
            guard usable(gateway) else {
                throw .noneOnline("gateway \(gateway.id) ('\(gateway.name)') of desktop \(desktop.id) is \(state(gateway, now: now, offlineAfter: offlineAfter))")
            }
            return GatewayChoice(gateway: gateway, method: gateway.useSourceIP)
        }
        guard let clusterID = desktop.loadBalancerID else {
            throw .noRoute("desktop \(desktop.id) names neither a gateway (gateway_id) nor a gateway cluster (load_balancer_id)")
        }
        guard let cluster, cluster.id == clusterID else {
            throw .noRoute("desktop \(desktop.id) names gateway cluster \(clusterID), which does not exist")
        }
        let members = gateways.filter { $0.loadBalancerID == cluster.id }.sorted { $0.id < $1.id }
        let online = members.filter(usable)
        guard !online.isEmpty else {
            throw .noneOnline("no gateway of cluster \(cluster.id) ('\(cluster.name)') is online (\(members.count) gateway(s) in it)")
        }
        let fewestRules = { () -> Gateway in
            // Ties go to the lowest id, so the choice is stable.
            online.min { (ruleCounts[$0.id] ?? 0, $0.id) < (ruleCounts[$1.id] ?? 0, $1.id) }!
        }
        let chosen: Gateway
        switch cluster.loadBalanceVia {
        case .everyGateway:
            // The rule goes to every online gateway; an offline one gets none
            // (and drops what it had when it registers again).
            return GatewayChoice(gateway: online[0], others: Array(online.dropFirst()), method: cluster.useSourceIP,
                                 address: cluster.address.isEmpty ? nil : cluster.address)
        case .leastConnections:
            chosen = fewestRules()
        case .loginGateway:
            chosen = online.first { $0.id == loginGatewayID } ?? fewestRules()
        }
        return GatewayChoice(gateway: chosen, method: cluster.useSourceIP)
    }

    /// "offline", "not enrolled", ...: why a gateway cannot be used.
    static func state(_ gateway: Gateway, now: Date, offlineAfter: TimeInterval) -> String {
        if !gateway.enrolled { return "not enrolled (POST /v1/gateways/\(gateway.id)/enrollment)" }
        if gateway.controlURL.isEmpty { return "not registered yet" }
        return "offline (no heartbeat within \(Int(offlineAfter)) s)"
    }
}
