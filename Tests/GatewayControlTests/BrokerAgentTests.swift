import ControlProtocol
import Foundation
import GatewayControl
import Logging
import SystemLayer
import Testing
import TestSupport

/// Registration and heartbeats against a test broker on a real socket.
@Suite(.serialized, .offPool) struct BrokerAgentTests {
    @Test func registersReconcilesAndBeats() async throws {
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        let broker = try FakeBroker(signer: gateway.signer, keep: ["wanted"])
        defer { broker.stop() }
        try await offPool {
            for id in ["wanted", "deleted-while-away"] {
                _ = try gateway.control.put(id: id, push: RulePush(protocol: .tcp, method: .randomPort, target: "\(echo.address)"))
            }
            let agent = BrokerAgent(control: gateway.control, version: "test", controlURL: "http://127.0.0.1:\(gateway.port)",
                                    portRange: PortRange(first: 20001, last: 22000))
            agent.configure(BrokerAgent.Target(broker: try BrokerAddress("127.0.0.1:\(broker.port)"), signer: gateway.signer))
            try agent.start()
            defer { agent.stop() }
            #expect(eventually { agent.status.state == "registered" }, "\(agent.status)")
            let registration = try #require(broker.registrations.first)
            #expect(registration.verified == nil)
            let request = try JSONDecoder().decode(RegisterRequest.self, from: Data(registration.body))
            #expect(Set(request.rules.map(\.id)) == ["wanted", "deleted-while-away"])
            #expect(request.controlURL == "http://127.0.0.1:\(gateway.port)")
            // The broker's keep list removed the other rule.
            #expect(gateway.control.pushedRules().map(\.id) == ["wanted"])
            #expect(eventually {
                broker.received.withLock { $0.contains { $0.path == "/v1/gateway-agent/heartbeat" && $0.verified == nil } }
            })
            let beat = try #require(broker.received.withLock { $0.first { $0.path == "/v1/gateway-agent/heartbeat" } })
            let heartbeat = try JSONDecoder().decode(Heartbeat.self, from: Data(beat.body))
            #expect(heartbeat.gatewayID == TestGateway.gatewayID)
            #expect(heartbeat.rules == 1)
            #expect(agent.status.lastHeartbeat != nil)
        }
        await gateway.stop()
    }

    @Test func unreachableBrokerTouchesNothing() async throws {
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        try await offPool {
            let (rule, _) = try gateway.control.put(id: "live", push: RulePush(protocol: .tcp, method: .randomPort, target: "\(echo.address)"))
            let session = try #require(OpenSession(port: rule.port))
            defer { session.close() }
            // A port nobody listens on.
            let closed = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
            let port = Socket.localAddress(closed)!.port
            closed.close()
            let agent = BrokerAgent(control: gateway.control, version: "test", controlURL: "http://127.0.0.1:\(gateway.port)",
                                    portRange: PortRange(first: 20001, last: 22000))
            agent.configure(BrokerAgent.Target(broker: try BrokerAddress("127.0.0.1:\(port)"), signer: gateway.signer))
            try agent.start()
            defer { agent.stop() }
            #expect(eventually { agent.status.state == "unreachable" }, "\(agent.status)")
            #expect(agent.status.lastError?.contains("cannot connect") == true)
            #expect(!(agent.status.lastError ?? "").contains(gateway.key.text))
            #expect(gateway.control.pushedRules().map(\.id) == ["live"])
            #expect(eventually { gateway.control.sessionCounts()["broker:live"] == 1 })
            #expect(echoThrough(port: rule.port) == "hello through the gateway")
        }
        await gateway.stop()
    }

    @Test func brokerRefusingTheSignatureIsReported() async throws {
        let gateway = try await TestGateway.start()
        // This broker holds another key for gateway 7.
        let broker = try FakeBroker(signer: ControlSigner(gatewayID: TestGateway.gatewayID, key: .generate()))
        defer { broker.stop() }
        try await offPool {
            let agent = BrokerAgent(control: gateway.control, version: "test", controlURL: "http://127.0.0.1:\(gateway.port)",
                                    portRange: PortRange(first: 20001, last: 22000))
            agent.configure(BrokerAgent.Target(broker: try BrokerAddress("127.0.0.1:\(broker.port)"), signer: gateway.signer))
            try agent.start()
            defer { agent.stop() }
            #expect(eventually { agent.status.state == "refused" }, "\(agent.status)")
            #expect(agent.status.lastError?.contains("HTTP 401") == true)
        }
        await gateway.stop()
    }
}
