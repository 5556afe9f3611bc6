import ControlProtocol
import NetfilterKernel
import Relay
import SystemLayer

/// How pushed rules map onto the kernel path's forwards (no kernel here:
/// pure functions, tested without one).
///
/// - `kernel` rules: one forward per transport, open to anyone (method 0)
///   or to the rule's client only (methods 1 and 2), expiring in the kernel
///   at `unused_expiry_s` until the rule is first used, then without expiry.
/// - `offload` rules: a forward per transport for each client the userspace
///   relay admitted, without expiry; the rule's listener stays for the rest.
/// - `userspace` rules: none.
public enum KernelRules {
    /// The forwards `rule` holds in the kernel.
    public static func forwards(_ rule: RuleState, publicAddress: IPAddress) -> [KernelForward] {
        guard let target = SocketAddress(rule.push.target) else { return [] }
        let transports: [KernelForward.Transport] = switch rule.push.protocol {
        case .tcp: [.tcp]
        case .udp: [.udp]
        case .both: [.tcp, .udp]
        }
        guard let port = UInt16(exactly: rule.port) else { return [] }
        let destination = SocketAddress(ip: target.ip.unmapped, port: target.port)
        var clients: [IPAddress?]
        switch rule.forwardingPath {
        case .userspace:
            return []
        case .kernel:
            if rule.push.method == .randomPort {
                clients = [nil]
            } else {
                guard let client = rule.push.clientIP.flatMap(IPAddress.init)?.unmapped else { return [] }
                clients = [client]
            }
        case .offload:
            clients = (rule.offloaded ?? []).compactMap { IPAddress($0)?.unmapped }
        }
        var result: [KernelForward] = []
        for client in clients {
            for transport in transports {
                result.append(KernelForward(client: client, publicAddress: publicAddress, transport: transport, port: port,
                                            target: destination))
            }
        }
        return result
    }

    /// The kernel expiry of a `kernel` rule's forwards: what is left of its
    /// `unused_expiry_s` (at least 1 s) while it was never used, nil after.
    public static func timeoutMilliseconds(_ rule: RuleState, now: Int64, defaultExpiry: Int) -> UInt64? {
        guard rule.forwardingPath == .kernel, rule.lastUsed == nil else { return nil }
        let left = rule.created + Int64(rule.push.unusedExpirySeconds ?? defaultExpiry) - now
        return UInt64(max(1, left)) * 1000
    }

    /// Why a push cannot take the kernel path, or nil: the path carries IPv4 only.
    static func refusal(_ checked: RulePolicy.Checked, settings: ControlSettings) -> ControlError? {
        guard checked.target.ip.unmapped.isIPv4 else {
            return .badField("target", "the kernel path carries IPv4 only; \(checked.target) is IPv6 (use forwarding_path userspace)")
        }
        if let client = checked.client, !client.isIPv4 {
            return .badField("client_ip", "the kernel path carries IPv4 only; \(client) is IPv6 (use forwarding_path userspace)")
        }
        guard settings.publicAddress.unmapped.isIPv4, !settings.publicAddress.isUnspecified else {
            return ControlError(409, field: "forwarding_path", "forwarding_path: the kernel path needs a specific IPv4 public_address in the gateway's config, not \(settings.publicAddress)")
        }
        return nil
    }
}

extension NetfilterError {
    /// As a control-plane answer: 500 naming the kernel path.
    var controlError: ControlError {
        ControlError(500, field: "forwarding_path", "kernel path: \(self)")
    }
}
