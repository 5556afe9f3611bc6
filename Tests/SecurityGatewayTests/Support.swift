import Foundation
import Glibc
import Synchronization
import TestSupport

/// Test helpers: openssl runs, free ports, a UDP echo that tells the sender's
/// port, plain blocking TCP/UDP clients, curl. Everything real, on loopback.
enum SGTest {
    /// Runs `openssl` with `arguments` in `directory`. - Throws when it fails.
    static func openssl(_ arguments: [String], in directory: String) throws {
        let done = try ChildProcess.run("/usr/bin/openssl", arguments, directory: directory)
        guard done.status == 0 else { throw Failed("openssl \(arguments.joined(separator: " ")) exited \(done.status): \(done.stderr)") }
    }

    /// A Connection Manager's grant-signing pair in `directory`: `k.pem`
    /// (ECDSA P-256) and its self-signed certificate `c.pem` (CN=cm, 2 days).
    static func makeSigningPair(in directory: String) throws {
        try openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "k.pem"], in: directory)
        try openssl(["req", "-x509", "-new", "-key", "k.pem", "-days", "2", "-subj", "/CN=cm", "-out", "c.pem"], in: directory)
    }

    struct Failed: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }

    static func temporaryDirectory() throws -> String {
        let dir = NSTemporaryDirectory() + "sgdp-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    static func loopback(_ port: UInt16, host: String = "127.0.0.1") -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr(host)
        address.sin_port = port.bigEndian
        return address
    }

    static func withSockaddr<T>(_ address: inout sockaddr_in, _ body: (UnsafeMutablePointer<sockaddr>) -> T) -> T {
        withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1, body) }
    }

    static func setTimeout(_ fd: Int32, milliseconds: Int) {
        var timeout = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Runs curl; returns (HTTP status, body).
    /// - Parameter ca: for an https URL, the only certificate trusted (the control endpoint's own).
    static func curl(_ method: String, _ url: String, json: String? = nil, ca: String? = nil) throws -> (Int, String) {
        var arguments = ["-s", "-X", method, "-w", "\n%{http_code}", "--max-time", "\(Int(TestDeadline.seconds))", url]
        if let ca { arguments += ["--cacert", ca] }
        if let json { arguments += ["-H", "Content-Type: application/json", "--data-binary", json] }
        let text = try ChildProcess.run("/usr/bin/curl", arguments).stdout
        guard let newline = text.lastIndex(of: "\n"), let code = Int(text[text.index(after: newline)...]) else {
            throw Failed("curl \(method) \(url): no status in \(text)")
        }
        return (code, String(text[..<newline]))
    }
}

/// A blocking TCP client for the bad-input tests.
final class RawClient {
    let fd: Int32

    init(port: UInt16) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = SGTest.loopback(port)
        // On a throw from here on, deinit runs (every property is set) and
        // closes fd: closing it here too closed whatever descriptor took the
        // number meanwhile (an event loop's socket, a journal) under load.
        guard SGTest.withSockaddr(&address, { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }) == 0 else {
            throw SGTest.Failed("connect to 127.0.0.1:\(port): errno \(errno)")
        }
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    /// What the peer did within `seconds`: bytes it sent, or that it closed.
    enum Seen: Equatable { case bytes(Int), closed, nothing }

    func wait(seconds: Int = Int(TestDeadline.seconds)) -> Seen {
        SGTest.setTimeout(fd, milliseconds: seconds * 1000)
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buffer, buffer.count, 0)
        if n > 0 { return .bytes(n) }
        if n == 0 || errno == ECONNRESET { return .closed }
        return .nothing
    }
}

/// A UDP echo on 127.0.0.1:`port` that answers each datagram with
/// `<payload>|<sender's port>`, so a test sees which source port the
/// gateway used toward the agent.
final class UDPEcho: Sendable {
    private let fd: Int32
    private let stopped = Atomic<Bool>(false)
    private let exited = Atomic<Bool>(false)

    /// - Parameter tag: appended as `|tag` to each answer, to tell agents apart.
    init(port: UInt16, tag: String? = nil) throws {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        var address = SGTest.loopback(port)
        guard SGTest.withSockaddr(&address, { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }) == 0 else {
            close(fd)
            throw SGTest.Failed("udp echo: cannot bind 127.0.0.1:\(port)")
        }
        let suffix = tag.map { Array("|\($0)".utf8) } ?? []
        SGTest.setTimeout(fd, milliseconds: 100)
        self.fd = fd
        let box = self
        let worker = Thread {
            var buffer = [UInt8](repeating: 0, count: 2048)
            while !box.stopped.load(ordering: .relaxed) {
                var peer = sockaddr_in()
                var length = socklen_t(MemoryLayout<sockaddr_in>.size)
                let n = SGTest.withSockaddr(&peer) { recvfrom(fd, &buffer, buffer.count, 0, $0, &length) }
                guard n > 0 else { continue }
                let reply = Array(buffer[0..<n]) + Array("|\(UInt16(bigEndian: peer.sin_port))".utf8) + suffix
                _ = SGTest.withSockaddr(&peer) { p in reply.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, 0, p, length) } }
            }
            box.exited.store(true, ordering: .releasing)
        }
        worker.start()
    }

    /// Stops the worker (it wakes every 100 ms) and closes the socket once it has gone.
    func stop() {
        stopped.store(true, ordering: .relaxed)
        eventually { exited.load(ordering: .acquiring) }
        close(fd)
    }
}

/// A UDP client bound to `host` (127.0.0.2 plays an unauthorised address).
final class UDPClient {
    let fd: Int32

    init(host: String = "127.0.0.1") throws {
        fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        var address = SGTest.loopback(0, host: host)
        guard SGTest.withSockaddr(&address, { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }) == 0 else {
            throw SGTest.Failed("udp client: cannot bind \(host)")   // deinit closes fd
        }
        SGTest.setTimeout(fd, milliseconds: 200)
    }

    deinit { close(fd) }

    /// Sends `text` to 127.0.0.1:`port` and returns the answer, if one came within 200 ms.
    func exchange(_ text: String, port: UInt16) -> String? {
        var address = SGTest.loopback(port)
        let bytes = Array(text.utf8)
        _ = SGTest.withSockaddr(&address) { p in bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, 0, p, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var buffer = [UInt8](repeating: 0, count: 2048)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self) : nil
    }
}

/// Builds a TLS 1.2/1.3-style ClientHello record with an optional SNI of any length.
func clientHello(sni: String?) -> [UInt8] {
    func be16(_ n: Int) -> [UInt8] { [UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] }
    var body: [UInt8] = [3, 3] + [UInt8](repeating: 0xAB, count: 32) + [0] + be16(2) + [0x13, 0x01] + [1, 0]
    var extensions: [UInt8] = []
    if let sni {
        let name = Array(sni.utf8)
        let entry = [0] + be16(name.count) + name
        let data = be16(entry.count) + entry
        extensions += be16(0) + be16(data.count) + data
    }
    body += be16(extensions.count) + extensions
    let handshake = [1, 0] + be16(body.count) + body
    return [22, 3, 1] + be16(handshake.count) + handshake
}
