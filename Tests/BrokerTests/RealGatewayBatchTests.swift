@testable import BrokerAPI
import BrokerCore
import ControlProtocol
import Foundation
import GatewayControl
import Logging
import Relay
import ServiceLifecycle
import Synchronization
import SystemLayer
import Testing
import TestSupport

/// The broker's batch call against the gateway's own control endpoint (not
/// the fake): the wire format both ways, signed as in production.
@Suite("Broker to a real gateway: batches", .serialized, .offPool)
struct RealGatewayBatchTests {
    @Test("a batch of puts and deletes sent by the broker's client: each call's own port, deletion or refusal, as the gateway holds them")
    func batchAgainstTheGateway() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        var logger = Logger(label: "real-gateway-batch")
        logger.logLevel = .warning
        let key = ControlKey.generate()
        let engine = try RelayEngine(settings: RelaySettings(loops: 1), logger: logger)
        defer { engine.shutdown() }
        let settings = ControlSettings(publicAddress: .v4(0x7f00_0001), desktopNetworks: [CIDR("10.0.0.0/8")!], portRange: 20001...22000)
        let control = GatewayControl(engine: engine, settings: settings, baseRules: [], stateDirectory: folder.url.path,
                                     signer: ControlSigner(gatewayID: 9, key: key), logger: logger)
        try control.restore()
        let bound = Mutex<String?>(nil)
        let server = try ControlServer.application(control: control, host: "127.0.0.1", port: 0, logger: logger,
                                                   onServerRunning: { address in bound.withLock { $0 = address } })
        let services = ServiceGroup(configuration: .init(services: [server], logger: logger))
        let running = Task { try await services.run() }
        defer { running.cancel() }
        try await waitUntilAsync("the gateway's control endpoint listening") { bound.withLock { $0 } != nil }
        let address = bound.withLock { $0 }!

        let gateway = Gateway(id: 9, name: "gw-real", address: "127.0.0.1", addressPrivate: "", loadBalancerID: nil,
                              useSourceIP: .randomPortOpen, forwardTo: "", signature: "", notes: "", online: true,
                              version: "test", lastHeartbeat: Date(), keyFingerprint: nil, controlURL: "http://\(address)",
                              created: Date(), updated: Date())
        let client = GatewayControlClient(timeout: .seconds(10))
        let push = RulePush(protocol: .tcp, method: .randomPort, target: "10.1.2.3:3389", unusedExpirySeconds: 300)
        let old = try await client.put(ruleID: "0ld0", push: push, gateway: gateway, key: key)
        let calls: [GatewayCallQueue.Call] = [
            .init(ruleID: "aaaa", push: push, gateway: gateway, key: key),
            .init(ruleID: "0ld0", push: nil, gateway: gateway, key: key),
            .init(ruleID: "bbbb", push: RulePush(protocol: .tcp, method: .randomPort, target: "192.0.2.7:3389"), gateway: gateway, key: key),
            .init(ruleID: "cccc", push: push, gateway: gateway, key: key),
            .init(ruleID: "dddd", push: nil, gateway: gateway, key: key),
        ]
        let outcomes = try #require(await client.sendBatch(calls), "the gateway took no batch")
        #expect(outcomes.count == 5)
        let a = try outcomes[0].get(), c = try outcomes[3].get()
        #expect(a != c && (20001...22000).contains(a) && (20001...22000).contains(c))
        #expect((try? outcomes[1].get()) != nil, "the delete of a held rule")
        #expect((try? outcomes[4].get()) != nil, "a delete of an unknown rule counts as done (404)")
        guard case .failure(.refused(_, let status, let message)) = outcomes[2] else {
            Issue.record("a target outside the desktop networks was accepted: \(outcomes[2])")
            return
        }
        #expect(status == 403 && message.contains("target"), "\(message)")
        let held: [String: Int] = Dictionary(uniqueKeysWithValues: control.pushedRules().map { ($0.id, $0.port) })
        #expect(held == ["aaaa": a, "cccc": c], "the gateway holds exactly the batch's puts, on the ports answered (and not \(old))")
        await services.triggerGracefulShutdown()
        _ = try? await running.value
    }
}
