import CoreMetrics
import Prometheus
import Synchronization
import SystemLayer

/// The process's metrics, served as `GET /metrics` in the Prometheus text
/// exposition format by each daemon's control listener.
///
/// Two kinds of figures: events counted as they happen (rule pushes and
/// their latency, grants, broker API requests) go through swift-metrics into
/// a Prometheus registry; the relay's counters are read at scrape time by
/// collectors (the loops' own relaxed atomics and per-loop tables), so the
/// data path never takes a lock for metrics.
public final class ServiceMetrics: Sendable {
    public static let shared = ServiceMetrics()

    public let registry = PrometheusCollectorRegistry()
    private let collectors = Mutex<(next: Int, all: [(id: Int, write: @Sendable (inout PrometheusText) -> Void)])>((0, []))
    private let bootstrapped = Atomic<Bool>(false)

    public init() {}

    /// Whether `bootstrap()` has run: swift-metrics records into `registry`.
    public var isBootstrapped: Bool { bootstrapped.load(ordering: .acquiring) }

    /// Makes swift-metrics record into `registry` (once per process; later calls do nothing).
    public func bootstrap() {
        guard bootstrapped.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.nameAndLabelSanitizer = { name, labels in
            (PrometheusText.sanitize(name), labels.map { (PrometheusText.sanitize($0.0), $0.1) })
        }
        // Rule pushes and control calls take tens of microseconds to tens of milliseconds.
        factory.defaultDurationHistogramBuckets = [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .microseconds(2500),
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5),
        ]
        MetricsSystem.bootstrap(factory)
    }

    /// Adds figures read at scrape time.
    /// - Returns: an id for `removeCollector` (a test whose engine stops).
    @discardableResult
    public func addCollector(_ collector: @escaping @Sendable (inout PrometheusText) -> Void) -> Int {
        collectors.withLock { state in
            state.next += 1
            state.all.append((state.next, collector))
            return state.next
        }
    }

    public func removeCollector(_ id: Int) {
        collectors.withLock { $0.all.removeAll { $0.id == id } }
    }

    /// The exposition text. Collectors may wait for event loops: call it off
    /// Swift's cooperative threads (`BlockingExecutor`).
    public func exposition() -> [UInt8] {
        var text = PrometheusText()
        for collector in collectors.withLock({ $0.all }) { collector.write(&text) }
        var bytes = registry.emitToBuffer()
        bytes.append(contentsOf: text.bytes)
        return bytes
    }

    /// `exposition()` for an HTTP handler: read on `BlockingExecutor`'s
    /// threads, never on Swift's cooperative ones.
    public func scrape() async -> [UInt8] {
        await BlockingExecutor.shared.run { self.exposition() }
    }

    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"
}

/// Writes metric families in the Prometheus text exposition format (0.0.4).
public struct PrometheusText: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public enum Kind: String, Sendable {
        case counter, gauge
    }

    /// Starts a family: its HELP and TYPE lines.
    public mutating func family(_ name: String, _ kind: Kind, help: String) {
        append("# HELP \(name) \(Self.escape(help, quotes: false))\n")
        append("# TYPE \(name) \(kind.rawValue)\n")
    }

    /// One sample of the current family.
    public mutating func sample(_ name: String, _ labels: [(String, String)] = [], _ value: Int) {
        sample(name, labels, String(value))
    }

    public mutating func sample(_ name: String, _ labels: [(String, String)] = [], _ value: Double) {
        sample(name, labels, value.isFinite ? "\(value)" : (value.isNaN ? "NaN" : (value > 0 ? "+Inf" : "-Inf")))
    }

    private mutating func sample(_ name: String, _ labels: [(String, String)], _ value: String) {
        if labels.isEmpty {
            append("\(name) \(value)\n")
        } else {
            let pairs = labels.map { "\($0.0)=\"\(Self.escape($0.1))\"" }.joined(separator: ",")
            append("\(name){\(pairs)} \(value)\n")
        }
    }

    /// A family with one sample.
    public mutating func single(_ name: String, _ kind: Kind, help: String, _ value: Int) {
        family(name, kind, help: help)
        sample(name, [], value)
    }

    private mutating func append(_ string: String) {
        bytes.append(contentsOf: string.utf8)
    }

    /// The exposition format's escapes: backslash and line feed, and in a
    /// label value (`quotes`) the double quote. Byte by byte, so the line
    /// feed of a CRLF is escaped too and cannot end the line.
    static func escape(_ value: String, quotes: Bool = true) -> String {
        ByteEscape.apply(value) { byte in
            switch byte {
            case 0x5C: ByteEscape.backslash("\\")
            case 0x0A: ByteEscape.backslash("n")
            case 0x22 where quotes: ByteEscape.backslash("\"")
            default: nil
            }
        }
    }

    /// A valid metric or label name: `[a-zA-Z_:][a-zA-Z0-9_:]*` (dots and
    /// dashes of swift-metrics labels become underscores).
    public static func sanitize(_ name: String) -> String {
        var out = String(name.map { c -> Character in
            (c.isASCII && (c.isLetter || c.isNumber || c == "_" || c == ":")) ? c : "_"
        })
        if out.first?.isNumber ?? true { out = "_" + out }
        return out
    }
}

/// swift-metrics handles made once per label and dimensions. Making a
/// `Counter` or `Timer` for every event asks the factory each time (its
/// lock, the name and labels sanitized into new strings, the registry
/// searched): 3.3 % of the gateway's CPU per rule push (perf, issue 15).
/// Handles are kept only once `ServiceMetrics.shared` is bootstrapped, so a
/// no-op one made before then is never kept; at most `limit` of each kind
/// are kept (label values come from requests).
public enum MetricHandles {
    private struct Key: Hashable {
        let label: String
        let dimensions: [String]

        init(_ label: String, _ dimensions: [(String, String)]) {
            self.label = label
            self.dimensions = dimensions.flatMap { [$0.0, $0.1] }
        }
    }

    static let limit = 1_000
    private static let counters = Mutex<[Key: CoreMetrics.Counter]>([:])
    private static let timers = Mutex<[Key: CoreMetrics.Timer]>([:])

    public static func counter(_ label: String, _ dimensions: [(String, String)] = []) -> CoreMetrics.Counter {
        handle(label, dimensions, in: counters) { CoreMetrics.Counter(label: label, dimensions: dimensions) }
    }

    public static func timer(_ label: String, _ dimensions: [(String, String)] = []) -> CoreMetrics.Timer {
        handle(label, dimensions, in: timers) { CoreMetrics.Timer(label: label, dimensions: dimensions) }
    }

    private static func handle<H: AnyObject & Sendable>(_ label: String, _ dimensions: [(String, String)], in cache: borrowing Mutex<[Key: H]>,
                                                        make: () -> H) -> H {
        guard ServiceMetrics.shared.isBootstrapped else { return make() }
        let key = Key(label, dimensions)
        if let kept = cache.withLock({ $0[key] }) { return kept }
        let made = make()
        cache.withLock { kept in
            if kept.count < limit { kept[key] = made }
        }
        return made
    }
}
