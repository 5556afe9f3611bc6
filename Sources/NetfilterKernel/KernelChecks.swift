import SystemLayer

/// What the kernel path needs of the host, checked before the gateway
/// touches the table: the capability, IP forwarding, conntrack room.
public enum KernelChecks {
    /// CAP_NET_ADMIN's bit in the capability sets.
    static let netAdminBit = 12

    /// Whether the process holds CAP_NET_ADMIN in its effective set (from
    /// `/proc/self/status`); nil when that cannot be read.
    public static func hasNetAdmin(status: String? = readText("/proc/self/status")) -> Bool? {
        guard let status else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("CapEff:") {
            let hex = line.dropFirst("CapEff:".count).trimmingCharacters(in: " \t")
            guard let value = UInt64(hex, radix: 16) else { return nil }
            return value & (1 << UInt64(netAdminBit)) != 0
        }
        return nil
    }

    /// A refusal naming the capability, or nil when the process has it.
    public static func capabilityProblem() -> String? {
        guard hasNetAdmin() == false else { return nil }
        return "the kernel path needs CAP_NET_ADMIN (to change nftables and conntrack), and this process does not have it: run the gateway as root, or give it the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN; otherwise setcap cap_net_admin+ep on the binary), or set kernel_path = off"
    }

    /// What the host's sysctls say: errors stop the kernel path, warnings are logged.
    public struct SysctlReport: Sendable, Equatable {
        public var errors: [String] = []
        public var warnings: [String] = []
    }

    /// Checks `net.ipv4.ip_forward` (must be 1: the kernel path routes
    /// packets between interfaces) and `net.netfilter.nf_conntrack_max`
    /// (every kernel flow is a conntrack entry: warned below `flows`).
    /// - Parameter read: reads a /proc/sys file (tests give their own).
    public static func sysctls(wantedFlows flows: Int,
                               read: (String) -> String? = { readText($0) }) -> SysctlReport {
        var report = SysctlReport()
        let forward = read("/proc/sys/net/ipv4/ip_forward")?.trimmingCharacters(in: " \n")
        switch forward {
        case "1":
            break
        case nil:
            report.errors.append("net.ipv4.ip_forward cannot be read (/proc/sys/net/ipv4/ip_forward): the kernel path needs IP forwarding on")
        default:
            report.errors.append("net.ipv4.ip_forward is \(forward!): the kernel path routes packets from clients to desktops and needs it on (sysctl -w net.ipv4.ip_forward=1, and in /etc/sysctl.d to keep it), or set kernel_path = off")
        }
        if let text = read("/proc/sys/net/netfilter/nf_conntrack_max")?.trimmingCharacters(in: " \n"), let max = Int(text) {
            if max < flows {
                report.warnings.append("net.netfilter.nf_conntrack_max is \(max): the kernel path carries at most that many flows (with every other flow of this host), fewer than max_flows + max_connections = \(flows); raise it (sysctl -w net.netfilter.nf_conntrack_max=\(flows))")
            }
            if let countText = read("/proc/sys/net/netfilter/nf_conntrack_count")?.trimmingCharacters(in: " \n"),
               let count = Int(countText), count * 10 >= max * 9 {
                report.warnings.append("net.netfilter.nf_conntrack_count is \(count) of nf_conntrack_max \(max): new flows are dropped when it is full")
            }
        } else {
            report.warnings.append("net.netfilter.nf_conntrack_max cannot be read yet (nf_conntrack loads with the table); check it with sysctl net.netfilter.nf_conntrack_max")
        }
        return report
    }

    public static func readText(_ path: String) -> String? {
        guard let bytes = try? StateFile.read(path, limit: 1 << 16) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String {
        String(drop { set.contains($0) }.reversed().drop { set.contains($0) }.reversed())
    }
}

extension String {
    fileprivate func trimmingCharacters(in set: String) -> String { self[...].trimmingCharacters(in: set) }
}
