import ControlProtocol
import Foundation
import GatewayControl
import Relay
import SystemLayer
import Testing
import TestSupport

/// `POST /control/v1/rules`: puts and deletes in one call, each item with
/// the outcome it would have had alone.
@Suite("Rule batches", .serialized, .offPool) struct BatchTests {
    static func push(_ target: String, method: Int = 0, client: String? = nil, port: Int? = nil,
                     extra: String = "") -> String {
        var body = "\"protocol\":\"tcp\",\"method\":\(method),\"target\":\"\(target)\""
        if let client { body += ",\"client_ip\":\"\(client)\"" }
        if let port { body += ",\"port\":\(port)" }
        return body + extra
    }

    static func items(_ reply: BlockingHTTP.Response, _ list: String) -> [[String: Any]] {
        reply.object[list] as? [[String: Any]] ?? []
    }

    @Test("puts and deletes in one call: each answered as alone, a refused item refuses nothing else, all durable and restored")
    func mixedBatch() async throws {
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        let taken = try Socket.listen(on: TestPorts.freeAddress(), reusePort: false)
        defer { taken.close() }
        let takenPort = Int(Socket.localAddress(taken)!.port)
        try await offPool {
            let old = try gateway.put("old", "{\(Self.push("\(echo.address)"))}")
            let keep = try gateway.put("keep", "{\(Self.push("\(echo.address)", method: 2, client: "127.0.0.1"))}")
            #expect(old.status == 201 && keep.status == 201, "\(old.text) \(keep.text)")
            let oldPort = try #require(old.object["port"] as? Int), keepPort = try #require(keep.object["port"] as? Int)

            let body = """
                {"delete": ["old", "missing"],
                 "put": [{"id": "a", \(Self.push("\(echo.address)"))},
                         {"id": "b", \(Self.push("\(echo.address)", method: 2, client: "127.0.0.1"))},
                         {"id": "far", \(Self.push("192.0.2.1:3389"))},
                         {"id": "keep", \(Self.push("\(echo.address)", method: 2, client: "127.0.0.1"))},
                         {"id": "a", \(Self.push("\(echo.address)"))},
                         {"id": "held", \(Self.push("\(echo.address)", method: 1, client: "127.0.0.1", port: takenPort))},
                         {"id": "old", \(Self.push("\(echo.address)"))}]}
                """
            let reply = try gateway.send("POST", "/control/v1/rules", body)
            #expect(reply.status == 200, "\(reply.text)")
            let deletes = Self.items(reply, "delete"), puts = Self.items(reply, "put")
            #expect(deletes.map { $0["id"] as? String } == ["old", "missing"])
            #expect(deletes.map { $0["status"] as? Int } == [204, 404], "\(reply.text)")
            #expect(puts.map { $0["id"] as? String } == ["a", "b", "far", "keep", "a", "held", "old"])
            #expect(puts.map { $0["status"] as? Int } == [201, 201, 403, 200, 400, 409, 400], "\(reply.text)")
            #expect(puts[3]["port"] as? Int == keepPort, "an identical rule keeps its port")
            #expect(puts[2]["field"] as? String == "target" && puts[5]["field"] as? String == "port", "\(reply.text)")
            #expect((puts[4]["error"] as? String)?.contains("named twice") == true)
            #expect((puts[6]["error"] as? String)?.contains("named twice") == true, "an id deleted and put in one batch is refused")

            let aPort = try #require(puts[0]["port"] as? Int), bPort = try #require(puts[1]["port"] as? Int)
            #expect(puts[0]["listen"] as? String == "127.0.0.1:\(aPort)")
            #expect(Set([aPort, bPort, keepPort]).count == 3, "each rule of the batch has its own port")
            #expect(echoThrough(port: aPort) == "hello through the gateway")
            #expect(echoThrough(port: bPort) == "hello through the gateway")
            #expect(echoThrough(port: bPort, source: "127.0.0.2") == nil, "method 2 admits only its client")
            // The batch deletes "old" before its puts, so "a" or "b" may be given its port
            // (about one run in 47, from this gateway's own block of 96): then it carries their rule.
            if oldPort != aPort && oldPort != bPort {
                #expect(echoThrough(port: oldPort) == nil, "a deleted rule's port closes")
            }
            #expect(Set(gateway.control.pushedRules().map(\.id)) == ["keep", "a", "b"])
            // Durable before the answer: a store opened now reads the batch.
            #expect(Set(RuleStore(directory: gateway.folder.path).load().rules.map(\.id)) == ["keep", "a", "b"])
            return ()
        }
        await gateway.stop(removeFolder: false)

        // A restart restores exactly what the batch left.
        let again = try await TestGateway.start(folder: gateway.folder)
        #expect(Set(again.control.pushedRules().map(\.id)) == ["keep", "a", "b"])
        await again.stop()
    }

    @Test("a batch that cannot be read is refused whole, naming the item and field, and changes nothing")
    func badBatches() async throws {
        let gateway = try await TestGateway.start(settings: {
            var settings = TestGateway.settings()
            settings.maxBodyBytes = 64 * 1024
            return settings
        }())
        try await offPool {
            _ = try gateway.put("existing", "{\(Self.push("127.0.0.1:9"))}")
            let before = gateway.snapshot()
            let many = (0...RuleBatch.maxItems).map { "\"d\($0)\"" }.joined(separator: ",")
            let cases: [(body: String, field: String?, message: String)] = [
                ("{\"put\": [{\"id\": \"a\", \(Self.push("127.0.0.1:9"))}, {\"id\": \"b\", \(Self.push("127.0.0.1:9", extra: ",\"x\":1"))}]}",
                 "put.1.x", "put.1.x: unknown field"),
                ("{\"put\": [{\(Self.push("127.0.0.1:9"))}]}", "put.0.id", "put.0.id: required"),
                ("{\"put\": [{\"id\": \"a\", \"protocol\": \"tcp\", \"method\": \"zero\", \"target\": \"127.0.0.1:9\"}]}", "put.0.method", "wrong type"),
                ("{\"put\": {}}", "put", "wrong type"),
                ("{\"delete\": [\"existing\"], \"other\": []}", "other", "unknown field"),
                ("{\"delete\": [\(many)]}", "put", "at most \(RuleBatch.maxItems)"),
                ("[]", nil, "JSON object"),
                ("{\"delete\": [\"existing\"]", nil, "not valid JSON"),
            ]
            for (body, field, message) in cases {
                let reply = try gateway.send("POST", "/control/v1/rules", body)
                #expect(reply.status == 400, "\(body): \(reply.status) \(reply.text)")
                #expect(reply.object["field"] as? String == field, "\(body): \(reply.text)")
                #expect((reply.object["error"] as? String ?? "").contains(message), "\(body): \(reply.text)")
                #expect(gateway.snapshot() == before, "\(body) changed something")
            }
            // Signed like any call: a forged one is refused before it is read.
            let forged = try gateway.send("POST", "/control/v1/rules", "{\"delete\": [\"existing\"]}",
                                          signer: ControlSigner(gatewayID: TestGateway.gatewayID, key: ControlKey.generate()))
            #expect(forged.status == 401)
            #expect(try gateway.send("PATCH", "/control/v1/rules").status == 405)
            #expect(gateway.snapshot() == before)
        }
        await gateway.stop()
    }

    @Test("a rule the relay cannot open fails alone: the batch's other rules are tried one by one and go in")
    func engineRefusalIsOneItems() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        // Every probe says free, so the held port is found only when the relay listens
        // (the random ports come from makeControl's block of this test's own).
        let (control, engine) = try KernelPathControlTests.makeControl(folder: folder, kernel: nil, clock: TestClock())
        defer { engine.shutdown() }
        let taken = try Socket.listen(on: TestPorts.freeAddress(), reusePort: false)
        defer { taken.close() }
        let held = Int(Socket.localAddress(taken)!.port)
        let rule = { (port: Int?, method: RoutingMethod) in
            RulePush(protocol: .tcp, method: method, target: "10.1.0.5:3389", clientIP: method == .randomPort ? nil : "127.0.0.1", port: port)
        }
        let outcome = control.batch(putting: [("one", rule(nil, .randomPort)), ("held", rule(held, .protocolPortClientOnly)),
                                              ("two", rule(nil, .randomPortClientOnly))], deleting: [])
        #expect(outcome.put.count == 3)
        #expect((try? outcome.put[0].get())?.created == true)
        #expect((try? outcome.put[2].get())?.created == true)
        guard case .failure(let error) = outcome.put[1] else { Issue.record("the held port was accepted"); return }
        #expect(error.status == 409 && error.field == "port", "\(error)")
        #expect(Set(engine.rules.map(\.id)) == ["broker:one", "broker:two"])
        #expect(Set(RuleStore(directory: folder.path).load().rules.map(\.id)) == ["one", "two"])
    }

    @Test("kernel and relay rules in one batch; a kernel refusal fails its item only")
    func kernelItems() throws {
        let folder = TempFolder()
        defer { folder.remove() }
        let kernel = MemoryKernel()
        let (control, engine) = try KernelPathControlTests.makeControl(folder: folder, kernel: kernel, clock: TestClock())
        defer { engine.shutdown() }
        let outcome = control.batch(putting: [
            ("k", RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.5:3389", forwardingPath: .kernel)),
            ("u", RulePush(protocol: .tcp, method: .randomPort, target: "10.1.0.6:3389")),
            ("v6", RulePush(protocol: .tcp, method: .randomPort, target: "[2001:db8::5]:3389", forwardingPath: .kernel)),
        ], deleting: [])
        let k = try #require(try? outcome.put[0].get())
        #expect(kernel.elements[KernelPathControlTests.forward(k.rule)] != nil)
        #expect((try? outcome.put[1].get())?.created == true)
        guard case .failure = outcome.put[2] else { Issue.record("an IPv6 kernel rule was accepted"); return }
        #expect(engine.rules.map(\.id) == ["broker:u"], "a kernel rule opens no listener")
        #expect(Set(RuleStore(directory: folder.path).load().rules.map(\.id)) == ["k", "u"])

        // Deleting both in one batch removes the element and the listener.
        let gone = control.batch(putting: [], deleting: ["k", "u"])
        #expect(gone.delete.allSatisfy { (try? $0.get()) != nil })
        #expect(kernel.elements.isEmpty && engine.rules.isEmpty)
        #expect(RuleStore(directory: folder.path).load().rules.isEmpty)
    }

    @Test("rules_sync = background: a change is in the journal when answered, and made durable right after without anyone waiting")
    func backgroundSync() async throws {
        // The same settings (and so the same block of ports) for the restart, so it can reopen every rule.
        var settings = TestGateway.settings()
        settings.rulesSync = .background
        let gateway = try await TestGateway.start(settings: settings)
        let echo = try TCPEcho()
        defer { echo.stop() }
        try await offPool {
            for index in 0..<20 {
                // A port of the block bound by something else at that moment is
                // refused with 409 and changes nothing (seen once in nine runs
                // under load); the same push again gets another port.
                var reply = try gateway.put("single\(index)", "{\(Self.push("\(echo.address)"))}")
                for _ in 0..<3 where reply.status == 409 && reply.text.contains("already in use") {
                    reply = try gateway.put("single\(index)", "{\(Self.push("\(echo.address)"))}")
                }
                #expect(reply.status == 201, "\(reply.text)")
                // What a crash of the process would leave: the page cache holds the record.
                #expect(RuleStore(directory: gateway.folder.path).load().rules.count == index + 1)
            }
            let target = "\(echo.address)"
            let items = (0..<20).map { "{\"id\": \"batch\($0)\", \(Self.push(target))}" }.joined(separator: ",")
            let reply = try gateway.send("POST", "/control/v1/rules", #"{"put": [\#(items)], "delete": ["single0"]}"#)
            #expect(reply.status == 200, "\(reply.text)")
            #expect(try gateway.send("DELETE", "/control/v1/rules/single1").status == 204)
            #expect(RuleStore(directory: gateway.folder.path).load().rules.count == 38)
            #expect(eventually { gateway.control.store.unsynced == 0 }, "changes still waiting for their sync")
            #expect(gateway.control.problem == nil)
            return ()
        }
        await gateway.stop(removeFolder: false)
        let again = try await TestGateway.start(folder: gateway.folder, settings: settings)
        #expect(again.control.pushedRules().count == 38)
        await again.stop()
    }
}
