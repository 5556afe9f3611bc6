import Foundation
import Testing
import TLSInspect
import TestSupport

/// Builds ClientHello records field by field, so that every length can be
/// made wrong on purpose.
struct HelloBuilder {
    var sessionID = [UInt8](repeating: 7, count: 32)
    var suites: [UInt8] = [0x13, 0x01, 0x13, 0x02]
    var compression: [UInt8] = [0]
    var extensions: [(UInt16, [UInt8])] = []
    var recordVersion: [UInt8] = [3, 1]

    static func sni(_ name: [UInt8], type: UInt8 = 0) -> [UInt8] {
        let entry = [type] + be16(name.count) + name
        return be16(entry.count) + entry
    }

    static func be16(_ n: Int) -> [UInt8] { [UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] }
    static func be24(_ n: Int) -> [UInt8] { [UInt8(truncatingIfNeeded: n >> 16), UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] }

    var body: [UInt8] {
        var b: [UInt8] = [3, 3] + [UInt8](repeating: 0xAB, count: 32)
        b += [UInt8(sessionID.count)] + sessionID
        b += HelloBuilder.be16(suites.count) + suites
        b += [UInt8(compression.count)] + compression
        if !extensions.isEmpty {
            var e: [UInt8] = []
            for (type, data) in extensions { e += HelloBuilder.be16(Int(type)) + HelloBuilder.be16(data.count) + data }
            b += HelloBuilder.be16(e.count) + e
        }
        return b
    }

    var handshake: [UInt8] { [1] + HelloBuilder.be24(body.count) + body }

    /// The handshake split into records of at most `recordSize` bytes.
    func records(recordSize: Int = 16384) -> [UInt8] {
        var out: [UInt8] = []
        var rest = handshake[...]
        while !rest.isEmpty {
            let chunk = rest.prefix(recordSize)
            out += [22] + recordVersion + HelloBuilder.be16(chunk.count) + chunk
            rest = rest.dropFirst(chunk.count)
        }
        return out
    }
}

@Suite("ClientHello reader", .offPool)
struct ClientHelloTests {
    func withSNI(_ name: String) -> HelloBuilder {
        var b = HelloBuilder()
        b.extensions = [(0, HelloBuilder.sni(Array(name.utf8))), (16, HelloBuilder.be16(3) + [2] + Array("h2".utf8))]
        return b
    }

    @Test("a ClientHello with SNI, whole, across many records, and one byte at a time")
    func pieces() {
        let builder = withSNI("Agent-7.Example.COM")
        for bytes in [builder.records(), builder.records(recordSize: 5), builder.records(recordSize: 1)] {
            guard case .complete(let hello) = ClientHelloReader.parse(bytes) else {
                Issue.record("not complete: \(ClientHelloReader.parse(bytes))")
                continue
            }
            #expect(hello.serverName == "agent-7.example.com" && hello.length == bytes.count && hello.alpn == ["h2"])
            // Fed one byte at a time, it needs every byte and no more.
            var reader = ClientHelloReader()
            for (i, byte) in bytes.enumerated() {
                let outcome = reader.feed([byte])
                if i < bytes.count - 1 { #expect(outcome == .needMore) } else { #expect(outcome == .complete(hello)) }
            }
            // Bytes after the ClientHello are kept for replay and change nothing.
            #expect(reader.feed([1, 2, 3]) == .complete(hello))
            #expect(reader.buffered == bytes + [1, 2, 3])
        }
    }

    @Test("no SNI, and TLS without extensions, are complete with no server name")
    func noSNI() {
        var plain = HelloBuilder()
        #expect(ClientHelloReader.parse(plain.records()) == .complete(ClientHello(serverName: nil, length: plain.records().count, alpn: [])))
        plain.extensions = [(10, [0, 2, 0, 29])]
        guard case .complete(let hello) = ClientHelloReader.parse(plain.records()) else { Issue.record("not complete"); return }
        #expect(hello.serverName == nil)
    }

    @Test("garbage, truncation, bad lengths and bad names are rejected with a reason", arguments: [
        ("HTTP", Array("GET / HTTP/1.1\r\n".utf8), "not TLS"),
        ("SSH", Array("SSH-2.0-OpenSSH\r\n".utf8), "not TLS"),
        ("record version", [22, 9, 9, 0, 10], "version"),
        ("record length 0", [22, 3, 1, 0, 0], "record length 0"),
        ("record too long", [22, 3, 1, 0x40, 0x01], "record length 16385"),
        ("not a ClientHello", [22, 3, 1, 0, 4, 2, 0, 0, 0], "type 2"),
        ("alert record next", HelloBuilder().records(recordSize: 10).prefix(15) + [21, 3, 1, 0, 2, 2, 40], "record type 21"),
      ] as [(String, [UInt8], String)])
    func rejectedRaw(label: String, bytes: [UInt8], reason: String) {
        guard case .rejected(let error) = ClientHelloReader.parse(bytes) else {
            Issue.record("\(label): not rejected: \(ClientHelloReader.parse(bytes))")
            return
        }
        #expect("\(error)".contains(reason), "\(label): \(error)")
    }

    @Test("inconsistent fields inside the ClientHello are rejected and named")
    func rejectedFields() {
        func expectRejected(_ b: HelloBuilder, _ fragment: String, sourceLocation: SourceLocation = #_sourceLocation) {
            let outcome = ClientHelloReader.parse(b.records())
            guard case .rejected(let error) = outcome else {
                Issue.record("not rejected: \(outcome)", sourceLocation: sourceLocation)
                return
            }
            #expect("\(error)".contains(fragment), "\(error)", sourceLocation: sourceLocation)
        }
        var b = HelloBuilder(); b.sessionID = [UInt8](repeating: 0, count: 33); expectRejected(b, "session_id length 33")
        b = HelloBuilder(); b.suites = [0x13]; expectRejected(b, "cipher_suites length 1")
        b = HelloBuilder(); b.suites = []; expectRejected(b, "cipher_suites length 0")
        b = HelloBuilder(); b.compression = []; expectRejected(b, "no compression method")
        b = withSNI("a.example"); b.extensions.append((0, HelloBuilder.sni(Array("b.example".utf8)))); expectRejected(b, "appears twice")
        b = withSNI(String(repeating: "a", count: 256)); expectRejected(b, "over 255")
        b = withSNI(""); expectRejected(b, "empty host_name")
        b = withSNI("bad name"); expectRejected(b, "cannot")
        b = withSNI("-start.example"); expectRejected(b, "cannot")
        b = HelloBuilder(); b.extensions = [(0, [0, 9, 0, 0, 3, 0x61])]; expectRejected(b, "server_name_list length 9")
        b = HelloBuilder(); b.extensions = [(0, HelloBuilder.sni(Array("x.example".utf8), type: 1))]; expectRejected(b, "no host_name")
        b = HelloBuilder(); b.extensions = [(0, [0])]; expectRejected(b, "server_name")
        // An extension whose length runs past the ClientHello.
        var raw = withSNI("a.example").handshake
        raw[raw.count - 7] = 0xFF  // the high byte of the ALPN extension's length
        let record = [22, 3, 1] + HelloBuilder.be16(raw.count) + raw
        guard case .rejected = ClientHelloReader.parse(record) else { Issue.record("overlong extension accepted"); return }
    }

    @Test("the byte limit holds: a huge declared ClientHello is refused early, not buffered")
    func limit() {
        // A handshake header declaring 1 MiB.
        let bytes: [UInt8] = [22, 3, 1, 0, 4, 1, 0x10, 0, 0]
        #expect(ClientHelloReader.parse(bytes, maxBytes: 16384) == .rejected(.tooLarge(limit: 16384)))
        // Records that keep coming without completing the message.
        var reader = ClientHelloReader(maxBytes: 4096)
        var outcome = reader.feed([22, 3, 1, 0, 4, 1, 0, 0x30, 0])  // declares 12 KiB
        #expect(outcome == .rejected(.tooLarge(limit: 4096)))
        reader = ClientHelloReader(maxBytes: 64)
        outcome = reader.feed(HelloBuilder().records())
        #expect(outcome == .rejected(.tooLarge(limit: 64)))
    }

    @Test("a truncated ClientHello never completes")
    func truncated() {
        let bytes = withSNI("agent.example").records()
        for cut in [1, 4, 5, 9, bytes.count / 2, bytes.count - 1] {
            #expect(ClientHelloReader.parse(Array(bytes.prefix(cut))) == .needMore, "cut at \(cut)")
        }
    }

    @Test("random bytes never crash the reader")
    func randomBytes() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            let count = Int.random(in: 0...300, using: &generator)
            var bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
            // Half of them start like a handshake record, so the deeper code is reached.
            if Bool.random(using: &generator), bytes.count > 5 { bytes[0] = 22; bytes[1] = 3; bytes[2] = 1 }
            _ = ClientHelloReader.parse(bytes)
        }
        // Mutations of a valid ClientHello: one byte changed at every position.
        let valid = withSNI("agent.example").records()
        for i in valid.indices {
            var bytes = valid
            bytes[i] ^= 0xFF
            _ = ClientHelloReader.parse(bytes)
        }
    }

    @Test("real ClientHellos from OpenSSL's s_client: TLS 1.3 and 1.2, with and without SNI")
    func openSSL() throws {
        for (flags, expected) in [(["-servername", "Agent-3.pcoip.example"], "agent-3.pcoip.example"),
                                  (["-tls1_2", "-servername", "desk.example"], "desk.example"),
                                  (["-noservername"], nil)] as [([String], String?)] {
            let captured = try captureClientHello(extraArguments: flags)
            guard case .complete(let hello) = ClientHelloReader.parse(captured) else {
                Issue.record("s_client \(flags): \(ClientHelloReader.parse(captured))")
                continue
            }
            #expect(hello.serverName == expected, "s_client \(flags)")
            #expect(hello.length == captured.count)
        }
    }
}

/// Runs `openssl s_client` against a local listener and returns the first
/// bytes it sends (the ClientHello), read until the reader says complete.
func captureClientHello(extraArguments: [String]) throws -> [UInt8] {
    let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    precondition(listener >= 0)
    defer { close(listener) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
    listen(listener, 1)
    _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
    let port = UInt16(bigEndian: address.sin_port)
    let client = try ChildProcess("/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(port)"] + extraArguments,
                                  standardInput: true)
    defer { client.stop() }
    var waiting = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
    guard poll(&waiting, 1, TestDeadline.milliseconds) == 1 else { throw TimedOut("openssl s_client connecting", seconds: TestDeadline.seconds) }
    let connection = accept(listener, nil, nil)
    precondition(connection >= 0)
    defer { close(connection) }
    var timeout = timeval(tv_sec: Int(TestDeadline.seconds), tv_usec: 0)
    setsockopt(connection, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var reader = ClientHelloReader()
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = read(connection, &buffer, buffer.count)
        guard n > 0 else { break }
        if case .needMore = reader.feed(buffer[0..<n]) { continue }
        break
    }
    return reader.buffered
}
