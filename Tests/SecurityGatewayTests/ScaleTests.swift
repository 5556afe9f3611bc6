import Foundation
import Relay
import SecurityGateway
import SessionGrants
import SystemLayer
import Testing
import TestSupport

/// Thousands of sessions: the grant journal (O(1) per change, restored
/// exactly, kept small) and the session tracker's per-agent index. Checked
/// against what the state must be, never against a clock.
@Suite("Security Gateway at scale", .serialized, .offPool)
struct SecurityGatewayScaleTests {
    let now = Date()

    func material() async throws -> (GrantSigner, GrantVerifier, String) {
        let dir = try SGTest.temporaryDirectory()
        try SGTest.makeSigningPair(in: dir)
        let signer = try await GrantSigner.load(pem: try String(contentsOfFile: dir + "/k.pem", encoding: .utf8))
        let verifier = try await GrantVerifier.load(certificatePEM: try String(contentsOfFile: dir + "/c.pem", encoding: .utf8), audience: "g")
        return (signer, verifier, dir)
    }

    func grant(_ i: Int, singleUse: Bool = false, life: TimeInterval = 3600) -> SessionGrant {
        SessionGrant(sessionID: "s\(i)", agent: "10.0.\(i / 250).\(i % 250 + 1):4172", serverName: "D\(i).Example", audience: "g",
                     issuedAt: now.addingTimeInterval(-5), expires: now.addingTimeInterval(life), singleUse: singleUse)
    }

    func lines(_ path: String) -> Int {
        (FileManager.default.contents(atPath: path) ?? Data()).reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) }
    }

    @Test("3,000 prepares, 2,500 revokes and single-use uses: a restart restores exactly the live grants, and the journal stays small")
    func journalRoundTrip() async throws {
        let (signer, verifier, dir) = try await material()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/prepared-grants.json"
        let store = PreparedGrants(path: path)
        var tokens: [String] = [], grants: [SessionGrant] = []
        for i in 0..<3000 {
            let g = grant(i, singleUse: i % 10 == 3)
            let token = try await signer.sign(g)
            tokens.append(token)
            grants.append(g)
            #expect(store.prepare(g, token: token) == .added)
        }
        for i in 0..<2500 { #expect(store.revoke(sessionID: "s\(i)") == 1) }
        // SNIs are matched whatever their case in the grant.
        #expect(store.lookup(serverName: "d2600.example", client: "198.51.100.1")?.grant.sessionID == "s2600")
        // Single-use grants 2503, 2513, ...: used once, then gone (and still used after a restart).
        let used = stride(from: 2503, to: 3000, by: 10).map { $0 }
        for i in used { #expect(store.lookup(serverName: "d\(i).example", client: "198.51.100.1")?.grant.sessionID == "s\(i)") }
        #expect(store.count == 500 - used.count)
        // The journal is rewritten when it outgrows max(1,024, 4 x (live + used)) lines,
        // so it holds far fewer than the 3,000 + 2,500 + 50 changes (in the
        // background while the changes went on: each of them is in it, below).
        #expect(store.waitForCompaction())
        #expect(lines(path) <= 4 * 500 + 1, "journal lines: \(lines(path))")

        // A crash while a line was being appended: its last line is cut short.
        let handle = try #require(FileHandle(forWritingAtPath: path))
        handle.seek(toFileOffset: UInt64(AppendOnlyFile.records(in: try #require(try StateFile.read(path, limit: 1 << 30))).count))
        handle.write(Data(#"{"op":"prepare","id":"torn","tok"#.utf8))
        try handle.close()
        let reborn = PreparedGrants(path: path)
        let restored = await reborn.restore(verifier: verifier, now: now)
        #expect(restored.kept == 500 - used.count && restored.dropped == 0, "\(restored)")
        #expect(Set(reborn.all.map(\.grant.sessionID)) == Set(store.all.map(\.grant.sessionID)))
        for i in used { #expect(reborn.prepare(grants[i], token: tokens[i]) == .alreadyUsed) }
        #expect(reborn.lookup(serverName: "d2999.example", client: "c")?.grant.sessionID == "s2999")
        #expect(reborn.lookup(serverName: "d10.example", client: "c") == nil, "a revoked grant stays revoked")
        #expect(lines(path) == 500, "the restored journal is a snapshot: one line per live or used grant")
        #expect(!((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).contains { $0.contains(".bad-") },
                "a torn last line is not damage")
        // Changes after the restart land in the journal too.
        #expect(reborn.revoke(sessionID: "s2999") == 1)
        let third = PreparedGrants(path: path)
        #expect(await third.restore(verifier: verifier, now: now).kept == 500 - used.count - 1)
    }

    @Test("a damaged line is skipped and the file kept aside; the earlier one-object file format is read")
    func damagedAndEarlierFormat() async throws {
        let (signer, verifier, dir) = try await material()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/grants"
        let a = try await signer.sign(grant(1)), b = try await signer.sign(grant(2))
        let journal = #"{"op":"prepare","id":"x1","token":"\#(a)"}"# + "\nnot a record\n" + #"{"op":"prepare","id":"x2","token":"\#(b)"}"# + "\n"
        try Data(journal.utf8).write(to: URL(fileURLWithPath: path))
        let store = PreparedGrants(path: path)
        #expect(await store.restore(verifier: verifier, now: now) == (2, 0))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).contains { $0.hasPrefix("grants.bad-") })

        let earlier = #"{"tokens":["\#(a)","\#(b)","forged.token.here"],"consumed":{"gone":\#(now.timeIntervalSince1970 + 600)}}"#
        try Data(earlier.utf8).write(to: URL(fileURLWithPath: path))
        let migrated = PreparedGrants(path: path)
        #expect(await migrated.restore(verifier: verifier, now: now) == (2, 1))
        #expect(migrated.count == 2 && lines(path) == 3, "rewritten as a journal: two grants and one used id")
    }

    @Test("a journal that cannot be written: prepare says so (503 at the endpoint), nothing changes, health names it")
    func unwritable() async throws {
        let (signer, _, dir) = try await material()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = PreparedGrants(path: dir + "/no-such-dir/grants")
        let g = grant(1)
        guard case .notStored(let why) = store.prepare(g, token: try await signer.sign(g)) else {
            Issue.record("prepare must fail when the journal cannot be written")
            return
        }
        #expect(why.contains("no-such-dir"), "\(why)")
        #expect(store.count == 0 && store.lookup(serverName: "d1.example", client: "c") == nil)
        #expect(store.storeProblem?.contains("no-such-dir") == true)
    }

    @Test("5,000 clients to 5,000 agents: one binding and route each from AgentSourcePort; all released at the end")
    func trackerAtScale() throws {
        let listen = SocketAddress("0.0.0.0:4172")!
        let tracker = SessionTracker(agentSourcePort: 55000, collaborationPorts: 55001...55002, listen: listen)
        var tickets: [SessionTracker.Ticket] = []
        for i in 0..<5000 {
            let client = IPAddress.v4(0x0a61_0000 + UInt32(i)), agent = SocketAddress(ip: .v4(0x0a60_0000 + UInt32(i)), port: 4172)
            tickets.append(try tracker.start(client: client, agent: agent, sessionID: "s\(i)").get())
        }
        // A second client of agent 0 takes the first collaboration port, a third the next; a fourth is refused.
        let agent0 = SocketAddress(ip: .v4(0x0a60_0000), port: 4172)
        let b = try tracker.start(client: .v4(0x0b00_0001), agent: agent0, sessionID: "b").get()
        let c = try tracker.start(client: .v4(0x0b00_0002), agent: agent0, sessionID: "c").get()
        #expect(refusal(tracker.start(client: .v4(0x0b00_0003), agent: agent0, sessionID: "d")) == .agentBusy)
        #expect(tracker.bindingCount == 5002 && tracker.active == 5002)
        // Each client address's flows are routed to its own path: agent i from AgentSourcePort, agent 0's later clients from the collaboration ports.
        for i in stride(from: 0, to: 5000, by: 7) {
            let route = tracker.route(client: SocketAddress(ip: .v4(0x0a61_0000 + UInt32(i)), port: 9000), rule: "sg-udp")
            #expect(route == DatagramRoute(target: SocketAddress(ip: .v4(0x0a60_0000 + UInt32(i)), port: 4172), sourcePort: 55000))
        }
        #expect(tracker.route(client: SocketAddress(ip: .v4(0x0b00_0002), port: 9000), rule: "sg-udp") == DatagramRoute(target: agent0, sourcePort: 55002))
        #expect(tracker.route(client: SocketAddress(ip: .v4(0x0b00_0003), port: 9000), rule: "sg-udp") == nil, "the refused client has no route")
        // Agent 0's first client leaves: its port is free again for the next client.
        tracker.end(tickets[0])
        let e = try tracker.start(client: .v4(0x0b00_0004), agent: agent0, sessionID: "e").get()
        #expect(tracker.bindings.first { $0.client == .v4(0x0b00_0004) }?.sourcePort == 55000)
        for ticket in tickets.dropFirst() + [b, c, e] { tracker.end(ticket) }
        #expect(tracker.active == 0 && tracker.bindingCount == 0 && tracker.bindings.isEmpty)
    }
}
