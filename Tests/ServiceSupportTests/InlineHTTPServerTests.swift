import Glibc
import Logging
import ServiceLifecycle
@testable import ServiceSupport
import Synchronization
import SystemLayer
import Testing
import TestSupport

/// The control endpoints' HTTP server: a request is handled on the server's
/// own thread (where blocking is allowed), answered in order, and what HTTP
/// or the body limit refuses never reaches the handler.
@Suite("Inline HTTP server", .offPool)
struct InlineHTTPServerTests {
    /// A running server whose handler echoes what it was given.
    final class Running: Sendable {
        /// What reached the handler and `tooLarge`.
        final class Seen: Sendable {
            let calls = Mutex<Int>(0)
            let refusals = Mutex<[String]>([])
        }

        let port: Int
        let seen = Seen()
        var calls: Int { seen.calls.withLock { $0 } }
        var refusals: [String] { seen.refusals.withLock { $0 } }
        private let group: ServiceGroup
        private let task: Task<Void, any Error>

        init(limit: Int = 16, idleTimeout: Duration = .seconds(75), maxConnections: Int = 512) async throws {
            var logger = Logger(label: "inline-http-test")
            logger.logLevel = .warning
            let bound = Mutex<String?>(nil)
            let seen = self.seen
            let server = try InlineHTTPServer(
                host: "127.0.0.1", port: 0, tls: nil, threads: 2, maxBodyBytes: limit,
                idleTimeout: idleTimeout, maxConnections: maxConnections,
                tooLarge: { method, declared in
                    seen.refusals.withLock { $0.append("\(method) \(declared.map(String.init) ?? "read")") }
                    return InlineResponse(status: 413, body: Array("too large".utf8))
                },
                logger: logger, onBound: { address in bound.withLock { $0 = address } }) { request in
                seen.calls.withLock { $0 += 1 }
                if request.path == "/empty" { return InlineResponse(status: 204, contentType: nil) }
                let text = "\(request.method) \(request.path) \(request.body.count) \(request.header("x-tag") ?? "-") dedicated=\(BlockingExecutor.onDedicatedThread)"
                return InlineResponse(status: 200, contentType: "text/plain", body: Array(text.utf8))
            }
            group = ServiceGroup(configuration: .init(services: [server], gracefulShutdownSignals: [], logger: logger))
            let group = self.group
            task = Task { try await group.run() }
            try await waitUntilAsync("the inline server listening") { bound.withLock { $0 } != nil }
            port = Int(bound.withLock { $0 }!.split(separator: ":").last!)!
        }

        /// Stops it and waits for `run` to return.
        func stop() async throws {
            await group.triggerGracefulShutdown()
            try await task.value
        }
    }

    /// A blocking client: sends bytes, reads what comes back until the peer
    /// closes or `responses` answers are complete.
    struct Client: ~Copyable {
        let fd: Int32

        init(port: Int) throws {
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            var timeout = timeval(tv_sec: Int(TestDeadline.seconds), tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard connected == 0 else {
                close(fd)
                throw Errno(rawValue: errno)
            }
        }

        deinit { close(fd) }

        func send(_ text: String) {
            let bytes = Array(text.utf8)
            _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        }

        /// The answers read (status, headers lowercased, body), and whether the peer closed.
        func read(responses wanted: Int) -> (answers: [Answer], closed: Bool) {
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let answers = Answer.parse(bytes)
                if answers.count >= wanted && wanted > 0 { return (answers, false) }
                let n = recv(fd, &buffer, buffer.count, 0)
                // A reset (the server closed with our request unread) is a close too; a timeout is not.
                if n <= 0 { return (Answer.parse(bytes), n == 0 || errno == ECONNRESET) }
                bytes += buffer[0..<n]
            }
        }
    }

    struct Answer {
        let status: Int
        let headers: [String: String]
        let body: String

        /// The complete answers at the start of `bytes` (Content-Length or none for 204).
        static func parse(_ bytes: [UInt8]) -> [Answer] {
            var answers: [Answer] = []
            var rest = bytes[...]
            while let end = rest.firstRange(of: Array("\r\n\r\n".utf8)) {
                let head = String(decoding: rest[rest.startIndex..<end.lowerBound], as: UTF8.self)
                var lines = head.split(separator: "\r\n").map(String.init)
                let status = Int(lines.removeFirst().split(separator: " ")[1])!
                var headers: [String: String] = [:]
                for line in lines {
                    let parts = line.split(separator: ":", maxSplits: 1)
                    headers[parts[0].lowercased()] = parts[1].trimmingPrefix(" ").description
                }
                let length = Int(headers["content-length"] ?? "0")!
                guard rest.endIndex - end.upperBound >= length else { break }
                let body = String(decoding: rest[end.upperBound..<end.upperBound + length], as: UTF8.self)
                answers.append(Answer(status: status, headers: headers, body: body))
                rest = rest[(end.upperBound + length)...]
            }
            return answers
        }
    }

    @Test("pipelined requests answered in order on the server's own thread, the query dropped from the path, 204 without a length, the connection kept")
    func pipelined() async throws {
        let server = try await Running()
        let client = try Client(port: server.port)
        client.send("GET /a?x=1 HTTP/1.1\r\nHost: t\r\nX-Tag: one\r\n\r\n"
                    + "PUT /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                    + "DELETE /empty HTTP/1.1\r\nHost: t\r\n\r\n")
        let (answers, closed) = client.read(responses: 3)
        #expect(!closed)
        try #require(answers.count == 3)
        #expect(answers[0].status == 200 && answers[0].body == "GET /a 0 one dedicated=true", "\(answers[0])")
        #expect(answers[1].status == 200 && answers[1].body == "PUT /b 5 - dedicated=true", "\(answers[1])")
        #expect(answers[2].status == 204 && answers[2].headers["content-length"] == nil, "\(answers[2])")
        // The same connection serves another request afterwards.
        client.send("POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        let again = client.read(responses: 1).answers
        #expect(again.first?.body == "POST /c 3 - dedicated=true")
        #expect(server.calls == 4)
        try await server.stop()
    }

    @Test("a connection must deliver each whole request within the idle timeout: an idle one, one that sends nothing and one that sends part of a request are closed; the part never reaches the handler")
    func idleTimeout() async throws {
        let server = try await Running(idleTimeout: .milliseconds(300))
        let idle = try Client(port: server.port)
        idle.send("GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        #expect(idle.read(responses: 1).answers.map(\.status) == [200])
        let silent = try Client(port: server.port)
        let partial = try Client(port: server.port)
        partial.send("PUT /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhel")
        // Each read returns when the server closes (or after the test deadline, failing).
        for client in [idle.read(responses: 0), silent.read(responses: 0), partial.read(responses: 0)] {
            #expect(client.closed && client.answers.isEmpty)
        }
        #expect(server.calls == 1)
        try await server.stop()
    }

    @Test("beyond maxConnections a new connection is closed as it comes; those open go on being served, and a closed one frees its place")
    func connectionCap() async throws {
        let server = try await Running(maxConnections: 2)
        let first = try Client(port: server.port)
        first.send("GET /1 HTTP/1.1\r\nHost: t\r\n\r\n")
        #expect(first.read(responses: 1).answers.count == 1)
        do {
            let second = try Client(port: server.port)
            second.send("GET /2 HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(second.read(responses: 1).answers.count == 1)
            let third = try Client(port: server.port)
            third.send("GET /3 HTTP/1.1\r\nHost: t\r\n\r\n")
            let refused = third.read(responses: 1)
            #expect(refused.closed && refused.answers.isEmpty)
            first.send("GET /1 HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(first.read(responses: 1).answers.count == 1)
            second.send("GET /2 HTTP/1.1\r\nHost: t\r\n\r\n")
            #expect(second.read(responses: 1).answers.count == 1)
        }
        // `second` is closed: once the server has seen that, a new connection is served.
        try await waitUntilAsync("a place freed by a closed connection") {
            let next = try Client(port: server.port)
            next.send("GET /4 HTTP/1.1\r\nHost: t\r\n\r\n")
            return next.read(responses: 1).answers.count == 1
        }
        #expect(server.calls == 5)
        try await server.stop()
    }

    @Test("a body over the limit, declared or read: 413 from tooLarge with the method, the connection closed, the handler never called")
    func tooLarge() async throws {
        let server = try await Running(limit: 16)
        let declared = try Client(port: server.port)
        declared.send("PUT /rule HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        let first = declared.read(responses: 0)
        #expect(first.answers.map(\.status) == [413] && first.closed, "\(first)")
        #expect(first.answers.first?.headers["connection"] == "close")

        let chunked = try Client(port: server.port)
        chunked.send("POST /rule HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n5\r\nmore!\r\n0\r\n\r\n")
        let second = chunked.read(responses: 0)
        #expect(second.answers.map(\.status) == [413] && second.closed, "\(second)")
        // Exactly the limit is accepted.
        let exact = try Client(port: server.port)
        exact.send("PUT /rule HTTP/1.1\r\nHost: t\r\nContent-Length: 16\r\n\r\n0123456789abcdef")
        #expect(exact.read(responses: 1).answers.first?.body == "PUT /rule 16 - dedicated=true")

        #expect(server.refusals == ["PUT 100", "POST read"])
        #expect(server.calls == 1)
        try await server.stop()
    }

    @Test("what HTTP cannot parse gets 400 and a close; Connection: close is honoured; shutdown ends run and the connections")
    func refusedAndClosed() async throws {
        let server = try await Running()
        let garbage = try Client(port: server.port)
        garbage.send("\u{1}\u{2} not http at all\r\n\r\n")
        let refused = garbage.read(responses: 0)
        #expect(refused.answers.map(\.status) == [400] && refused.closed, "\(refused)")

        let closing = try Client(port: server.port)
        closing.send("GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        let answered = closing.read(responses: 0)
        #expect(answered.answers.map(\.status) == [200] && answered.closed, "\(answered)")
        #expect(answered.answers.first?.headers["connection"] == "close")
        #expect(server.calls == 1)

        let idle = try Client(port: server.port)
        idle.send("GET /y HTTP/1.1\r\nHost: t\r\n\r\n")
        #expect(idle.read(responses: 1).answers.count == 1)
        try await server.stop()
        // The kept-alive connection is closed by the shutdown.
        #expect(idle.read(responses: 0).closed)
    }
}
