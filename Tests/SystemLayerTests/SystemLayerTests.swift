import Glibc
import Testing
import SystemLayer
import TestSupport

@Suite("Addresses", .offPool)
struct AddressTests {
    @Test("IPv4 and IPv6 addresses parse and print back", arguments: ["127.0.0.1", "0.0.0.0", "::1", "2001:db8::7", "::ffff:10.1.2.3"])
    func roundTrip(text: String) throws {
        let ip = try #require(IPAddress(text))
        #expect(IPAddress(ip.description) == ip)
    }

    @Test("IPv4 text is the four octets in decimal, for every octet value and position")
    func ipv4Text() {
        var values: [UInt32] = [0, 0xffff_ffff, 0x7f00_0001, 0x0a00_0a64, 0x6400_0009, 0x0909_0909]
        for octet in UInt32(0)...255 { values += [octet << 24 | 0x01_0203, octet << 16 | 0x0100_0003, octet << 8 | 0x0102_0003, octet | 0x0102_0300] }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 { values.append(UInt32.random(in: .min ... .max, using: &generator)) }
        for value in values {
            let expected = "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)"
            #expect(IPAddress.v4(value).description == expected)
            #expect(IPAddress(expected) == .v4(value))
        }
    }

    @Test("non-addresses are refused", arguments: ["", "1.2.3", "256.1.1.1", "example.com", "1.2.3.4:80", "::g"])
    func rejects(text: String) {
        #expect(IPAddress(text) == nil)
    }

    @Test("host:port and [v6]:port parse; bad ports and bare IPv6 are refused")
    func socketAddresses() {
        #expect(SocketAddress("10.0.0.1:3389")?.port == 3389)
        #expect(SocketAddress("[::1]:443")?.ip == IPAddress("::1"))
        #expect(SocketAddress("[::1]:443")?.description == "[::1]:443")
        for bad in ["10.0.0.1", "10.0.0.1:", "10.0.0.1:65536", "10.0.0.1:-1", "::1:80", "[::1]80", "host:80", "10.0.0.1:+80"] {
            #expect(SocketAddress(bad) == nil, "\(bad) should not parse")
        }
    }

    @Test("CIDR prefixes match what they should, including IPv4-mapped IPv6")
    func prefixes() throws {
        let net = try #require(CIDR("192.168.4.0/22"))
        #expect(net.contains(IPAddress("192.168.7.255")!))
        #expect(!net.contains(IPAddress("192.168.8.0")!))
        #expect(net.contains(IPAddress("::ffff:192.168.5.1")!))
        #expect(CIDR("0.0.0.0/0")!.contains(IPAddress("8.8.8.8")!))
        let v6 = try #require(CIDR("2001:db8:abcd::/48"))
        #expect(v6.contains(IPAddress("2001:db8:abcd:ffff::1")!))
        #expect(!v6.contains(IPAddress("2001:db8:abce::1")!))
        #expect(CIDR("10.0.0.0/33") == nil)
        #expect(CIDR("10.0.0.0/") == nil)
        #expect(CIDR("::/129") == nil)
        #expect(CIDR("10.0.0.5")?.prefixLength == 32)
    }

    @Test("host names resolve at config time; unknown ones are named in the error")
    func resolution() throws {
        #expect(try SocketAddress.resolve(host: "localhost", port: 22).port == 22)
        #expect(throws: AddressResolutionError.self) {
            try SocketAddress.resolve(host: "no-such-host.invalid", port: 1)
        }
    }
}

@Suite("Descriptors, sockets and splice", .offPool)
struct DescriptorTests {
    func flags(_ fd: FileDescriptor) -> (nonBlocking: Bool, closeOnExec: Bool) {
        let status = fcntl(fd.rawValue, F_GETFL)
        let descriptor = fcntl(fd.rawValue, F_GETFD)
        return (status & O_NONBLOCK != 0, descriptor & FD_CLOEXEC != 0)
    }

    @Test("every descriptor the layer makes is non-blocking and close-on-exec")
    func descriptorFlags() throws {
        let listener = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: true)
        defer { listener.close() }
        let client = try Socket.makeTCP(family: AF_INET)
        defer { client.close() }
        let pipe = try Pipe.make(size: 65536)
        defer { pipe.close() }
        let event = try EventFD()
        defer { event.close() }
        for fd in [listener, client, pipe.readEnd, pipe.writeEnd, event.fd] {
            let f = flags(fd)
            #expect(f.nonBlocking && f.closeOnExec, "\(fd)")
        }
        _ = try Socket.connect(client, to: Socket.localAddress(listener)!)
        #expect(BlockingWait.readable(listener, timeoutMilliseconds: 2000))
        guard case .done(let accepted) = try Socket.accept(listener) else { Issue.record("nothing to accept"); return }
        defer { accepted.fd.close() }
        let f = flags(accepted.fd)
        #expect(f.nonBlocking && f.closeOnExec)
        #expect(try Socket.accept(listener) == .wouldBlock)
    }

    @Test("would-block is a value; a reset is an Errno")
    func wouldBlockAndErrors() throws {
        let listener = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        defer { listener.close() }
        let client = try Socket.makeTCP(family: AF_INET)
        defer { client.close() }
        _ = try Socket.connect(client, to: Socket.localAddress(listener)!)
        BlockingWait.readable(listener, timeoutMilliseconds: 2000)
        guard case .done(let server) = try Socket.accept(listener) else { Issue.record("no accept"); return }
        var buffer = [UInt8](repeating: 0, count: 16)
        let empty = try buffer.withUnsafeMutableBytes { try client.read(into: $0) }
        #expect(empty == .wouldBlock)
        Socket.setResetOnClose(server.fd)
        server.fd.close()
        BlockingWait.readable(client, timeoutMilliseconds: 2000)
        #expect(throws: Errno.connectionReset) {
            _ = try buffer.withUnsafeMutableBytes { try client.read(into: $0) }
        }
        #expect(Errno.connectionReset.description.hasPrefix("ECONNRESET"))
    }

    @Test("splice moves bytes socket -> pipe -> socket without copying through user space")
    func spliceRoundTrip() throws {
        let listener = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        defer { listener.close() }
        let a = try Socket.makeTCP(family: AF_INET)
        defer { a.close() }
        _ = try Socket.connect(a, to: Socket.localAddress(listener)!)
        BlockingWait.readable(listener, timeoutMilliseconds: 2000)
        guard case .done(let b) = try Socket.accept(listener) else { Issue.record("no accept"); return }
        defer { b.fd.close() }
        let pipe = try Pipe.make(size: 1 << 20)
        defer { pipe.close() }
        #expect(pipe.capacity >= 65536)
        let message = Array("zero copy".utf8)
        try a.writeAll(message)
        BlockingWait.readable(b.fd, timeoutMilliseconds: 2000)
        #expect(try Splice.move(from: b.fd, to: pipe.writeEnd, maxBytes: pipe.capacity) == .done(message.count))
        #expect(try Splice.move(from: b.fd, to: pipe.writeEnd, maxBytes: pipe.capacity) == .wouldBlock)
        #expect(try Splice.move(from: pipe.readEnd, to: b.fd, maxBytes: message.count) == .done(message.count))
        BlockingWait.readable(a, timeoutMilliseconds: 2000)
        var buffer = [UInt8](repeating: 0, count: 64)
        let got = try buffer.withUnsafeMutableBytes { try a.read(into: $0) }
        #expect(got == .done(message.count))
        #expect(Array(buffer[0..<message.count]) == message)
    }

    @Test("a port held by another socket is reported as EADDRINUSE by the probe")
    func probe() throws {
        let holder = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        defer { holder.close() }
        #expect {
            try Socket.probeFree(Socket.localAddress(holder)!)
        } throws: { error in
            (error as? SystemCallError)?.errno == .addressInUse && "\(error)".contains("bind to 127.0.0.1:")
        }
    }

    @Test("epoll reports readiness with the token it was given")
    func epollTokens() throws {
        let epoll = try Epoll()
        let event = try EventFD()
        defer { event.close() }
        try epoll.add(event.fd, interest: [.readable], token: 0xABCD_0000_0007)
        #expect(try epoll.wait(timeoutMilliseconds: 0) { _, _ in } == 0)
        event.signal()
        var seen: [UInt64] = []
        _ = try epoll.wait(timeoutMilliseconds: 1000) { token, events in
            if events.contains(.readable) { seen.append(token) }
        }
        #expect(seen == [0xABCD_0000_0007])
    }
}

@Suite("Child processes", .offPool)
struct ChildProcessTests {
    @Test("output(of:): a child's exit status and its stdout (cut at the limit, the rest drained), stderr not captured; a missing program throws")
    func output() throws {
        let done = try ChildProcessLauncher.output(of: "/bin/sh", arguments: ["sh", "-c", "echo out; echo err >&2; exit 3"],
                                                   environment: [])
        #expect(done.status == 3 && done.output == Array("out\n".utf8))
        // 100,000 bytes into a 10-byte limit: the child is not stopped by a full pipe (it would hang or die of SIGPIPE).
        let long = try ChildProcessLauncher.output(of: "/bin/sh", arguments: ["sh", "-c", "head -c 100000 /dev/zero; echo done >&2"],
                                                   environment: ["PATH=/usr/bin:/bin"], limit: 10)
        #expect(long.status == 0 && long.output.count == 10)
        let killed = try ChildProcessLauncher.output(of: "/bin/sh", arguments: ["sh", "-c", "kill -TERM $$"], environment: [])
        #expect(killed.status == 128 + SIGTERM)
        #expect(throws: Errno.self) { try ChildProcessLauncher.output(of: "/nonexistent/program", arguments: ["x"], environment: []) }
    }
}
