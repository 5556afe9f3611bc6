import BrokerCore
import Foundation
import Logging
import ServiceLifecycle

/// Marks gateways offline when no heartbeat came for `offlineAfter`: a sweep
/// every quarter of that (at most every 5 s), so a gateway is shown offline
/// at most a quarter late. Choosing a gateway does not wait for the sweep: it
/// checks the last heartbeat itself (`Gateway.isLive`).
struct GatewayOfflineMonitor: Service {
    let store: any BrokerStore
    let offlineAfter: TimeInterval
    let clock: @Sendable () -> Date
    let logger: Logger

    var sweepInterval: Duration {
        .milliseconds(Int64(max(50, min(offlineAfter * 250, 5000))))
    }

    func run() async throws {
        try? await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                try await Task.sleep(for: sweepInterval)
                do {
                    let cutoff = clock().addingTimeInterval(-offlineAfter)
                    for id in try await store.markGatewaysOffline(heartbeatBefore: cutoff) {
                        logger.warning("gateway \(id) is offline: no heartbeat for \(Int(offlineAfter)) s")
                    }
                } catch {
                    logger.error("cannot mark silent gateways offline: \(error)")
                }
            }
        }
    }
}
