import Foundation
import NetfilterKernel
import SystemLayer
import Testing
import TestSupport

/// A netlink message of a batch, read back: type, flags, attributes.
struct NetlinkMessage {
    var type: UInt16
    var flags: UInt16
    /// The payload after the 4-byte nfgenmsg.
    var attributes: [(type: UInt16, value: [UInt8])]

    static func parse(_ bytes: [UInt8]) -> [NetlinkMessage] {
        var messages: [NetlinkMessage] = []
        var offset = 0
        while offset + 16 <= bytes.count {
            let length = Int(u32(bytes, offset))
            guard length >= 16, offset + length <= bytes.count else { break }
            let type = u16(bytes, offset + 4), flags = u16(bytes, offset + 6)
            messages.append(NetlinkMessage(type: type, flags: flags, attributes: attributes(Array(bytes[(offset + 20)..<(offset + length)]))))
            offset += (length + 3) & ~3
        }
        return messages
    }

    static func attributes(_ bytes: [UInt8]) -> [(type: UInt16, value: [UInt8])] {
        var result: [(UInt16, [UInt8])] = []
        var offset = 0
        while offset + 4 <= bytes.count {
            let length = Int(u16(bytes, offset))
            guard length >= 4, offset + length <= bytes.count else { break }
            result.append((u16(bytes, offset + 2) & 0x3FFF, Array(bytes[(offset + 4)..<(offset + length)])))
            offset += (length + 3) & ~3
        }
        return result
    }

    func attribute(_ type: UInt16) -> [UInt8]? { attributes.first { $0.type == type }?.value }

    static func u16(_ b: [UInt8], _ i: Int) -> UInt16 { UInt16(b[i]) | UInt16(b[i + 1]) << 8 }
    static func u32(_ b: [UInt8], _ i: Int) -> UInt32 { UInt32(b[i]) | UInt32(b[i + 1]) << 8 | UInt32(b[i + 2]) << 16 | UInt32(b[i + 3]) << 24 }
}

func string(_ bytes: [UInt8]?) -> String { String(decoding: (bytes ?? []).prefix { $0 != 0 }, as: UTF8.self) }

@Suite("Kernel path: the netlink bytes a change produces (no kernel)", .offPool)
struct KernelBatchBytesTests {
    static let batchBegin: UInt16 = 16, batchEnd: UInt16 = 17
    static func nft(_ message: UInt16) -> UInt16 { 10 << 8 | message }   // NFNL_SUBSYS_NFTABLES
    static let newTable: UInt16 = 0, newChain: UInt16 = 3, newRule: UInt16 = 6, newSet: UInt16 = 9, newElement: UInt16 = 12, deleteElement: UInt16 = 14
    let client = KernelForward(client: IPAddress("198.51.100.7")!, publicAddress: IPAddress("203.0.113.1")!, transport: .tcp, port: 3389,
                               target: SocketAddress("10.1.0.5:3389")!)
    let open = KernelForward(client: nil, publicAddress: IPAddress("203.0.113.1")!, transport: .udp, port: 21001,
                             target: SocketAddress("10.1.0.6:4000")!)

    /// The attributes of the first element of a NEWSETELEM/DELSETELEM message.
    static func firstElement(_ message: NetlinkMessage) throws -> [(type: UInt16, value: [UInt8])] {
        let list = try #require(message.attribute(3), "no element list")
        let first = try #require(NetlinkMessage.attributes(list).first?.value, "no element")
        return NetlinkMessage.attributes(first)
    }

    @Test("adding a forward: one batch, its map element and its counter element, each with the key, target and timeout")
    func add() throws {
        let messages = NetlinkMessage.parse(KernelTable(name: "rdgw").batchBytes([.add(client, timeoutMilliseconds: 300_000)]))
        #expect(messages.map(\.type) == [Self.batchBegin, Self.nft(Self.newElement), Self.nft(Self.newElement), Self.batchEnd])
        let map = messages[1], traffic = messages[2]
        #expect(map.flags & 0x0400 != 0 && map.flags & 0x0200 != 0 && map.flags & 0x0004 != 0, "NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK")
        #expect(string(map.attribute(1)) == "rdgw" && string(map.attribute(2)) == "dnat_client")
        #expect(string(traffic.attribute(2)) == "traffic_client")
        #expect(traffic.flags & 0x0400 != 0 && traffic.flags & 0x0200 == 0, "the counter: NLM_F_CREATE without NLM_F_EXCL (kept if there)")
        let element = try Self.firstElement(map)
        let key = NetlinkMessage.attributes(try #require(element.first { $0.type == 1 }?.value)).first?.value
        #expect(key == [198, 51, 100, 7, 203, 0, 113, 1, 6, 0, 0, 0, 0x0D, 0x3D, 0, 0], "client . public . tcp . 3389")
        let data = NetlinkMessage.attributes(try #require(element.first { $0.type == 2 }?.value)).first?.value
        #expect(data == [10, 1, 0, 5, 0x0D, 0x3D, 0, 0], "10.1.0.5 . 3389")
        let timeout = try #require(element.first { $0.type == 4 }?.value)
        #expect(timeout == [0, 0, 0, 0, 0, 0x04, 0x93, 0xE0], "300000 ms, big endian")
    }

    @Test("removing a forward: its two elements, by key; an open forward's key has no client")
    func remove() throws {
        let messages = NetlinkMessage.parse(KernelTable(name: "gw").batchBytes([.remove(open)]))
        #expect(messages.map(\.type) == [Self.batchBegin, Self.nft(Self.deleteElement), Self.nft(Self.deleteElement), Self.batchEnd])
        #expect(string(messages[1].attribute(2)) == "dnat_open" && string(messages[2].attribute(2)) == "traffic_open")
        let element = try Self.firstElement(messages[1])
        let key = NetlinkMessage.attributes(try #require(element.first { $0.type == 1 }?.value)).first?.value
        #expect(key == [203, 0, 113, 1, 17, 0, 0, 0, 0x52, 0x09, 0, 0], "public . udp . 21001")
        #expect(element.first { $0.type == 2 } == nil && element.first { $0.type == 4 } == nil)
    }

    @Test("creating the table: the table, five sets, three base chains, five rules and the public addresses, in one batch")
    func creation() {
        let messages = NetlinkMessage.parse(KernelTable(name: "rdgw").creationBytes(publics: [IPAddress("203.0.113.1")!]))
        let types = messages.map(\.type)
        #expect(types.first == Self.batchBegin && types.last == Self.batchEnd)
        #expect(types.filter { $0 == Self.nft(Self.newTable) }.count == 1)
        #expect(types.filter { $0 == Self.nft(Self.newSet) }.count == 5)
        #expect(types.filter { $0 == Self.nft(Self.newChain) }.count == 3)
        #expect(types.filter { $0 == Self.nft(Self.newRule) }.count == 5)
        #expect(types.filter { $0 == Self.nft(Self.newElement) }.count == 1)
        let sets = messages.filter { $0.type == Self.nft(Self.newSet) }.map { string($0.attribute(2)) }
        #expect(sets == ["publics", "dnat_open", "dnat_client", "traffic_open", "traffic_client"])
        let chains = messages.filter { $0.type == Self.nft(Self.newChain) }.map { string($0.attribute(3)) }
        #expect(chains == ["prerouting", "postrouting", "forward"])
    }
}

/// A network namespace for one test, entered by the test's own thread.
final class NamespaceFixture {
    let name: String
    init() throws {
        try #require(FileManager.default.isExecutableFile(atPath: "/usr/sbin/nft"),
                     "nft is missing (Debian package nftables; scripts/install-deps test installs it)")
        name = "rdgw-kt-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let made = try ChildProcess.run("/usr/sbin/ip", ["netns", "add", name])
        guard made.status == 0 else { throw TimedOut("ip netns add \(name): \(made.stderr)", seconds: 0) }
        try SystemThread.enterNetworkNamespace(path: "/var/run/netns/\(name)")
    }

    /// `nft ARGS` inside the namespace.
    func nft(_ arguments: [String]) throws -> ChildProcess.Finished {
        try ChildProcess.run("/usr/sbin/ip", ["netns", "exec", name, "/usr/sbin/nft"] + arguments)
    }

    func remove() { _ = try? ChildProcess.run("/usr/sbin/ip", ["netns", "del", name]) }
}

@Suite("Kernel path: the table in a namespace of the test's own", .serialized, .offPool)
struct KernelTableLiveTests {
    /// Root only (namespaces); as root a missing nft fails the test loudly, it is not skipped.
    static let runnable: Bool = getuid() == 0

    @Test("install, add, read back with counters, remove, a failed batch changes nothing, other tables untouched, delete",
          .enabled(if: runnable, "needs root (network namespaces, CAP_NET_ADMIN)"))
    func lifecycle() throws {
        let ns = try NamespaceFixture()
        defer { ns.remove() }
        // Somebody else's table must survive everything below.
        #expect(try ns.nft(["add", "table", "ip", "other"]).status == 0)
        #expect(try ns.nft(["add", "chain", "ip", "other", "c", "{ type filter hook input priority 0; }"]).status == 0)
        let before = try ns.nft(["list", "table", "ip", "other"]).stdout
        let table = KernelTable(name: "rdgw-test")
        #expect(try !table.exists())
        let a = KernelForward(client: nil, publicAddress: IPAddress("203.0.113.1")!, transport: .tcp, port: 21001,
                              target: SocketAddress("10.1.0.5:3389")!)
        let b = KernelForward(client: IPAddress("198.51.100.7")!, publicAddress: IPAddress("203.0.113.1")!, transport: .udp, port: 4000,
                              target: SocketAddress("10.1.0.6:4000")!)
        try table.replace(publics: [IPAddress("203.0.113.1")!], forwards: [(a, timeoutMilliseconds: 600_000)])
        #expect(try table.exists())
        let listing = try ns.nft(["list", "table", "inet", "rdgw-test"]).stdout
        #expect(listing.contains("dnat ip to ip daddr . meta l4proto . th dport map @dnat_open"), "\(listing)")
        #expect(listing.contains("masquerade"), "\(listing)")
        try table.apply([.add(b, timeoutMilliseconds: nil)])
        let forwards = try table.forwards()
        #expect(Set(forwards.map(\.forward)) == [a, b])
        #expect(forwards.first { $0.forward == a }?.timeoutMilliseconds == 600_000)
        #expect(forwards.first { $0.forward == b }?.timeoutMilliseconds == 0)
        // A batch with one bad change (b again: it exists) applies nothing of it.
        let c = KernelForward(client: nil, publicAddress: IPAddress("203.0.113.1")!, transport: .tcp, port: 21002,
                              target: SocketAddress("10.1.0.7:22")!)
        #expect(throws: NetfilterError.self) { try table.apply([.add(c, timeoutMilliseconds: nil), .add(b, timeoutMilliseconds: nil)]) }
        #expect(Set(try table.forwards().map(\.forward)) == [a, b], "the failed batch added nothing")
        // Someone deletes only b's map element: putting b back keeps its counter element and succeeds.
        #expect(try ns.nft(["delete", "element", "inet", "rdgw-test", "dnat_client", "{ 198.51.100.7 . 203.0.113.1 . udp . 4000 }"]).status == 0)
        #expect(Set(try table.forwards().map(\.forward)) == [a])
        try table.apply([.add(b, timeoutMilliseconds: nil)])
        #expect(Set(try table.forwards().map(\.forward)) == [a, b])
        try table.apply([.remove(a)])
        #expect(try table.forwards().map(\.forward) == [b])
        // The installed table is replaced whole, atomically.
        try table.replace(publics: [IPAddress("203.0.113.1")!], forwards: [(c, timeoutMilliseconds: nil)])
        #expect(try table.forwards().map(\.forward) == [c])
        #expect(try ns.nft(["list", "table", "ip", "other"]).stdout == before, "another table was touched")
        try table.delete()
        #expect(try !table.exists())
        #expect(try ns.nft(["list", "table", "ip", "other"]).stdout == before)
    }

    @Test("the kernel expires an element at its timeout",
          .enabled(if: runnable, "needs root (network namespaces, CAP_NET_ADMIN)"))
    func expiry() throws {
        let ns = try NamespaceFixture()
        defer { ns.remove() }
        let table = KernelTable(name: "rdgw-test")
        let forward = KernelForward(client: nil, publicAddress: IPAddress("203.0.113.1")!, transport: .tcp, port: 21001,
                                    target: SocketAddress("10.1.0.5:3389")!)
        try table.replace(publics: [IPAddress("203.0.113.1")!], forwards: [(forward, timeoutMilliseconds: 1500)])
        #expect(try table.forwards().count == 1)
        #expect(eventually { (try? table.forwards().isEmpty) == true }, "the element did not expire")
        try table.delete()
    }
}

@Suite("Kernel path: the host checks (capability, sysctls)", .offPool)
struct KernelChecksTests {
    @Test("CAP_NET_ADMIN is read from CapEff")
    func capability() {
        #expect(KernelChecks.hasNetAdmin(status: "Name:\tx\nCapEff:\t000001ffffffffff\n") == true)
        #expect(KernelChecks.hasNetAdmin(status: "CapEff:\t0000000000000000\n") == false)
        #expect(KernelChecks.hasNetAdmin(status: "CapEff:\t0000000000001000\n") == true, "bit 12 alone")
        #expect(KernelChecks.hasNetAdmin(status: "nothing here") == nil)
    }

    @Test("ip_forward off is an error naming the sysctl; a small nf_conntrack_max a warning naming it")
    func sysctls() {
        func reader(_ files: [String: String]) -> (String) -> String? { { files[$0] } }
        let off = KernelChecks.sysctls(wantedFlows: 1000, read: reader(["/proc/sys/net/ipv4/ip_forward": "0\n",
                                                                        "/proc/sys/net/netfilter/nf_conntrack_max": "262144\n"]))
        #expect(off.errors.count == 1 && off.errors[0].contains("net.ipv4.ip_forward is 0") && off.warnings.isEmpty)
        let small = KernelChecks.sysctls(wantedFlows: 100_000, read: reader(["/proc/sys/net/ipv4/ip_forward": "1\n",
                                                                             "/proc/sys/net/netfilter/nf_conntrack_max": "65536\n",
                                                                             "/proc/sys/net/netfilter/nf_conntrack_count": "65000\n"]))
        #expect(small.errors.isEmpty)
        #expect(small.warnings.contains { $0.contains("net.netfilter.nf_conntrack_max is 65536") })
        #expect(small.warnings.contains { $0.contains("nf_conntrack_count is 65000") })
        let unreadable = KernelChecks.sysctls(wantedFlows: 1, read: reader([:]))
        #expect(unreadable.errors.first?.contains("net.ipv4.ip_forward cannot be read") == true)
    }
}
