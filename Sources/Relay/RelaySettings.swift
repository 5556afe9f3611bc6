import SystemLayer

/// Engine-wide settings; rules carry what varies per forward.
public struct RelaySettings: Sendable, Equatable {
    /// Event-loop threads (default: one per core).
    public var loops: Int
    /// MaxConnections for the whole process.
    public var maxConnections: Int
    /// MaxConnections per listener when a rule does not set one.
    public var maxConnectionsPerListener: Int
    /// How long a connect to a target may take.
    public var connectTimeoutNanoseconds: UInt64
    /// Keepalive and TCP_USER_TIMEOUT on both sockets of every connection.
    public var liveness: Liveness
    /// Capacity asked for each pipe (the kernel may grant less).
    public var pipeSize: Int
    /// Pipes across all loops; beyond it, connections copy through memory.
    public var maxPipes: Int
    /// Empty pipes kept per loop for reuse.
    public var idlePipesPerLoop: Int
    /// The accept queue of each listening socket.
    public var listenBacklog: Int32
    /// How long after establishment the upstream socket gets its keepalive
    /// settings (0: at once). See `RelayConnection.becomeEstablished`.
    public var livenessDelayNanoseconds: UInt64 = 1_000_000_000
    /// UDP flows for the whole process; new flows beyond it are refused.
    public var maxFlows: Int = 10_000
    /// UDP flows per listener when a rule does not set its own.
    public var maxFlowsPerListener: Int = 10_000
    /// SO_RCVBUF / SO_SNDBUF for UDP sockets (0: the kernel's default, which
    /// holds only a few hundred small datagrams: a burst arriving while the
    /// loop is busy would be dropped). The kernel caps them at
    /// net.core.rmem_max / wmem_max. A limit, not an allocation.
    public var udpReceiveBuffer: Int = 4 << 20
    public var udpSendBuffer: Int = 4 << 20
    /// Datagrams per recvmmsg/sendmmsg call (1-64).
    public var udpBatch: Int = 32
    /// Send runs of equal-sized datagrams of one flow as one UDP GSO send
    /// (UDP_SEGMENT); turned off by itself where the system refuses it.
    public var udpSegmentation = true

    public init(loops: Int = RelaySettings.coreCount, maxConnections: Int = 10_000, maxConnectionsPerListener: Int = 10_000,
                connectTimeoutNanoseconds: UInt64 = 5_000_000_000, liveness: Liveness = Liveness(),
                pipeSize: Int = 256 * 1024, maxPipes: Int = 1024, idlePipesPerLoop: Int = 16, listenBacklog: Int32 = 4096) {
        self.loops = loops
        self.maxConnections = maxConnections
        self.maxConnectionsPerListener = maxConnectionsPerListener
        self.connectTimeoutNanoseconds = connectTimeoutNanoseconds
        self.liveness = liveness
        self.pipeSize = pipeSize
        self.maxPipes = maxPipes
        self.idlePipesPerLoop = idlePipesPerLoop
        self.listenBacklog = listenBacklog
    }

    /// Online CPUs.
    public static var coreCount: Int { max(1, SystemInfo.onlineCores) }
}
