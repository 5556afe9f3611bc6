import SystemLayer

/// One socket, with what goes with it, that a running relay hands to its
/// successor in a hot upgrade (`RelayEngine.suspendForHandover`,
/// `RelayEngine.adopt`). Plain data: the descriptors travel beside it, in the
/// order `descriptors` says.
public struct HandoverRecord: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        case tcpListener = "tcp_listener"
        case udpListener = "udp_listener"
        case connection
        case flow
    }

    public var kind: Kind
    /// The loop it lived on: for listeners, which of an address's
    /// SO_REUSEPORT sockets it is (a UDP client's datagrams keep reaching the
    /// same one, so its flow must stay with it).
    public var loop: Int
    /// The listening address (of the listener, or of the connection's or flow's rule).
    public var listen: String
    /// Listener and flow: 1 (the socket). Connection: 2 (client, upstream)
    /// plus 2 (read end, write end) for each direction with bytes in a pipe,
    /// toward the target first.
    public var descriptors: Int
    public var rule: String?
    public var target: String?
    public var client: String?
    public var connection: ConnectionState?
    public var flow: FlowState?

    public struct ConnectionState: Codable, Sendable, Equatable {
        /// False while the upstream connect is still in progress.
        public var established: Bool
        /// How long ago it was accepted.
        public var ageNanoseconds: UInt64
        public var idleTimeoutNanoseconds: UInt64?
        /// The client sent bytes while the connect was in progress.
        public var clientSpokeDuringConnect: Bool
        public var toTarget: DirectionState
        public var toClient: DirectionState
    }

    /// One direction of a connection at the moment it was suspended.
    public struct DirectionState: Codable, Sendable, Equatable {
        public var delivered: UInt64
        /// Bytes read from the source and not yet written: in the pipe that
        /// travels with the record, or in `memory`.
        public var inFlight: Int
        public var sourceEnded: Bool
        public var finished: Bool
        /// The in-flight bytes are in a pipe (two descriptors) of this capacity.
        public var pipeCapacity: Int?
        /// The in-flight bytes held in memory (splice fallback), base64.
        public var memory: String?
        public var spliceUnsupported: Bool
        public var fellBack: Bool
        public var closeFollows: Bool
    }

    public struct FlowState: Codable, Sendable, Equatable {
        /// The address the client sent to (wildcard listeners).
        public var local: String?
        public var sourcePort: UInt16?
        public var idleNanoseconds: UInt64
        public var datagramsToTarget: Int
        public var bytesToTarget: Int
        public var datagramsToClient: Int
        public var bytesToClient: Int
    }

    public init(kind: Kind, loop: Int, listen: String, descriptors: Int, rule: String? = nil, target: String? = nil,
                client: String? = nil, connection: ConnectionState? = nil, flow: FlowState? = nil) {
        self.kind = kind
        self.loop = loop
        self.listen = listen
        self.descriptors = descriptors
        self.rule = rule
        self.target = target
        self.client = client
        self.connection = connection
        self.flow = flow
    }
}

/// A record with its descriptors (ours until handed over or closed).
public struct HandedSocket: Sendable {
    public var record: HandoverRecord
    public var descriptors: [FileDescriptor]

    public init(record: HandoverRecord, descriptors: [FileDescriptor]) {
        self.record = record
        self.descriptors = descriptors
    }
}

/// Why a relay cannot hand over, or cannot take what it was handed.
public struct HandoverError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// What `RelayEngine.adopt` took.
public struct AdoptionReport: Sendable, Equatable {
    public var connections = 0
    public var flows = 0
    /// Records that could not be taken (each closed), with the reason.
    public var refused: [String] = []
}

/// Base64 for in-flight bytes held in memory (no Foundation in the relay).
enum HandoverBase64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static func encode(_ bytes: UnsafeRawBufferPointer) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i < bytes.count {
            let b0 = UInt32(bytes[i])
            let b1 = i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0
            let b2 = i + 2 < bytes.count ? UInt32(bytes[i + 2]) : 0
            let n = b0 << 16 | b1 << 8 | b2
            out.append(alphabet[Int(n >> 18 & 63)])
            out.append(alphabet[Int(n >> 12 & 63)])
            out.append(i + 1 < bytes.count ? alphabet[Int(n >> 6 & 63)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? alphabet[Int(n & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ text: String) -> [UInt8]? {
        var values: [UInt8] = []
        values.reserveCapacity(text.utf8.count)
        var padding = 0
        for c in text.utf8 {
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): values.append(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): values.append(c - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): values.append(c - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "+"): values.append(62)
            case UInt8(ascii: "/"): values.append(63)
            case UInt8(ascii: "="): padding += 1; values.append(0)
            default: return nil
            }
        }
        guard values.count % 4 == 0, padding <= 2 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(values.count / 4 * 3)
        var i = 0
        while i < values.count {
            let n = UInt32(values[i]) << 18 | UInt32(values[i + 1]) << 12 | UInt32(values[i + 2]) << 6 | UInt32(values[i + 3])
            out.append(UInt8(n >> 16 & 0xFF))
            out.append(UInt8(n >> 8 & 0xFF))
            out.append(UInt8(n & 0xFF))
            i += 4
        }
        out.removeLast(padding)
        return out
    }
}
