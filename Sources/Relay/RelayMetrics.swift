import ServiceSupport

/// The relay's figures for `GET /metrics`, read at scrape time: the loops'
/// relaxed atomic counters and, through one command per loop, their per-rule
/// tables. Nothing on the data path is updated for metrics.
public enum RelayMetrics {
    /// Writes the relay's families. Waits for every loop: call it off
    /// Swift's cooperative threads (as `ServiceMetrics.exposition` is).
    /// - Returns: the counters it read, for a caller that adds families of its own.
    @discardableResult
    public static func write(_ engine: RelayEngine, into text: inout PrometheusText) -> RelayStats {
        let stats = engine.stats()
        text.single("relay_connections_accepted_total", .counter, help: "TCP connections accepted by the relay.", stats.accepted)
        text.family("relay_connections_refused_total", .counter, help: "TCP connections refused at accept, by reason (inspection:<label> for an inspector's refusal).")
        for reason in RefusalReason.allCases {
            text.sample("relay_connections_refused_total", [("reason", reason.rawValue)], stats.refused[reason, default: 0])
        }
        for (label, count) in stats.inspectionRefusals.sorted(by: { $0.key < $1.key }) {
            text.sample("relay_connections_refused_total", [("reason", "inspection:\(label)")], count)
        }
        text.single("relay_connections_active", .gauge, help: "TCP connections open now.", stats.active)
        text.single("relay_connections_established_total", .counter, help: "TCP connections whose upstream connect succeeded.", stats.established)
        text.single("relay_connections_closed_total", .counter, help: "TCP connections closed.", stats.closed)
        text.family("relay_connect_failures_total", .counter, help: "Upstream connects that failed, by reason.")
        text.sample("relay_connect_failures_total", [("reason", "refused")], stats.connectRefused)
        text.sample("relay_connect_failures_total", [("reason", "timeout")], stats.connectTimedOut)
        text.sample("relay_connect_failures_total", [("reason", "other")], stats.connectOtherFailure)
        text.family("relay_connections_ended_total", .counter, help: "TCP connections ended by the relay, by cause.")
        text.sample("relay_connections_ended_total", [("cause", "reset")], stats.resets)
        text.sample("relay_connections_ended_total", [("cause", "idle")], stats.idleClosed)
        text.sample("relay_connections_ended_total", [("cause", "revoked")], stats.revoked)
        text.single("relay_splice_fallbacks_total", .counter, help: "Connections that fell back from splice to copying.", stats.spliceFallbacks)
        text.single("relay_pipes_in_use", .gauge, help: "Kernel pipes held for splice (pooled or in use).", stats.pipesOpen)
        text.single("relay_pipes_limit", .gauge, help: "MaxPipes: the pipes the relay may hold.", engine.pipeBudget.limit)
        text.family("relay_admission_limit", .gauge, help: "Admission limits: MaxConnections (TCP) and MaxFlows (UDP).")
        text.sample("relay_admission_limit", [("kind", "connections")], engine.admission.global.limit)
        text.sample("relay_admission_limit", [("kind", "flows")], engine.flowAdmission.global.limit)
        text.family("relay_admission_in_use", .gauge, help: "Admission slots in use: TCP connections and UDP flows.")
        text.sample("relay_admission_in_use", [("kind", "connections")], engine.admission.global.active)
        text.sample("relay_admission_in_use", [("kind", "flows")], engine.flowAdmission.global.active)

        let tcp = engine.tcpTraffic().sorted { $0.key < $1.key }
        text.family("relay_rule_connections_accepted_total", .counter, help: "TCP connections accepted per rule since it was installed.")
        for (rule, traffic) in tcp { text.sample("relay_rule_connections_accepted_total", [("rule", rule)], traffic.accepted) }
        text.family("relay_rule_connections_active", .gauge, help: "TCP connections open now per rule.")
        for (rule, traffic) in tcp { text.sample("relay_rule_connections_active", [("rule", rule)], traffic.active) }
        text.family("relay_rule_bytes_total", .counter, help: "TCP bytes relayed per rule and direction (closed connections plus live ones so far).")
        for (rule, traffic) in tcp {
            text.sample("relay_rule_bytes_total", [("rule", rule), ("direction", "to_target")], traffic.bytesToTarget)
            text.sample("relay_rule_bytes_total", [("rule", rule), ("direction", "to_client")], traffic.bytesToClient)
        }

        let udp = engine.datagramStats().sorted { $0.key < $1.key }
        text.family("relay_udp_datagrams_total", .counter, help: "UDP datagrams relayed per rule and direction.")
        for (rule, stats) in udp where !rule.isEmpty {
            text.sample("relay_udp_datagrams_total", [("rule", rule), ("direction", "to_target")], stats.datagramsToTarget)
            text.sample("relay_udp_datagrams_total", [("rule", rule), ("direction", "to_client")], stats.datagramsToClient)
        }
        text.family("relay_udp_bytes_total", .counter, help: "UDP payload bytes relayed per rule and direction.")
        for (rule, stats) in udp where !rule.isEmpty {
            text.sample("relay_udp_bytes_total", [("rule", rule), ("direction", "to_target")], stats.bytesToTarget)
            text.sample("relay_udp_bytes_total", [("rule", rule), ("direction", "to_client")], stats.bytesToClient)
        }
        text.family("relay_udp_drops_total", .counter, help: "UDP datagrams dropped per rule and reason (rule \"\" for senders no rule allows).")
        for (rule, stats) in udp {
            for reason in DatagramDrop.allCases where stats.drops[reason, default: 0] > 0 || !rule.isEmpty {
                text.sample("relay_udp_drops_total", [("rule", rule), ("reason", reason.rawValue)], stats.drops[reason, default: 0])
            }
        }
        text.family("relay_udp_flows_active", .gauge, help: "UDP flows live now per rule.")
        for (rule, stats) in udp where !rule.isEmpty { text.sample("relay_udp_flows_active", [("rule", rule)], stats.flowsActive) }
        text.family("relay_udp_flows_created_total", .counter, help: "UDP flows created per rule.")
        for (rule, stats) in udp where !rule.isEmpty { text.sample("relay_udp_flows_created_total", [("rule", rule)], stats.flowsCreated) }
        return stats
    }
}
