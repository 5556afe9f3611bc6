import Foundation
import Synchronization
import SystemLayer

/// Ports for tests that must name a port before anything listens on it (a
/// rule's listen address, a daemon's config). Binding port 0 and closing
/// hands out a port from the kernel's ephemeral range, which any outgoing
/// connection of a parallel test may take before the test binds it again
/// (seen under strace: "address already in use"). These come from below
/// that range, where only explicit binds land; each is handed out once per
/// process, from a start that differs between processes, and is checked
/// free for TCP and UDP on 127.0.0.1 before it is returned.
public enum TestPorts {
    private static let next: Mutex<Int> = {
        let span = range.upperBound - range.lowerBound
        return Mutex(range.lowerBound + Int(getpid()) * 97 % span)
    }()

    /// 23,000 up to the start of the ephemeral range (32,768 by default):
    /// above the port ranges tests give a gateway for pushed rules
    /// (20,001-22,000), whose allocator binds ports of its own choosing.
    static let range: Range<Int> = {
        let text = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8)) ?? ""
        let low = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first.flatMap { Int($0) } ?? 32768
        return 23_000..<max(low, 25_000)
    }()

    /// A port free on 127.0.0.1 for both TCP and UDP at this moment.
    public static func free() -> UInt16 {
        for _ in 0..<(range.upperBound - range.lowerBound) {
            let port = next.withLock { value -> Int in
                let port = value
                value = value + 1 >= range.upperBound ? range.lowerBound : value + 1
                return port
            }
            if isFree(UInt16(port)) { return UInt16(port) }
        }
        fatalError("TestPorts: no free port in \(range)")
    }

    /// `count` consecutive ports, each free on 127.0.0.1 for TCP and UDP at
    /// this moment, and all handed out together, for a config that names a
    /// port and derives the next ones from it (a fixed UDP source port whose
    /// collaboration flows take the ports after it). `free()` alone hands out
    /// only the first: a parallel test could get the second and find it taken
    /// by this test's relay (seen in CI: "cannot listen ... address already in
    /// use").
    public static func freeBlock(_ count: Int) -> ClosedRange<UInt16> {
        precondition(count > 0 && count < 100)
        for _ in 0..<(range.upperBound - range.lowerBound) {
            let first = next.withLock { value -> Int in
                if value + count > range.upperBound { value = range.lowerBound }
                let first = value
                value = value + count >= range.upperBound ? range.lowerBound : value + count
                return first
            }
            if (first..<(first + count)).allSatisfy({ isFree(UInt16($0)) }) {
                return UInt16(first)...UInt16(first + count - 1)
            }
        }
        fatalError("TestPorts: no \(count) free ports in a row in \(range)")
    }

    /// `free()` as a 127.0.0.1 address.
    public static func freeAddress() -> SocketAddress {
        SocketAddress(ip: .v4(0x7f00_0001), port: free())
    }

    private static func isFree(_ port: UInt16) -> Bool {
        let address = SocketAddress(ip: .v4(0x7f00_0001), port: port)
        guard let tcp = try? Socket.listen(on: address, reusePort: false, backlog: 1) else { return false }
        defer { tcp.close() }
        guard let udp = try? Socket.bindUDP(address, reusePort: false) else { return false }
        udp.close()
        return true
    }
}
