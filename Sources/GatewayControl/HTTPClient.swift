import SystemLayer

/// A minimal blocking HTTP/1.1 client for the control plane (one request per
/// connection, `Connection: close`), on the system layer's sockets. Used by
/// the registration thread and by tests that must send exactly what they mean.
public enum BlockingHTTP {
    public struct Response: Sendable {
        public var status: Int
        public var headers: [(name: String, value: String)]
        public var body: [UInt8]

        public func header(_ name: String) -> String? {
            headers.first { $0.name.lowercased() == name.lowercased() }?.value
        }
        public var text: String { String(decoding: body, as: UTF8.self) }
    }

    /// Why a request got no answer: which side failed.
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    /// Sends one request and reads the whole answer.
    /// - Parameters:
    ///   - host: a numeric address or a name (resolved with getaddrinfo).
    ///   - headers: extra headers (Host, Content-Length and Connection are added).
    ///   - timeoutMilliseconds: for the connect and for each wait for bytes.
    /// - Throws: `Failure` naming the step that failed (resolve, connect, send, receive, parse).
    ///   - tls: TLS with this trust (an https broker); nil: plain HTTP.
    public static func request(method: String, host: String, port: UInt16, path: String,
                               headers: [(String, String)] = [], body: [UInt8] = [],
                               source: IPAddress? = nil, timeoutMilliseconds: Int32 = 5000, tls: TLSTrust? = nil) throws(Failure) -> Response {
        let address: SocketAddress
        do { address = try SocketAddress.resolve(host: host, port: port) } catch {
            throw Failure(description: "\(error)")
        }
        let fd: FileDescriptor
        do { fd = try Socket.makeTCP(family: address.family) } catch {
            throw Failure(description: "cannot open a socket: \(error)")
        }
        defer { fd.close() }
        if let source {
            do throws(SystemCallError) { try Socket.bind(fd, to: SocketAddress(ip: source, port: 0)) } catch {
                throw Failure(description: "cannot bind to \(source): \(error)")
            }
        }
        do throws(Errno) {
            if case .inProgress = try Socket.connect(fd, to: address) {
                guard BlockingWait.writable(fd, timeoutMilliseconds: timeoutMilliseconds) else {
                    throw Errno(rawValue: 110) // ETIMEDOUT
                }
                if let error = Socket.pendingError(fd) { throw error }
            }
        } catch {
            throw Failure(description: "cannot connect to \(address): \(error)")
        }
        var head = "\(method) \(path) HTTP/1.1\r\nHost: \(host):\(port)\r\nConnection: close\r\n"
        head += "Content-Length: \(body.count)\r\n"
        for (name, value) in headers { head += "\(name): \(value)\r\n" }
        head += "\r\n"
        let outgoing = Array(head.utf8) + body
        if let tls {
            return try exchange(over: fd, address: address, host: host, trust: tls, outgoing, timeoutMilliseconds: timeoutMilliseconds)
        }
        var sent = 0
        while sent < outgoing.count {
            let result = outgoing.withUnsafeBytes { raw in
                Result { () throws(Errno) in try fd.write(UnsafeRawBufferPointer(rebasing: raw[sent...])) }
            }
            switch result {
            case .success(.done(let n)): sent += n
            case .success(.wouldBlock):
                guard BlockingWait.writable(fd, timeoutMilliseconds: timeoutMilliseconds) else {
                    throw Failure(description: "\(address) did not take the request within \(timeoutMilliseconds) ms")
                }
            case .failure(let error):
                // The server may answer (413) and close before reading everything.
                if sent > 0 { sent = outgoing.count; break }
                throw Failure(description: "cannot send to \(address): \(error)")
            }
        }
        var incoming: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        reading: while true {
            let result = chunk.withUnsafeMutableBytes { raw in Result { () throws(Errno) in try fd.read(into: raw) } }
            switch result {
            case .success(.done(0)): break reading
            case .success(.done(let n)):
                incoming.append(contentsOf: chunk[0..<n])
                if incoming.count > 16 << 20 { throw Failure(description: "the answer from \(address) is larger than 16 MiB") }
                if let response = parse(incoming), response.complete { return response.response }
            case .success(.wouldBlock):
                guard BlockingWait.readable(fd, timeoutMilliseconds: timeoutMilliseconds) else {
                    throw Failure(description: "\(address) did not answer within \(timeoutMilliseconds) ms")
                }
            case .failure(let error):
                if let response = parse(incoming) { return response.response }
                throw Failure(description: "the connection to \(address) failed while reading the answer: \(error)")
            }
        }
        guard let response = parse(incoming) else {
            throw Failure(description: "\(address) closed the connection without a valid HTTP answer")
        }
        return response.response
    }

    /// One request and its answer over TLS on the connected socket.
    private static func exchange(over fd: FileDescriptor, address: SocketAddress, host: String, trust: TLSTrust,
                                 _ outgoing: [UInt8], timeoutMilliseconds: Int32) throws(Failure) -> Response {
        let session: TLSClientSession
        do { session = try TLSClientSession(fd: fd, host: host, trust: trust, timeoutMilliseconds: timeoutMilliseconds) } catch {
            throw Failure(description: "TLS with \(address): \(error)")
        }
        var incoming: [UInt8] = []
        do throws(TLSClientError) {
            try session.writeAll(outgoing)
            while true {
                let chunk = try session.read()
                if chunk.isEmpty { break }
                incoming.append(contentsOf: chunk)
                if incoming.count > 16 << 20 { throw TLSClientError(description: "the answer is larger than 16 MiB") }
                if let response = parse(incoming), response.complete { return response.response }
            }
        } catch {
            if let response = parse(incoming), response.complete { return response.response }
            throw Failure(description: "TLS with \(address): \(error)")
        }
        guard let response = parse(incoming) else {
            throw Failure(description: "\(address) closed the connection without a valid HTTP answer")
        }
        return response.response
    }

    /// Connects to an https server and returns the SHA-256 of its certificate,
    /// verifying nothing: enrollment's first pin (shown to the operator to compare).
    public static func certificateHash(host: String, port: UInt16, timeoutMilliseconds: Int32 = 5000) throws(Failure) -> [UInt8] {
        let address: SocketAddress
        do { address = try SocketAddress.resolve(host: host, port: port) } catch { throw Failure(description: "\(error)") }
        let fd: FileDescriptor
        do { fd = try Socket.makeTCP(family: address.family) } catch { throw Failure(description: "cannot open a socket: \(error)") }
        defer { fd.close() }
        do throws(Errno) {
            if case .inProgress = try Socket.connect(fd, to: address) {
                guard BlockingWait.writable(fd, timeoutMilliseconds: timeoutMilliseconds) else { throw Errno(rawValue: 110) }
                if let error = Socket.pendingError(fd) { throw error }
            }
        } catch {
            throw Failure(description: "cannot connect to \(address): \(error)")
        }
        do throws(TLSClientError) {
            let session = try TLSClientSession(fd: fd, host: host, trust: .learn, timeoutMilliseconds: timeoutMilliseconds)
            guard let hash = session.peerSHA256 else { throw TLSClientError(description: "the server sent no certificate") }
            return hash
        } catch {
            throw Failure(description: "TLS with \(address): \(error)")
        }
    }

    /// Parses what arrived so far: nil until the head is complete.
    static func parse(_ bytes: [UInt8]) -> (response: Response, complete: Bool)? {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard bytes.count >= 4, let end = (0...(bytes.count - 4)).first(where: { Array(bytes[$0..<($0 + 4)]) == separator }) else {
            return nil
        }
        let head = String(decoding: bytes[0..<end], as: UTF8.self)
        var lines = head.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst().split(separator: " ")
        guard statusLine.count >= 2, statusLine[0].hasPrefix("HTTP/1."), let status = Int(statusLine[1]) else { return nil }
        var headers: [(String, String)] = []
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers.append((String(line[..<colon]).trimmingSpaces(), String(line[line.index(after: colon)...]).trimmingSpaces()))
        }
        var response = Response(status: status, headers: headers.map { (name: $0.0, value: $0.1) }, body: [])
        let rest = Array(bytes[(end + 4)...])
        if let length = response.header("Content-Length").flatMap({ Int($0) }) {
            response.body = Array(rest.prefix(length))
            return (response, rest.count >= length)
        }
        if response.header("Transfer-Encoding")?.lowercased().contains("chunked") == true {
            var body: [UInt8] = []
            var index = 0
            while true {
                guard let lineEnd = (index..<max(index, rest.count - 1)).first(where: { rest[$0] == 13 && rest[$0 + 1] == 10 }) else {
                    response.body = body
                    return (response, false)
                }
                let sizeText = String(decoding: rest[index..<lineEnd], as: UTF8.self).split(separator: ";").first ?? ""
                guard let size = Int(String(sizeText).trimmingSpaces(), radix: 16) else { return (response, true) }
                if size == 0 { response.body = body; return (response, true) }
                let start = lineEnd + 2
                guard rest.count >= start + size + 2 else { response.body = body; return (response, false) }
                body.append(contentsOf: rest[start..<(start + size)])
                index = start + size + 2
            }
        }
        response.body = rest
        return (response, status == 204 || status == 304)
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while s.first == " " || s.first == "\t" { s = s.dropFirst() }
        while s.last == " " || s.last == "\t" { s = s.dropLast() }
        return String(s)
    }
}
