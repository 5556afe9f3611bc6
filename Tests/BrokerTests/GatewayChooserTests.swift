import BrokerCore
import Foundation
import Testing
import TestSupport

@Suite("GatewayChooser: which gateway carries a connection", .offPool)
struct GatewayChooserTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    func gateway(_ id: Int64, cluster: Int64? = nil, heartbeatAgo: TimeInterval? = 1, online: Bool = true,
                 enrolled: Bool = true, registered: Bool = true, mode: SourceIPMode = .randomPortOpen) -> Gateway {
        var gateway = Gateway.blank(now: now)
        gateway.id = id
        gateway.name = "gw-\(id)"
        gateway.loadBalancerID = cluster
        gateway.online = online
        gateway.lastHeartbeat = heartbeatAgo.map { now.addingTimeInterval(-$0) }
        gateway.keyFingerprint = enrolled ? "f\(id)" : nil
        gateway.controlURL = registered ? "http://10.0.0.\(id):19010" : ""
        gateway.useSourceIP = mode
        return gateway
    }

    func cluster(_ id: Int64, _ via: LoadBalanceMethod, mode: SourceIPMode = .randomPortClientOnly) -> GatewayCluster {
        var cluster = GatewayCluster.blank(now: now)
        cluster.id = id
        cluster.name = "cl-\(id)"
        cluster.loadBalanceVia = via
        cluster.useSourceIP = mode
        cluster.address = "cluster\(id).example.com"
        return cluster
    }

    func desktop(gateway: Int64? = nil, cluster: Int64? = nil) -> Desktop {
        var desktop = Desktop.blank(now: now)
        desktop.id = 1
        desktop.gatewayID = gateway
        desktop.loadBalancerID = cluster
        return desktop
    }

    func choose(_ desktop: Desktop, _ gateways: [Gateway], _ cluster: GatewayCluster? = nil, counts: [Int64: Int] = [:],
                login: Int64? = nil) throws(GatewayChoiceError) -> GatewayChoice {
        try GatewayChooser.choose(desktop: desktop, gateways: gateways, cluster: cluster, ruleCounts: counts,
                                  loginGatewayID: login, now: now, offlineAfter: 30)
    }

    @Test("a pinned gateway: its own use_src_ip; offline, stale, unenrolled or unregistered → noneOnline")
    func pinned() throws {
        let chosen = try choose(desktop(gateway: 2), [gateway(1), gateway(2, mode: .protocolPortClientOnly)])
        #expect(chosen.gateway.id == 2 && chosen.method == .protocolPortClientOnly)
        for bad in [gateway(2, online: false), gateway(2, heartbeatAgo: 31), gateway(2, heartbeatAgo: nil),
                    gateway(2, enrolled: false), gateway(2, registered: false)] {
            #expect(throws: GatewayChoiceError.self) { try choose(desktop(gateway: 2), [bad]) }
        }
        #expect(throws: GatewayChoiceError.noRoute("desktop 1 names neither a gateway (gateway_id) nor a gateway cluster (load_balancer_id)")) {
            try choose(desktop(), [gateway(1)])
        }
    }

    @Test("clusters: L fewest rules (ties to the lowest id), E every live member (lowest id first) at the cluster's address, P the login gateway or else L; the cluster's use_src_ip")
    func clusters() throws {
        let members = [gateway(3, cluster: 9), gateway(1, cluster: 9, heartbeatAgo: 40), gateway(2, cluster: 9), gateway(4)]
        let least = try choose(desktop(cluster: 9), members, cluster(9, .leastConnections), counts: [2: 5, 3: 1])
        #expect(least.gateway.id == 3 && least.method == .randomPortClientOnly)
        #expect(try choose(desktop(cluster: 9), members, cluster(9, .leastConnections), counts: [2: 1, 3: 1]).gateway.id == 2)
        let every = try choose(desktop(cluster: 9), members, cluster(9, .everyGateway))
        #expect(every.all.map(\.id) == [2, 3], "1 is stale, 4 is not a member")
        #expect(every.address == "cluster9.example.com", "E: clients reach the cluster's load balancer")
        #expect(least.others.isEmpty && least.address == least.gateway.address, "L: one gateway, its own address")
        #expect(try choose(desktop(cluster: 9), members, cluster(9, .loginGateway), counts: [3: 0, 2: 7], login: 2).gateway.id == 2)
        #expect(try choose(desktop(cluster: 9), members, cluster(9, .loginGateway), counts: [2: 7], login: 1).gateway.id == 3,
                "the login gateway is stale: fewest rules instead")
        #expect(throws: GatewayChoiceError.self) {
            try choose(desktop(cluster: 9), [gateway(1, cluster: 9, online: false)], cluster(9, .everyGateway))
        }
    }
}
