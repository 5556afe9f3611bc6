import Foundation
import Glibc
import TestSupport

/// A reply as it came off the socket.
struct HTTPReply: Sendable, CustomStringConvertible {
    var status: Int
    var headers: [String: String]
    var body: Data
    /// The response head as it came, header names as the server spelled them.
    var head: String = ""

    /// The body parsed as JSON (nil when it is not JSON).
    var json: Any? { try? JSONSerialization.jsonObject(with: body, options: [.fragmentsAllowed]) }
    var object: [String: Any] { json as? [String: Any] ?? [:] }
    var array: [[String: Any]] { json as? [[String: Any]] ?? [] }
    var error: String { object["error"] as? String ?? "" }
    var storedData: [String: Any] { object["stored_data"] as? [String: Any] ?? [:] }
    var text: String { String(decoding: body, as: UTF8.self) }

    var description: String { "\(status) \(text)" }
}

/// A minimal HTTP/1.1 client over a real TCP socket: one request per connection
/// (`Connection: close`), any bytes as the body, so tests can send what a
/// well-behaved client library would refuse to (malformed JSON, false lengths,
/// oversized bodies). Blocking I/O runs on a thread of its own, never on the
/// Swift concurrency pool or Dispatch queues the server needs.
struct HTTPClient: Sendable {
    let port: Int

    /// - Parameter prefix: bytes sent before the request (a PROXY protocol header).
    func send(_ method: String, _ path: String, body: Data? = nil, headers: [String: String] = [:],
              prefix: [UInt8] = []) async throws -> HTTPReply {
        let port = self.port
        return try await withCheckedThrowingContinuation { continuation in
            // A thread of its own: Dispatch's global queues are as wide as the
            // machine has cores, and blocking them would starve GRDB's queues.
            Thread {
                continuation.resume(with: Result { try Self.exchange(port: port, method: method, path: path, body: body,
                                                                     headers: headers, prefix: prefix) })
            }.start()
        }
    }

    /// JSON body from a dictionary or array (or raw text when given a String).
    func json(_ method: String, _ path: String, _ body: Any? = nil, token: String? = nil,
              headers: [String: String] = [:]) async throws -> HTTPReply {
        var headers = headers
        if let token { headers["Authorization"] = "Bearer \(token)" }
        var data: Data?
        if let text = body as? String {
            data = Data(text.utf8)
        } else if let body {
            data = try JSONSerialization.data(withJSONObject: body, options: [.fragmentsAllowed])
        }
        if data != nil && headers["Content-Type"] == nil { headers["Content-Type"] = "application/json" }
        return try await send(method, path, body: data, headers: headers)
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    private static func exchange(port: Int, method: String, path: String, body: Data?, headers: [String: String],
                                 prefix: [UInt8]) throws -> HTTPReply {
        let fd = try connectLoopback(port: port, timeoutSeconds: Int(TestDeadline.seconds))
        defer { close(fd) }

        var head = "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n"
        var headers = headers
        if let body, headers["Content-Length"] == nil, headers["Transfer-Encoding"] == nil {
            headers["Content-Length"] = "\(body.count)"
        }
        for (name, value) in headers.sorted(by: { $0.key < $1.key }) { head += "\(name): \(value)\r\n" }
        head += "\r\n"
        var request = Data(prefix)
        request.append(Data(head.utf8))
        if let body { request.append(body) }
        // A server may answer (413) and close before taking the whole body: stop
        // writing then and read what it said.
        var offset = 0
        while offset < request.count {
            let written = request.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
            }
            if written > 0 { offset += written; continue }
            if written < 0 && errno == EINTR { continue }
            break
        }
        shutdown(fd, Int32(SHUT_WR))

        var response = Data()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = recv(fd, &buffer, buffer.count, 0)
            if count > 0 { response.append(contentsOf: buffer[0..<count]); continue }
            if count < 0 && errno == EINTR { continue }
            break // EOF, reset or timeout: parse what arrived
        }
        return try parse(response)
    }

    private static func parse(_ data: Data) throws -> HTTPReply {
        guard let end = data.range(of: Data("\r\n\r\n".utf8)) else {
            throw Failure(description: "no complete HTTP response head in \(data.count) bytes: \(String(decoding: data.prefix(200), as: UTF8.self))")
        }
        let head = String(decoding: data[..<end.lowerBound], as: UTF8.self)
        var lines = head.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst().split(separator: " ")
        guard statusLine.count >= 2, let status = Int(statusLine[1]) else {
            throw Failure(description: "bad status line in \(head)")
        }
        var headers: [String: String] = [:]
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var body = Data(data[end.upperBound...])
        if headers["transfer-encoding"]?.lowercased() == "chunked" {
            body = dechunk(body)
        } else if let length = headers["content-length"].flatMap({ Int($0) }), body.count > length {
            body = body.prefix(length)
        }
        return HTTPReply(status: status, headers: headers, body: body, head: head)
    }

    private static func dechunk(_ data: Data) -> Data {
        var result = Data()
        var rest = data[...]
        while let lineEnd = rest.range(of: Data("\r\n".utf8)) {
            let sizeText = String(decoding: rest[..<lineEnd.lowerBound], as: UTF8.self).split(separator: ";").first ?? ""
            guard let size = Int(sizeText.trimmingCharacters(in: .whitespaces), radix: 16), size > 0 else { break }
            let start = lineEnd.upperBound
            guard rest.distance(from: start, to: rest.endIndex) >= size else { break }
            let stop = rest.index(start, offsetBy: size)
            result.append(rest[start..<stop])
            rest = rest[stop...].dropFirst(2)
        }
        return result
    }
}

/// A blocking TCP socket connected to 127.0.0.1:`port`, with receive and
/// send timeouts of `timeoutSeconds`; the caller closes it.
func connectLoopback(port: Int, timeoutSeconds: Int) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw HTTPClient.Failure(description: "socket: errno \(errno)") }
    var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else {
        close(fd)
        throw HTTPClient.Failure(description: "connect to 127.0.0.1:\(port): errno \(errno)")
    }
    return fd
}
