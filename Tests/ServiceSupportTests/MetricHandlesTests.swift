import CoreMetrics
@testable import ServiceSupport
import Testing
import TestSupport

/// Handles made once per label and dimensions, and what they count reaches
/// the exposition.
@Suite("Metric handles", .offPool)
struct MetricHandlesTests {
    @Test("once bootstrapped, the same label and dimensions give the same handle; others another; counts reach /metrics")
    func kept() throws {
        ServiceMetrics.shared.bootstrap()
        let a = MetricHandles.counter("test_handles_total", [("method", "PUT"), ("status", "201")])
        let again = MetricHandles.counter("test_handles_total", [("method", "PUT"), ("status", "201")])
        let other = MetricHandles.counter("test_handles_total", [("method", "PUT"), ("status", "409")])
        #expect(a === again && a !== other)
        // The dimensions' order and pairing are part of the key.
        #expect(MetricHandles.counter("test_handles_total", [("status", "201"), ("method", "PUT")]) !== a)
        #expect(MetricHandles.timer("test_handles_seconds", [("method", "PUT")]) === MetricHandles.timer("test_handles_seconds", [("method", "PUT")]))
        a.increment()
        again.increment()
        MetricHandles.timer("test_handles_seconds", [("method", "PUT")]).recordNanoseconds(150_000)
        let text = String(decoding: ServiceMetrics.shared.exposition(), as: UTF8.self)
        #expect(text.contains(#"test_handles_total{method="PUT",status="201"} 2"#), "\(text)")
        #expect(text.contains(#"test_handles_seconds_count{method="PUT"} 1"#), "\(text)")
    }
}
