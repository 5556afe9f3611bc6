import Logging
import SystemLayer

/// A loop's logger that writes at most one line per second for each kind of
/// repeated event (refusals, connect failures), and says how many it held back.
final class RateLimitedLog {
    enum Kind: Int, CaseIterable { case refusal, connectFailure, descriptors }

    let logger: Logger
    private var lastLine: [UInt64]
    private var suppressed: [Int]
    private let interval: UInt64 = 1_000_000_000

    init(logger: Logger) {
        self.logger = logger
        lastLine = Array(repeating: 0, count: Kind.allCases.count)
        suppressed = Array(repeating: 0, count: Kind.allCases.count)
    }

    /// - Parameter metadata: the event's fields (client, target, rule,
    ///   reason), journal fields under systemd; built only when written.
    func limited(_ kind: Kind, _ message: @autoclosure () -> String, _ metadata: @autoclosure () -> Logger.Metadata = [:]) {
        let now = MonotonicClock.nowNanoseconds
        let i = kind.rawValue
        if lastLine[i] != 0 && now &- lastLine[i] < interval {
            suppressed[i] += 1
            return
        }
        lastLine[i] = now
        let held = suppressed[i]
        suppressed[i] = 0
        logger.warning("\(message())\(held > 0 ? " (\(held) more like this in the last second)" : "")", metadata: metadata())
    }
}
