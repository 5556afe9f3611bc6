@testable import BrokerPostgres
import Synchronization
import Testing
import TestSupport

/// The PostgreSQL store's call timeout: one ticker for every call.
@Suite("Call watchdog")
struct CallWatchdogTests {
    struct Refused: Error, Equatable {}

    @Test("a call within its limit returns its value or its own error; one past it is cancelled and reported as expired")
    func expiry() async throws {
        let watchdog = CallWatchdog(limit: .milliseconds(200), tick: .milliseconds(20))
        defer { watchdog.stop() }
        #expect(try await watchdog.run { 42 } == 42)
        await #expect(throws: Refused.self) { try await watchdog.run { throw Refused() } }

        let sawCancellation = Mutex(false)
        do {
            _ = try await watchdog.run {
                do {
                    try await Task.sleep(for: .seconds(TestDeadline.seconds))
                } catch {
                    sawCancellation.withLock { $0 = true }
                    throw error
                }
                return 0
            }
            Issue.record("a call that outlived its limit returned")
        } catch {
            #expect(error is CallWatchdog.Expired, "\(error)")
        }
        #expect(sawCancellation.withLock { $0 }, "the call itself was cancelled, not only abandoned")
        // Later calls are unaffected.
        #expect(try await watchdog.run { "after" } == "after")
    }

    @Test("cancelling the caller cancels the call, which is not reported as expired")
    func callerCancelled() async throws {
        let watchdog = CallWatchdog(limit: .seconds(TestDeadline.seconds * 2))
        defer { watchdog.stop() }
        let started = Mutex(false)
        let caller = Task {
            try await watchdog.run {
                started.withLock { $0 = true }
                try await Task.sleep(for: .seconds(TestDeadline.seconds * 2))
                return 0
            }
        }
        try await waitUntilAsync("the call to start") { started.withLock { $0 } }
        caller.cancel()
        do {
            _ = try await caller.value
            Issue.record("a cancelled call returned")
        } catch {
            #expect(error is CancellationError, "\(error)")
        }
    }
}
