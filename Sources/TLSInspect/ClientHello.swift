/// Reads a TLS ClientHello as it arrives, without terminating TLS, to learn
/// the server name (SNI) a client asks for. The Security Gateway feeds it the
/// first bytes of a connection, in whatever pieces TCP delivers them, and
/// replays every byte to the agent afterwards, so the agent sees the client's
/// own handshake.
///
/// Pure code: no sockets, no allocation beyond the bytes it keeps; every
/// length is checked before it is used, and the total it will buffer is
/// bounded (`maxBytes`), so hostile input can neither crash it nor make it
/// grow.
public struct ClientHelloReader: Sendable {
    /// What the bytes so far amount to.
    public enum Outcome: Sendable, Equatable {
        /// Not enough bytes yet: feed more.
        case needMore
        /// A complete ClientHello; `serverName` is nil when it carries no SNI.
        case complete(ClientHello)
        /// Not a ClientHello this gateway will accept; the reason names the field.
        case rejected(ClientHelloError)
    }

    /// The most bytes it buffers before giving up (`tooLarge`).
    public let maxBytes: Int
    /// Every byte fed so far, to be replayed to the agent.
    public private(set) var buffered: [UInt8] = []
    private var outcome: Outcome = .needMore
    /// Nothing can change before this many bytes are buffered: parsing again
    /// earlier is skipped, so a ClientHello fed one byte at a time costs a
    /// few parses per record, not one per byte.
    private var waitFor = 1

    public init(maxBytes: Int = 16 * 1024) {
        self.maxBytes = maxBytes
        buffered.reserveCapacity(min(maxBytes, 2048))
    }

    /// Adds bytes as they arrive and says whether the ClientHello is complete.
    /// After `.complete` or `.rejected` further bytes are kept for replay but
    /// do not change the outcome.
    public mutating func feed(_ bytes: some Collection<UInt8>) -> Outcome {
        guard case .needMore = outcome else {
            buffered.append(contentsOf: bytes)
            return outcome
        }
        buffered.append(contentsOf: bytes)
        guard buffered.count >= waitFor || buffered.count >= maxBytes else { return .needMore }
        let (result, needed) = ClientHelloParser.parseStep(buffered, maxBytes: maxBytes)
        outcome = result
        waitFor = needed
        return outcome
    }

    /// Parses a whole buffer at once (tests, fuzzing).
    public static func parse(_ bytes: [UInt8], maxBytes: Int = 16 * 1024) -> Outcome {
        ClientHelloParser.parse(bytes, maxBytes: maxBytes)
    }
}

/// What a ClientHello told.
public struct ClientHello: Sendable, Equatable {
    /// The host name of the server_name extension, lower-cased; nil without SNI.
    public let serverName: String?
    /// The record-layer bytes that made up the ClientHello (records included).
    public let length: Int
    /// Offered ALPN protocols, if any (for logs).
    public let alpn: [String]

    public init(serverName: String?, length: Int, alpn: [String]) {
        self.serverName = serverName
        self.length = length
        self.alpn = alpn
    }
}

/// Why a ClientHello was not accepted.
public enum ClientHelloError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The first byte is not a TLS handshake record (22): not TLS at all.
    case notTLS(firstByte: UInt8)
    /// A record header with an impossible version or length.
    case badRecord(String)
    /// The first handshake message is not a ClientHello (type 1).
    case notClientHello(type: UInt8)
    /// A length or field inside the ClientHello is inconsistent.
    case malformed(String)
    /// The server_name extension is malformed, empty, too long or not a host name.
    case badServerName(String)
    /// More than `maxBytes` would be needed.
    case tooLarge(limit: Int)

    public var description: String {
        switch self {
        case .notTLS(let b): "not TLS: the first byte is \(b), not a handshake record (22)"
        case .badRecord(let why): "bad TLS record: \(why)"
        case .notClientHello(let t): "the first handshake message is type \(t), not a ClientHello (1)"
        case .malformed(let why): "malformed ClientHello: \(why)"
        case .badServerName(let why): "bad server_name (SNI): \(why)"
        case .tooLarge(let limit): "the ClientHello is larger than \(limit) bytes"
        }
    }
}

enum ClientHelloParser {
    /// RFC 8446 §5.1: a record's plaintext is at most 2^14 bytes.
    static let maxRecord = 1 << 14

    static func parse(_ bytes: [UInt8], maxBytes: Int) -> ClientHelloReader.Outcome {
        parseStep(bytes, maxBytes: maxBytes).outcome
    }

    /// The outcome, and when it is `.needMore`, how many buffered bytes are
    /// needed before another parse can tell more.
    static func parseStep(_ bytes: [UInt8], maxBytes: Int) -> (outcome: ClientHelloReader.Outcome, needed: Int) {
        // 1. Reassemble the handshake message from as many records as needed.
        var handshake: [UInt8] = []
        var offset = 0
        var needed: Int?  // the handshake message's full length, once known
        while true {
            if let total = needed, handshake.count >= total { break }
            // The record type is judged as soon as its byte is here, so
            // garbage is refused at its first byte.
            if bytes.count > offset, bytes[offset] != 22 {
                let type = bytes[offset]
                return offset == 0 ? (.rejected(.notTLS(firstByte: type)), 0)
                                   : (.rejected(.badRecord("record type \(type) inside the ClientHello, expected 22")), 0)
            }
            guard bytes.count - offset >= 5 else {
                if bytes.count >= maxBytes { return (.rejected(.tooLarge(limit: maxBytes)), 0) }
                // The next record's type byte is judged alone, as soon as it comes.
                return (.needMore, bytes.count == offset ? offset + 1 : offset + 5)
            }
            guard bytes[offset + 1] == 3, bytes[offset + 2] <= 4 else {
                return (.rejected(.badRecord("version \(bytes[offset + 1]).\(bytes[offset + 2]) is not 3.0-3.4")), 0)
            }
            let length = Int(bytes[offset + 3]) << 8 | Int(bytes[offset + 4])
            guard length > 0, length <= maxRecord else {
                return (.rejected(.badRecord("record length \(length) is not 1-\(maxRecord)")), 0)
            }
            guard offset + 5 + length <= maxBytes else { return (.rejected(.tooLarge(limit: maxBytes)), 0) }
            guard bytes.count >= offset + 5 + length else { return (.needMore, offset + 5 + length) }
            handshake.append(contentsOf: bytes[(offset + 5)..<(offset + 5 + length)])
            offset += 5 + length
            if needed == nil, handshake.count >= 4 {
                guard handshake[0] == 1 else { return (.rejected(.notClientHello(type: handshake[0])), 0) }
                let messageLength = Int(handshake[1]) << 16 | Int(handshake[2]) << 8 | Int(handshake[3])
                guard messageLength >= 38 else { return (.rejected(.malformed("handshake length \(messageLength) is too short for a ClientHello")), 0) }
                guard 4 + messageLength + 5 <= maxBytes else { return (.rejected(.tooLarge(limit: maxBytes)), 0) }
                needed = 4 + messageLength
            } else if needed == nil, !handshake.isEmpty, handshake[0] != 1 {
                return (.rejected(.notClientHello(type: handshake[0])), 0)
            }
        }
        // 2. The ClientHello body (RFC 8446 §4.1.2), every length checked.
        var reader = ByteReader(handshake, from: 4, to: needed!)
        do throws(ClientHelloError) {
            _ = try reader.bytes(2, "legacy_version")
            _ = try reader.bytes(32, "random")
            let sessionID = try reader.uint8("session_id length")
            guard sessionID <= 32 else { throw .malformed("session_id length \(sessionID) is over 32") }
            _ = try reader.bytes(Int(sessionID), "session_id")
            let suites = try reader.uint16("cipher_suites length")
            guard suites >= 2, suites % 2 == 0 else { throw .malformed("cipher_suites length \(suites) is not a positive even number") }
            _ = try reader.bytes(Int(suites), "cipher_suites")
            let compression = try reader.uint8("compression_methods length")
            guard compression >= 1 else { throw .malformed("no compression method") }
            _ = try reader.bytes(Int(compression), "compression_methods")
            var serverName: String?
            var alpn: [String] = []
            if reader.remaining > 0 {
                let extensionsLength = Int(try reader.uint16("extensions length"))
                guard extensionsLength == reader.remaining else {
                    throw .malformed("extensions length \(extensionsLength) does not match the \(reader.remaining) bytes left")
                }
                var seen = Set<UInt16>()
                while reader.remaining > 0 {
                    let type = try reader.uint16("extension type")
                    let length = Int(try reader.uint16("extension length"))
                    let body = try reader.bytes(length, "extension \(type)")
                    guard seen.insert(type).inserted else { throw .malformed("extension \(type) appears twice") }
                    switch type {
                    case 0: serverName = try parseServerName(body)
                    case 16: alpn = try parseALPN(body)
                    default: break
                    }
                }
            }
            guard reader.remaining == 0 else { throw .malformed("\(reader.remaining) bytes after the extensions") }
            return (.complete(ClientHello(serverName: serverName, length: offset, alpn: alpn)), 0)
        } catch {
            return (.rejected(error), 0)
        }
    }

    /// RFC 6066 §3: a list holding one host_name (type 0) of 1-255 bytes.
    static func parseServerName(_ body: ArraySlice<UInt8>) throws(ClientHelloError) -> String {
        do throws(ClientHelloError) {
            return try parseServerNameList(body)
        } catch {
            // Cut-short fields inside the extension are SNI problems too.
            if case .malformed(let why) = error { throw .badServerName(why) }
            throw error
        }
    }

    private static func parseServerNameList(_ body: ArraySlice<UInt8>) throws(ClientHelloError) -> String {
        var reader = ByteReader(Array(body), from: 0, to: body.count)
        let listLength = Int(try reader.uint16("server_name_list length"))
        guard listLength == reader.remaining, listLength >= 3 else {
            throw .badServerName("server_name_list length \(listLength) does not match the extension")
        }
        var hostName: String?
        while reader.remaining > 0 {
            let nameType = try reader.uint8("name_type")
            let length = Int(try reader.uint16("host_name length"))
            guard length <= reader.remaining else { throw .badServerName("host_name length \(length) runs past the extension") }
            let name = try reader.bytes(length, "host_name")
            guard nameType == 0 else { continue }  // unknown name types are ignored (RFC 6066)
            guard hostName == nil else { throw .badServerName("more than one host_name") }
            guard length >= 1 else { throw .badServerName("empty host_name") }
            guard length <= 255 else { throw .badServerName("host_name of \(length) bytes is over 255") }
            guard name.allSatisfy(isHostNameByte), name.first != UInt8(ascii: "."), name.first != UInt8(ascii: "-") else {
                throw .badServerName("host_name holds characters a DNS name cannot")
            }
            hostName = String(decoding: name, as: UTF8.self).lowercased()
        }
        guard let hostName else { throw .badServerName("no host_name entry") }
        return hostName
    }

    static func parseALPN(_ body: ArraySlice<UInt8>) throws(ClientHelloError) -> [String] {
        var reader = ByteReader(Array(body), from: 0, to: body.count)
        let listLength = Int(try reader.uint16("ALPN list length"))
        guard listLength == reader.remaining else { throw .malformed("ALPN list length \(listLength) does not match the extension") }
        var names: [String] = []
        while reader.remaining > 0 {
            let length = Int(try reader.uint8("ALPN name length"))
            guard length >= 1 else { throw .malformed("empty ALPN protocol name") }
            names.append(String(decoding: try reader.bytes(length, "ALPN name"), as: UTF8.self))
        }
        return names
    }

    @inline(__always)
    static func isHostNameByte(_ b: UInt8) -> Bool {
        (b >= 0x61 && b <= 0x7A) || (b >= 0x41 && b <= 0x5A) || (b >= 0x30 && b <= 0x39)
            || b == UInt8(ascii: "-") || b == UInt8(ascii: ".") || b == UInt8(ascii: "_")
    }
}

/// Bounds-checked reading of big-endian fields.
struct ByteReader {
    private let bytes: [UInt8]
    private var position: Int
    private let end: Int

    init(_ bytes: [UInt8], from start: Int, to end: Int) {
        self.bytes = bytes
        position = start
        self.end = min(end, bytes.count)
    }

    var remaining: Int { end - position }

    mutating func uint8(_ field: String) throws(ClientHelloError) -> UInt8 {
        guard remaining >= 1 else { throw .malformed("\(field) is cut short") }
        defer { position += 1 }
        return bytes[position]
    }

    mutating func uint16(_ field: String) throws(ClientHelloError) -> UInt16 {
        guard remaining >= 2 else { throw .malformed("\(field) is cut short") }
        defer { position += 2 }
        return UInt16(bytes[position]) << 8 | UInt16(bytes[position + 1])
    }

    mutating func bytes(_ count: Int, _ field: String) throws(ClientHelloError) -> ArraySlice<UInt8> {
        guard count >= 0, remaining >= count else { throw .malformed("\(field) runs past the end (\(count) bytes, \(remaining) left)") }
        defer { position += count }
        return bytes[position..<(position + count)]
    }
}
