@testable import BrokerAPI
import Foundation
import Glibc
import NIOCore
import NIOHTTP1
import Synchronization
import Testing
import TestSupport

/// The broker's connections to gateways' control endpoints: kept alive and
/// reused, replaced when closed, and a request without an answer in time is
/// a failure that names it, against a plain socket server that counts
/// connections.
@Suite("Gateway connections", .offPool)
struct GatewayConnectionsTests {
    /// Answers `200` with the request's path as the body; `/close` also
    /// closes the connection after answering, `/silent` is never answered.
    final class CountingServer: Sendable {
        final class Count: Sendable { let value = Atomic<Int>(0) }

        let port: Int
        private let count = Count()
        var accepted: Int { count.value.load(ordering: .relaxed) }
        private let listener: Int32

        init() throws {
            let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            self.listener = listener
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                    bind(listener, pointer, length) == 0 && listen(listener, 16) == 0 && getsockname(listener, pointer, &length) == 0
                }
            }
            guard bound else { throw TimedOut("a listening socket", seconds: 0) }
            port = Int(UInt16(bigEndian: address.sin_port))
            let count = self.count
            Thread.detachNewThread {
                while true {
                    let fd = accept(listener, nil, nil)
                    // Shut down: this thread closes the listener, so its number
                    // cannot be reused under a later accept of this loop.
                    guard fd >= 0 else { close(listener); return }
                    count.value.add(1, ordering: .relaxed)
                    Thread.detachNewThread { Self.serve(fd) }
                }
            }
        }

        deinit { shutdown(listener, Int32(SHUT_RDWR)) }

        private static func serve(_ fd: Int32) {
            defer { close(fd) }
            var pending: [UInt8] = []
            var served = 0
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                guard let end = pending.firstRange(of: Array("\r\n\r\n".utf8)) else {
                    let n = recv(fd, &buffer, buffer.count, 0)
                    if n <= 0 { return }
                    pending += buffer[0..<n]
                    continue
                }
                let head = String(decoding: pending[..<end.lowerBound], as: UTF8.self)
                let length = head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }
                    .flatMap { Int($0.split(separator: ":")[1].trimmingPrefix(" ")) } ?? 0
                guard pending.count >= end.upperBound + length else {
                    let n = recv(fd, &buffer, buffer.count, 0)
                    if n <= 0 { return }
                    pending += buffer[0..<n]
                    continue
                }
                pending.removeFirst(end.upperBound + length)
                served += 1
                let path = String(head.split(separator: " ")[1])
                if path == "/silent" { continue }
                // Closed without a byte of answer: always, or only on a connection that served before
                // (a gateway restarting as a kept connection's request arrives).
                if path.hasPrefix("/vanish-always") || (path.hasPrefix("/vanish") && served > 1) { return }
                let closing = path == "/close"
                let answer = "HTTP/1.1 200 OK\r\nContent-Length: \(path.utf8.count)\r\n\(closing ? "Connection: close\r\n" : "")\r\n\(path)"
                _ = Array(answer.utf8).withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                // `/drop`: answered as kept alive, then closed anyway (a gateway restarting, or its idle close).
                if closing || path == "/drop" { return }
            }
        }
    }

    func request(_ connections: GatewayConnections, _ server: CountingServer, _ path: String, method: HTTPMethod = .PUT,
                 heads: CountingServer.Count? = nil,
                 timeout: TimeAmount = .seconds(Int64(TestDeadline.seconds))) async throws(GatewayConnections.Failure) -> String {
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: "127.0.0.1:\(server.port)")
        headers.add(name: "Content-Length", value: "2")
        let answer = try await connections.send(.init(host: "127.0.0.1", port: server.port, tls: nil),
                                                body: Array("{}".utf8), timeout: timeout,
                                                retryable: GatewayConnections.idempotent(method)) {
            heads?.value.add(1, ordering: .relaxed)
            return HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: headers)
        }
        #expect(answer.status == 200)
        return String(decoding: answer.body, as: UTF8.self)
    }

    @Test("a kept connection closed with no answer: an idempotent request is sent again once, with a new head, on a new connection; a POST is not")
    func unansweredSentAgain() async throws {
        let server = try CountingServer()
        let connections = GatewayConnections()
        #expect(try await request(connections, server, "/a") == "/a")
        let heads = CountingServer.Count()
        #expect(try await request(connections, server, "/vanish", heads: heads) == "/vanish", "PUT, sent again")
        #expect(heads.value.load(ordering: .relaxed) == 2, "the head is made again (a signed request is signed afresh)")
        #expect(server.accepted == 2)
        #expect(try await request(connections, server, "/vanish-d", method: .DELETE) == "/vanish-d")
        #expect(server.accepted == 3)

        /// Sends a request that must fail with the connection closed unanswered; returns how many heads were made.
        func unanswered(_ path: String, method: HTTPMethod = .PUT) async -> Int {
            let heads = CountingServer.Count()
            do {
                _ = try await request(connections, server, path, method: method, heads: heads)
                Issue.record("\(method) \(path), which no connection answered, succeeded")
            } catch {
                #expect(error.description.contains("before answering"), "\(error)")
            }
            return heads.value.load(ordering: .relaxed)
        }

        // Not idempotent: the failure comes back, and nothing is sent again.
        #expect(await unanswered("/vanish-post", method: .POST) == 1)
        #expect(server.accepted == 3)

        // Sent again once only; and a new connection closed without an answer is a failure at once.
        #expect(try await request(connections, server, "/b") == "/b")
        #expect(await unanswered("/vanish-always") == 2 && server.accepted == 5, "once on the kept connection, once on a new one")
        #expect(await unanswered("/vanish-always") == 1 && server.accepted == 6, "a new connection's failure is not tried again")
    }

    @Test("idle connections to an endpoint no longer used are closed once they are stale, when another endpoint is used")
    func staleEndpointsSwept() async throws {
        let (a, b) = (try CountingServer(), try CountingServer())
        let elapsed = CountingServer.Count()
        let connections = GatewayConnections(clock: {
            NIODeadline.now().uptimeNanoseconds &+ UInt64(elapsed.value.load(ordering: .relaxed)) * 1_000_000_000
        })
        let toA = GatewayConnections.Endpoint(host: "127.0.0.1", port: a.port, tls: nil)
        #expect(try await request(connections, a, "/a") == "/a")
        #expect(try await request(connections, b, "/b") == "/b")
        #expect(connections.openIdleConnections(to: toA) == 1)
        // Within the reuse window, using b leaves a's connection kept.
        elapsed.value.store(30, ordering: .relaxed)
        #expect(try await request(connections, b, "/b") == "/b")
        #expect(connections.openIdleConnections(to: toA) == 1)
        // Past it (a deleted gateway is never asked again): using b closes a's.
        elapsed.value.store(120, ordering: .relaxed)
        #expect(try await request(connections, b, "/b") == "/b")
        #expect(connections.openIdleConnections(to: toA) == 0)
        #expect(a.accepted == 1 && b.accepted == 2, "b's own stale connection was replaced as before")
    }

    @Test("requests go one after another on one kept-alive connection; one the gateway closes is replaced")
    func reuse() async throws {
        let server = try CountingServer()
        let connections = GatewayConnections()
        for path in ["/a", "/b", "/c"] {
            #expect(try await request(connections, server, path) == path)
        }
        #expect(server.accepted == 1)
        #expect(try await request(connections, server, "/close") == "/close")
        #expect(try await request(connections, server, "/d") == "/d")
        #expect(try await request(connections, server, "/e") == "/e")
        #expect(server.accepted == 2)
        // The gateway closes a kept connection while it is idle: once the broker has seen that, it is not used.
        #expect(try await request(connections, server, "/drop") == "/drop")
        let endpoint = GatewayConnections.Endpoint(host: "127.0.0.1", port: server.port, tls: nil)
        try await waitUntilAsync("the dropped connection seen closed") { connections.openIdleConnections(to: endpoint) == 0 }
        #expect(try await request(connections, server, "/f") == "/f")
        #expect(server.accepted == 3)
    }

    @Test("no answer within the timeout: a failure saying so, and that connection is not used again")
    func timeout() async throws {
        let server = try CountingServer()
        let connections = GatewayConnections()
        #expect(try await request(connections, server, "/a") == "/a")
        do {
            _ = try await request(connections, server, "/silent", timeout: .milliseconds(200))
            Issue.record("a request that was never answered succeeded")
        } catch {
            #expect(error.description == "no answer within the call's timeout")
        }
        #expect(try await request(connections, server, "/b") == "/b")
        #expect(server.accepted == 2)
    }

    @Test("nothing listening: a failure naming the refusal")
    func refused() async throws {
        let port: Int
        do { let server = try CountingServer(); port = server.port }
        let connections = GatewayConnections()
        var headers = HTTPHeaders()
        headers.add(name: "Content-Length", value: "0")
        do {
            _ = try await connections.send(.init(host: "127.0.0.1", port: port, tls: nil), body: [], timeout: .seconds(5),
                                           retryable: true) {
                HTTPRequestHead(version: .http1_1, method: .DELETE, uri: "/x", headers: headers)
            }
            Issue.record("a request to a closed port succeeded")
        } catch {
            #expect(error.description.contains("refused"), "\(error)")
        }
    }
}
