import Foundation
import SystemLayer

/// How long a test waits for something that should happen: generous, because
/// the suite must pass on a loaded machine (CI beside other builds, or
/// `scripts/test --stress`). A wait returns as soon as its condition holds,
/// so the deadline costs nothing when things work; only a failure waits it
/// out. `RDG_TEST_DEADLINE` (seconds) overrides it.
public enum TestDeadline {
    public static let seconds: Double = {
        if let text = ProcessInfo.processInfo.environment["RDG_TEST_DEADLINE"], let value = Double(text), value > 0 {
            return value
        }
        return 60
    }()

    /// `seconds` for a single wait on a descriptor (poll's timeout).
    public static var milliseconds: Int32 { Int32(seconds * 1000) }
}

/// A wait that ran out: names what was awaited and for how long.
public struct TimedOut: Error, CustomStringConvertible {
    public let description: String
    public init(_ what: String, seconds: Double) {
        description = "\(what): not within \(Int(seconds)) s"
    }
}

/// Polls `condition` every 5 ms until it holds or `seconds` pass (never a
/// fixed sleep, never a timing assertion). Blocks the calling thread: call
/// it from a test running `.offPool`.
/// - Returns: whether the condition held.
@discardableResult
public func eventually(_ seconds: Double = TestDeadline.seconds, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = MonotonicClock.nowNanoseconds + UInt64(seconds * 1e9)
    while MonotonicClock.nowNanoseconds < deadline {
        if try condition() { return true }
        BlockingWait.sleep(milliseconds: 5)
    }
    return try condition()
}

/// `eventually` for async conditions: polls every 20 ms, suspending between polls.
@discardableResult
public func eventuallyAsync(_ seconds: Double = TestDeadline.seconds,
                            _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = MonotonicClock.nowNanoseconds + UInt64(seconds * 1e9)
    while MonotonicClock.nowNanoseconds < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return try await condition()
}

/// Waits for something a test needs before it can go on (a server
/// listening, a process started).
/// - Throws: `TimedOut` naming `what` when it does not happen in time.
public func waitUntil(_ what: @autoclosure () -> String, within seconds: Double = TestDeadline.seconds,
                      _ condition: () throws -> Bool) throws {
    guard try eventually(seconds, condition) else { throw TimedOut(what(), seconds: seconds) }
}

/// `waitUntil` for async conditions.
public func waitUntilAsync(_ what: @autoclosure () -> String, within seconds: Double = TestDeadline.seconds,
                           _ condition: () async throws -> Bool) async throws {
    guard try await eventuallyAsync(seconds, condition) else { throw TimedOut(what(), seconds: seconds) }
}
