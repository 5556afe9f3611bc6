import Synchronization

/// What the Connection Manager knows of its Security Gateways: the list in
/// failover order, and for each its health and load as last checked. The
/// choice for a new session is pure: healthy gateways, fewest active
/// sessions first, the configured order breaking ties.
public final class GatewayPool: Sendable {
    public struct Health: Sendable, Equatable {
        public var healthy: Bool
        /// Active sessions at the last check.
        public var activeSessions: Int
        /// Why it is unhealthy (or nil).
        public var problem: String?
        /// When it was last checked (nil: never yet).
        public var checkedAt: Double?

        public init(healthy: Bool, activeSessions: Int, problem: String?, checkedAt: Double?) {
            self.healthy = healthy
            self.activeSessions = activeSessions
            self.problem = problem
            self.checkedAt = checkedAt
        }

        public static let unknown = Health(healthy: false, activeSessions: 0, problem: "not checked yet", checkedAt: nil)
    }

    public struct Member: Sendable, Equatable {
        public var gateway: SecurityGatewayAddress
        public var health: Health
    }

    private let state: Mutex<[Member]>

    public init(_ gateways: [SecurityGatewayAddress]) {
        state = Mutex(gateways.map { Member(gateway: $0, health: .unknown) })
    }

    public var members: [Member] { state.withLock { $0 } }

    /// Replaces the list (a reload), keeping what is known of gateways that stay.
    public func replace(with gateways: [SecurityGatewayAddress]) {
        state.withLock { members in
            let known = Dictionary(members.map { ($0.gateway.control.description, $0.health) }, uniquingKeysWith: { a, _ in a })
            members = gateways.map { Member(gateway: $0, health: known[$0.control.description] ?? .unknown) }
        }
    }

    /// Records a check of the gateway whose control endpoint is `control`.
    public func record(_ control: SocketAddressText, _ health: Health) {
        state.withLock { members in
            for index in members.indices where members[index].gateway.control.description == control {
                members[index].health = health
            }
        }
    }

    /// A failed call to it: unhealthy until the next good check.
    public func markFailed(_ control: SocketAddressText, _ problem: String, now: Double) {
        state.withLock { members in
            for index in members.indices where members[index].gateway.control.description == control {
                members[index].health.healthy = false
                members[index].health.problem = problem
                members[index].health.checkedAt = now
            }
        }
    }

    /// One more session placed on it (until the next check counts it).
    public func countSession(_ control: SocketAddressText) {
        state.withLock { members in
            for index in members.indices where members[index].gateway.control.description == control {
                members[index].health.activeSessions += 1
            }
        }
    }

    /// The healthy gateways in the order a new session tries them.
    public func choose() -> [SecurityGatewayAddress] {
        Self.order(state.withLock { $0 })
    }

    /// The order of `members` for a new session (pure).
    public static func order(_ members: [Member]) -> [SecurityGatewayAddress] {
        members.enumerated()
            .filter { $0.element.health.healthy }
            .sorted { a, b in
                a.element.health.activeSessions != b.element.health.activeSessions
                    ? a.element.health.activeSessions < b.element.health.activeSessions
                    : a.offset < b.offset
            }
            .map(\.element.gateway)
    }

    /// This host's own gateway, when it has one.
    public var local: Member? { state.withLock { $0.first { $0.gateway.local } } }
}

/// A control endpoint as text (`host:port`), the pool's key.
public typealias SocketAddressText = String
