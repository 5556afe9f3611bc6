import Foundation
import GatewayControl
import Relay
import ServiceSupport
import SystemLayer
import Testing
import TestSupport

/// `GET /metrics` on the control endpoint: rule pushes counted by method and
/// status with a latency histogram (swift-metrics into the Prometheus
/// registry), and the relay's figures read at scrape time.
@Suite(.serialized, .offPool) struct MetricsEndpointTests {
    @Test("pushes are counted by method and status, timed, and the relay's per-rule figures follow the traffic")
    func pushesAndTraffic() async throws {
        ServiceMetrics.shared.bootstrap()
        let gateway = try await TestGateway.start()
        let echo = try TCPEcho()
        defer { echo.stop() }
        let engine = gateway.engine
        let collector = ServiceMetrics.shared.addCollector { text in RelayMetrics.write(engine, into: &text) }
        defer { ServiceMetrics.shared.removeCollector(collector) }
        let result: Void? = try await offPool {
            let reply = try gateway.put("m-1", "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"\(echo.address)\"}")
            #expect(reply.status == 201, "\(reply.text)")
            let port = try #require(reply.object["port"] as? Int)
            #expect(echoThrough(port: port) == "hello through the gateway")
            #expect(try gateway.put("m-bad", "{\"protocol\":\"tcp\",\"method\":7}").status == 400)

            // Unsigned, like /health.
            let metrics = try BlockingHTTP.request(method: "GET", host: "127.0.0.1", port: gateway.port, path: "/metrics",
                                                   headers: [], body: [], timeoutMilliseconds: TestDeadline.milliseconds)
            #expect(metrics.status == 200)
            #expect(metrics.header("Content-Type")?.hasPrefix("text/plain; version=0.0.4") == true)
            let text = metrics.text
            // Other suites of this process may push rules at the same time
            // (the registry is process-wide): at least this test's pushes.
            #expect((value(text, #"gateway_rule_pushes_total{method="PUT",status="201"}"#) ?? 0) >= 1, "\(text)")
            #expect((value(text, #"gateway_rule_pushes_total{method="PUT",status="400"}"#) ?? 0) >= 1)
            #expect((value(text, #"gateway_rule_push_duration_seconds_bucket{method="PUT",le="+Inf"}"#) ?? 0) >= 2)
            #expect((value(text, #"gateway_rule_push_duration_seconds_count{method="PUT"}"#) ?? 0) >= 2)
            // The echo's 25 bytes each way, once its connection closed.
            let bytes = #"relay_rule_bytes_total{rule="broker:m-1",direction="to_target"} 25"#
            #expect(eventually {
                let again = try? BlockingHTTP.request(method: "GET", host: "127.0.0.1", port: gateway.port, path: "/metrics",
                                                      headers: [], body: [], timeoutMilliseconds: TestDeadline.milliseconds)
                return again?.text.contains(bytes) == true
            }, "\(bytes) in /metrics")
            #expect(text.contains(#"relay_rule_connections_accepted_total{rule="broker:m-1"} 1"#))
            return ()
        }
        #expect(result != nil)
        await gateway.stop()
    }
}

/// The value of the sample `series` (name and labels, as written) in an exposition text.
private func value(_ text: String, _ series: String) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
        return Double(line.dropFirst(series.count + 1))
    }
    return nil
}
