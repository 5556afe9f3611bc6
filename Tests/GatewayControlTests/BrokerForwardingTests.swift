import ControlProtocol
import Foundation
import GatewayControl
import Glibc
import Relay
import SystemLayer
import Testing
import TestSupport

/// Broker forwarding: a raw socket server stands in for the broker, reads
/// what the gateway writes first and checks it is a PROXY v2 header whose
/// addresses are the client's and the gateway's and whose 0xE1 TLV verifies.
@Suite(.serialized, .offPool) struct BrokerForwardingTests {
    /// Reads from `fd` until `count` bytes arrived (3 s per wait).
    static func read(_ fd: FileDescriptor, count: Int) -> [UInt8] {
        var data: [UInt8] = []
        while data.count < count {
            guard BlockingWait.readable(fd, timeoutMilliseconds: TestDeadline.milliseconds) else { break }
            // Exactly what is still missing, so bytes after it stay in the socket.
            var buffer = [UInt8](repeating: 0, count: count - data.count)
            let result = buffer.withUnsafeMutableBytes { try? fd.read(into: $0) }
            guard case .done(let n)? = result, n > 0 else { if case .wouldBlock? = result { continue }; break }
            data.append(contentsOf: buffer[0..<n])
        }
        return data
    }

    @Test func headerComesFirstAndVerifies() async throws {
        let key = ControlKey.generate()
        let gateway = try await TestGateway.start(key: key)
        let upstream = try Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false)
        defer { upstream.close() }
        let brokerAddress = Socket.localAddress(upstream)!
        try await offPool {
            let listen = TestPorts.freeAddress()
            let signer = ControlSigner(gatewayID: TestGateway.gatewayID, key: key)
            try gateway.control.setForwardRule(BrokerForwarding.rule(listen: listen, broker: brokerAddress, signer: signer,
                                                                     signature: "leo-gw-signature-1"))
            #expect(!("\(gateway.engine.rules)").contains(key.text))

            // The client connects from 127.0.0.2 and sends its first bytes (a TLS ClientHello would go here).
            let client = try Socket.makeTCP(family: AF_INET)
            defer { client.close() }
            try Socket.bind(client, to: SocketAddress("127.0.0.2:0")!)
            if case .inProgress = try Socket.connect(client, to: listen) {
                #expect(BlockingWait.writable(client, timeoutMilliseconds: TestDeadline.milliseconds))
            }
            let clientAddress = Socket.localAddress(client)!
            try client.writeAll(Array("CLIENT-FIRST-BYTES".utf8))

            #expect(BlockingWait.readable(upstream, timeoutMilliseconds: TestDeadline.milliseconds))
            guard case .done(let accepted) = try Socket.accept(upstream) else { Issue.record("no connection reached the broker"); return }
            defer { accepted.fd.close() }
            let fixed = Self.read(accepted.fd, count: 16)
            try #require(fixed.count == 16)
            #expect(Array(fixed[0..<12]) == [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
            #expect(fixed[12] == 0x21, "version 2, command PROXY")
            #expect(fixed[13] == 0x11, "AF_INET, STREAM")
            let length = Int(fixed[14]) << 8 | Int(fixed[15])
            let body = Self.read(accepted.fd, count: length)
            try #require(body.count == length)
            let source = "\(body[0]).\(body[1]).\(body[2]).\(body[3])"
            let destination = "\(body[4]).\(body[5]).\(body[6]).\(body[7])"
            let sourcePort = Int(body[8]) << 8 | Int(body[9])
            let destinationPort = Int(body[10]) << 8 | Int(body[11])
            #expect(source == "127.0.0.2")
            #expect(sourcePort == Int(clientAddress.port))
            #expect(destination == "127.0.0.1")
            #expect(destinationPort == Int(listen.port))
            var tlvs: [UInt8: [UInt8]] = [:]
            var offset = 12
            while offset + 3 <= body.count {
                let size = Int(body[offset + 1]) << 8 | Int(body[offset + 2])
                tlvs[body[offset]] = Array(body[(offset + 3)..<(offset + 3 + size)])
                offset += 3 + size
            }
            #expect(offset == body.count)
            #expect(tlvs[0xE0].map { String(decoding: $0, as: UTF8.self) } == "leo-gw-signature-1")
            let auth = String(decoding: try #require(tlvs[0xE1]), as: UTF8.self)
            var parts: [String: String] = [:]
            for part in auth.split(separator: ",") {
                let pair = part.split(separator: "=", maxSplits: 1)
                parts[String(pair[0])] = String(pair[1])
            }
            #expect(parts["gw"] == "\(TestGateway.gatewayID)")
            let ts = try #require(parts["ts"].flatMap { Int64($0) })
            #expect(abs(ts - ControlClock.unixSeconds()) <= 60)
            let expected = ControlCrypto.hmacSHA256(key: key.bytes, message: Array(
                "proxy-v2\n\(TestGateway.gatewayID)\n\(ts)\n\(source)\n\(sourcePort)\n\(destination)\n\(destinationPort)".utf8))
            #expect(parts["mac"] == ControlCrypto.base64url(expected), "the 0xE1 MAC does not verify under the control key")
            #expect(!auth.contains(key.text))

            // Then the client's own bytes, whole and in order, and the way back works.
            #expect(String(decoding: Self.read(accepted.fd, count: 18), as: UTF8.self) == "CLIENT-FIRST-BYTES")
            try accepted.fd.writeAll(Array("BROKER-REPLY".utf8))
            #expect(String(decoding: Self.read(client, count: 12), as: UTF8.self) == "BROKER-REPLY")

            // Removing forwarding closes its listener.
            try gateway.control.setForwardRule(nil)
            #expect(echoThrough(port: Int(listen.port)) == nil)
        }
        await gateway.stop()
    }

    @Test func ipv6ClientToIPv4ListenerMapsBothAddresses() throws {
        let signer = ControlSigner(gatewayID: 3, key: .generate())
        let header = BrokerForwarding.header(client: SocketAddress("[2001:db8::7]:5000")!, destination: SocketAddress("10.0.0.2:443")!,
                                             signer: signer, signature: "", timestamp: 1000)
        #expect(header[13] == 0x21, "AF_INET6 when the families differ")
        // Destination 10.0.0.2 as ::ffff:10.0.0.2.
        #expect(Array(header[(16 + 16)..<(16 + 32)]) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 10, 0, 0, 2])
    }
}
