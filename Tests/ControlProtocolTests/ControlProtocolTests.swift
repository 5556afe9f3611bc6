import Foundation
import Testing
import ControlProtocol
import TestSupport

@Suite("Control protocol", .offPool)
struct ControlProtocolTests {
    let key = ControlKey.generate()
    var signer: ControlSigner { ControlSigner(gatewayID: 7, key: key) }
    let body = Array(#"{"protocol":"tcp"}"#.utf8)

    @Test("HMAC-SHA-256 matches RFC 4231 test case 2")
    func hmacVector() {
        let mac = ControlCrypto.hmacSHA256(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8))
        #expect(ControlCrypto.hex(mac) == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    }

    @Test("a key round-trips through its text form and never prints")
    func keyText() throws {
        let parsed = try ControlKey(text: "  \(key.text)\n")
        #expect(parsed == key && key.text.count == 43)
        #expect("\(key)" == "<redacted>" && String(reflecting: key) == "<redacted>")
        #expect(throws: ControlKeyError.empty) { try ControlKey(text: " ") }
        #expect(throws: ControlKeyError.notBase64url) { try ControlKey(text: "not a key!") }
        #expect(throws: ControlKeyError.wrongLength(3)) { try ControlKey(text: "AAAA") }
    }

    @Test("a signed request verifies once, in its direction, with its key, method, path and body")
    func signAndVerify() throws {
        let now: Int64 = 1_800_000_000
        let header = signer.authorize(direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/a", body: body, now: now)
        let auth = try ControlAuthorization(header: header)
        #expect(auth.gatewayID == 7 && auth.timestamp == now)
        let replay = ReplayGuard()
        try signer.verify(auth, direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/a", body: body, replay: replay, now: now + 5)
        // The same request again: a replay.
        #expect(throws: ControlAuthError.replayed) {
            try signer.verify(auth, direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/a", body: body, replay: replay, now: now + 6)
        }
        // Anything changed: the signature fails (fresh replay guards, so only the MAC decides).
        let cases: [(ControlDirection, String, String, [UInt8])] = [
            (.gatewayToBroker, "PUT", "/control/v1/rules/a", body),
            (.brokerToGateway, "DELETE", "/control/v1/rules/a", body),
            (.brokerToGateway, "PUT", "/control/v1/rules/b", body),
            (.brokerToGateway, "PUT", "/control/v1/rules/a", body + [0x20]),
        ]
        for (direction, method, path, bytes) in cases {
            #expect(throws: ControlAuthError.badSignature) {
                try signer.verify(auth, direction: direction, method: method, path: path, body: bytes, replay: ReplayGuard(), now: now)
            }
        }
        // Another key (an unenrolled broker or gateway).
        let stranger = ControlSigner(gatewayID: 7, key: .generate())
        #expect(throws: ControlAuthError.badSignature) {
            try stranger.verify(auth, direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/a", body: body, replay: ReplayGuard(), now: now)
        }
        // Too old, too new.
        #expect(throws: ControlAuthError.clockSkew(seconds: -61)) {
            try signer.verify(auth, direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/a", body: body, replay: ReplayGuard(), now: now + 61)
        }
        #expect(throws: ControlAuthError.clockSkew(seconds: 61)) {
            try signer.verify(auth, direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/a", body: body, replay: ReplayGuard(), now: now - 61)
        }
        // Another gateway's id.
        #expect(throws: ControlAuthError.unknownGateway(8)) {
            let other = ControlAuthorization(gatewayID: 8, timestamp: auth.timestamp, nonce: auth.nonce, signature: auth.signature)
            try signer.verify(other, direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/a", body: body, replay: ReplayGuard(), now: now)
        }
    }

    @Test("base64url without Foundation: every length round-trips and matches Foundation's alphabet-swapped base64; bad text is refused")
    func base64url() {
        for length in 0..<70 {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255) }
            let text = ControlCrypto.base64url(bytes)
            let reference = Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
                .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
            #expect(text == reference, "length \(length)")
            #expect(ControlCrypto.fromBase64url(text) == bytes, "length \(length)")
            #expect(ControlCrypto.fromBase64url(Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
                .replacingOccurrences(of: "/", with: "_")) == bytes, "padded, length \(length)")
        }
        for bad in ["A", "AAAAA", "AA+A", "AA/A", "AA A", "é"] { #expect(ControlCrypto.fromBase64url(bad) == nil, "\(bad)") }
    }

    @Test("a header with spaces and tabs around its parts parses the same")
    func headerWhitespace() throws {
        let header = signer.authorize(direction: .brokerToGateway, method: "PUT", path: "/control/v1/rules/a", body: body, now: 1_800_000_000)
        let spaced = "\t " + header.replacingOccurrences(of: ", ", with: " ,\t").replacingOccurrences(of: "=", with: " = ") + " \t"
        #expect(try ControlAuthorization(header: spaced) == ControlAuthorization(header: header))
    }

    @Test("malformed Authorization headers are named, never crash", arguments: [
        "", "Bearer abc", "LEO-HMAC-SHA256", "LEO-HMAC-SHA256 gw=1", "LEO-HMAC-SHA256 gw=1, ts=2, nonce=3, sig=4",
        "LEO-HMAC-SHA256 gw=0, ts=2, nonce=00000000000000000000000000000000, sig=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "LEO-HMAC-SHA256 gw=1, ts=x, nonce=00000000000000000000000000000000, sig=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "LEO-HMAC-SHA256 gw=1, ts=2, nonce=0000000000000000000000000000000G, sig=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "LEO-HMAC-SHA256 gw=1, ts=2, nonce=00000000000000000000000000000000, sig=AAAA",
        "LEO-HMAC-SHA256 gw=1, gw=1, ts=2, nonce=00000000000000000000000000000000",
        "LEO-HMAC-SHA256 gw=1, ts=2, nonce=00000000000000000000000000000000, sig=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA, x=1",
    ])
    func malformedHeaders(header: String) {
        #expect {
            try ControlAuthorization(header: header)
        } throws: { error in
            guard let error = error as? ControlAuthError, case .malformed(let why) = error else { return false }
            return !why.isEmpty
        }
    }

    @Test("a rule's journal record, a delete record and a push's answer written by hand are JSONEncoder's exact bytes (sorted keys, escaping included), and read back the same")
    func handWrittenJSON() throws {
        let odd = "q\"b\\s/c\u{8}f\u{c}n\nr\rt\tu\u{1}\u{1f}\u{7f} é 😀"
        let pushes = [
            RulePush(protocol: .tcp, method: .randomPort, target: "10.0.0.5:3389"),
            RulePush(protocol: .udp, method: .protocolPortClientOnly, target: "[fd00::5]:4172", clientIP: "203.0.113.9",
                     port: 4172, unusedExpirySeconds: 0, forwardingPath: .kernel),
            RulePush(protocol: .both, method: .randomPortClientOnly, target: odd, clientIP: odd, port: -1,
                     unusedExpirySeconds: Int.max, forwardingPath: .offload),
        ]
        var rules: [RuleState] = []
        for (index, push) in pushes.enumerated() {
            rules.append(RuleState(id: "r\(index)", push: push, port: 20_001 + index, created: 1_765_000_000 + Int64(index)))
        }
        rules.append(RuleState(id: odd, push: pushes[2], port: 0, created: Int64.min, lastUsed: Int64.max, sessions: Int.max,
                               offloaded: ["198.51.100.7", odd], kernel: KernelTraffic(flows: 1, packets: UInt64.max, bytes: 0, offloadedClients: 2)))
        rules.append(RuleState(id: "", push: pushes[0], port: 1, created: 0, lastUsed: -5, sessions: 0, offloaded: []))
        for push in pushes {
            #expect(ControlJSON.encodePush(push) == ControlJSON.encode(push), "\(String(decoding: ControlJSON.encodePush(push), as: UTF8.self))")
        }
        for rule in rules {
            let mine = ControlJSON.encodeRule(rule)
            #expect(mine == ControlJSON.encode(rule), "\(String(decoding: mine, as: UTF8.self))")
            #expect(try JSONDecoder().decode(RuleState.self, from: Data(mine)) == rule)
            #expect(ControlJSON.encodeDelete(rule.id) == ControlJSON.encode(["delete": rule.id]))
        }
        struct Answer: Encodable { let id: String; let port: Int; let listen: String }
        for (id, listen) in [("a", "192.0.2.1:20001"), (odd, "[2001:db8::1]:65535")] {
            #expect(ControlJSON.encodePutAnswer(id: id, port: 65_535, listen: listen) == ControlJSON.encode(Answer(id: id, port: 65_535, listen: listen)))
        }
    }

    @Test("random bytes: exactly the count asked for, at every length around a word, and never the same twice")
    func randomBytes() {
        for count in [0, 1, 7, 8, 9, 15, 16, 17, 32, 33] {
            #expect(ControlCrypto.randomBytes(count).count == count)
        }
        let draws = (0..<64).map { _ in ControlCrypto.randomBytes(16) }
        #expect(Set(draws).count == 64)
        // Every byte position varies across draws (a tail left zero would not).
        for position in 0..<16 { #expect(Set(draws.map { $0[position] }).count > 1) }
    }

    @Test("a key's text is trimmed of any whitespace around it, ASCII or not; a key with none skips the trim")
    func keyTrim() throws {
        let key = ControlKey.generate()
        for text in [key.text, " \(key.text)\n", "\t\(key.text)\r\n", "\u{a0}\(key.text)\u{2028}", "\u{3000}\(key.text)"] {
            #expect(try ControlKey(text: text) == key)
        }
        #expect(ControlCrypto.visibleASCIIAtBothEnds(key.text))
        for text in ["", " a", "a ", "\u{a0}a", "é", "a\n"] { #expect(!ControlCrypto.visibleASCIIAtBothEnds(text)) }
        #expect(throws: ControlKeyError.empty) { try ControlKey(text: " \n ") }
    }

    @Test("strict decoding names the unknown, missing or mistyped field")
    func strictDecoding() throws {
        let good = Array(#"{"protocol":"tcp+udp","method":2,"target":"10.0.0.5:3389","client_ip":"198.51.100.7","unused_expiry_s":300}"#.utf8)
        let push = try ControlJSON.decodeStrict(RulePush.self, from: good, allowed: RulePush.fields)
        #expect(push == RulePush(protocol: .both, method: .randomPortClientOnly, target: "10.0.0.5:3389",
                                 clientIP: "198.51.100.7", unusedExpirySeconds: 300))
        let cases: [(String, ControlMessageError)] = [
            ("nope", .malformed("the body is not valid JSON")),
            ("[1]", .malformed("the body must be a JSON object")),
            (#"{"protocol":"tcp","method":0,"target":"a:1","colour":"red"}"#, .unknownField("colour")),
            (#"{"protocol":"tcp","method":0}"#, .missingField("target")),
            (#"{"protocol":"tcp","method":"0","target":"a:1"}"#, .wrongType("method")),
            (#"{"protocol":"sctp","method":0,"target":"a:1"}"#, .wrongType("protocol")),
            (#"{"protocol":"tcp","method":5,"target":"a:1"}"#, .wrongType("method")),
        ]
        for (text, expected) in cases {
            #expect(throws: expected) { try ControlJSON.decodeStrict(RulePush.self, from: Array(text.utf8), allowed: RulePush.fields) }
        }
        // Encoding round trip with snake_case keys.
        let encoded = String(decoding: ControlJSON.encode(push), as: UTF8.self)
        #expect(encoded.contains("\"client_ip\":\"198.51.100.7\"") && encoded.contains("\"unused_expiry_s\":300"))
    }

    @Test("the replay guard refuses rather than forgets when flooded with fresh nonces")
    func replayCapacity() {
        let guardian = ReplayGuard(capacity: 4)
        for i in 0..<4 { #expect(guardian.firstSight(gatewayID: 1, nonce: "n\(i)", timestamp: 100, now: 100)) }
        #expect(!guardian.firstSight(gatewayID: 1, nonce: "n4", timestamp: 100, now: 100))
        // Once the old ones are out of the window, there is room again.
        #expect(guardian.firstSight(gatewayID: 1, nonce: "n5", timestamp: 300, now: 300))
    }

    @Test("a push read by hand is what the strict decoder reads, on usual bodies and on thousands of damaged ones; it leaves the rest to the strict decoder")
    func pushReader() throws {
        let usual = [
            #"{"protocol":"tcp","method":0,"target":"10.0.0.5:3389"}"#,
            #"{"protocol":"tcp+udp","method":2,"target":"10.0.0.5:4172","client_ip":"203.0.113.9","unused_expiry_s":604800}"#,
            #" { "method" : 1 , "protocol" : "udp" ,"target":"[fd00::5]:3389", "client_ip":"fd00::9","port":3389,"forwarding_path":"kernel"}\#n"#,
            #"{"protocol":"tcp","method":0,"target":"x","port":-0,"unused_expiry_s":0}"#,
            #"{"protocol":"tcp","method":0,"target":"dé\#u{7F}sk","forwarding_path":"userspace"}"#,
        ]
        func strict(_ bytes: [UInt8]) -> RulePush? {
            try? ControlJSON.decodeStrict(RulePush.self, from: bytes, allowed: RulePush.fields)
        }
        for text in usual {
            let bytes = Array(text.utf8)
            let read = try #require(RulePushReader.read(bytes), "\(text)")
            #expect(read == strict(bytes), "\(text)")
            #expect(try RulePush.decode(bytes) == read)
        }
        // Every field a push may have is read by hand: a field added to
        // RulePush must be added to the reader (and here), or such pushes
        // silently take the slower strict path.
        let samples = ["protocol": #""tcp+udp""#, "method": "2", "target": #""10.0.0.5:4172""#, "client_ip": #""203.0.113.9""#,
                       "port": "4172", "unused_expiry_s": "60", "forwarding_path": #""kernel""#]
        #expect(Set(samples.keys) == RulePush.fields, "a field without a sample here: add it to RulePushReader and to this test")
        let every = Array(("{" + samples.map { "\"\($0.key)\":\($0.value)" }.joined(separator: ",") + "}").utf8)
        let all = try #require(RulePushReader.read(every))
        #expect(all == strict(every) && all.clientIP != nil && all.port != nil && all.unusedExpirySeconds != nil && all.forwardingPath != nil)
        // Left to the strict decoder (nil here), whatever it then says.
        let others = [
            #"{"protocol":"tcp","method":0,"target":"a\"b"}"#, #"{"protocol":"tcp","method":0.0,"target":"a"}"#,
            #"{"protocol":"tcp","method":0,"target":"a","port":1e3}"#, #"{"protocol":"tcp","method":0,"target":"a","port":null}"#,
            #"{"protocol":"tcp","method":0,"target":"a","target":"b"}"#, #"{"protocol":"tcp","method":0,"target":"a","x":1}"#,
            #"{"protocol":"tcp","method":0}"#, #"{"protocol":"TCP","method":0,"target":"a"}"#, #"{"protocol":"tcp","method":7,"target":"a"}"#,
            #"{"protocol":"tcp","method":0,"target":"a","port":01}"#, #"{"protocol":"tcp","method":0,"target":"a","port":99999999999999999999}"#,
            #"{"protocol":"tcp","method":"0","target":"a"}"#, #"{"protocol":"tcp","method":0,"target":"a"} x"#, #"[]"#, "", "{",
        ]
        for text in others { #expect(RulePushReader.read(Array(text.utf8)) == nil, "\(text)") }
        #expect(throws: ControlMessageError.unknownField("x")) { try RulePush.decode(Array(others[5].utf8)) }
        #expect(throws: ControlMessageError.missingField("target")) { try RulePush.decode(Array(others[6].utf8)) }
        // Damaged bodies: a byte changed, dropped or added at random. Whatever
        // the hand reader reads, the strict decoder reads the same.
        var generator = SystemRandomNumberGenerator()
        let alphabet = Array(#"{}[]":,. -+0123456789eEtrufalsn\/"#.utf8) + [0x00, 0x0A, 0x7F, 0xC3, 0xA9, 0xFF]
        var read = 0
        for round in 0..<20_000 {
            var bytes = Array(usual[round % usual.count].utf8)
            for _ in 0..<Int.random(in: 1...3, using: &generator) {
                let at = Int.random(in: 0..<bytes.count, using: &generator)
                switch Int.random(in: 0..<3, using: &generator) {
                case 0: bytes[at] = alphabet.randomElement(using: &generator)!
                case 1: if bytes.count > 1 { bytes.remove(at: at) }
                default: bytes.insert(alphabet.randomElement(using: &generator)!, at: at)
                }
            }
            if let push = RulePushReader.read(bytes) {
                read += 1
                #expect(push == strict(bytes), "\(String(decoding: bytes, as: UTF8.self))")
            }
        }
        // Some damage leaves a valid body (a space added, a digit changed).
        #expect(read > 100)
    }

    @Test("the replay guard keeps a nonce exactly while its request is fresh")
    func replayRetention() {
        let guardian = ReplayGuard(capacity: 100)
        let nonce = "0123456789abcdef0123456789abcdef"
        #expect(guardian.firstSight(gatewayID: 1, nonce: nonce, timestamp: 100, now: 100))
        // Another gateway's nonce is its own.
        #expect(guardian.firstSight(gatewayID: 2, nonce: nonce, timestamp: 100, now: 100))
        // A timestamp 60 s ahead (the most the skew check allows) is fresh 60 s longer.
        #expect(guardian.firstSight(gatewayID: 1, nonce: "ffffffffffffffffffffffffffffffff", timestamp: 160, now: 100))
        // Up to ts + 60 the request passes the timestamp check: still refused.
        #expect(!guardian.firstSight(gatewayID: 1, nonce: nonce, timestamp: 100, now: 160))
        #expect(guardian.count == 3)
        // One second later only the timestamp check can refuse it: forgotten.
        #expect(guardian.firstSight(gatewayID: 3, nonce: nonce, timestamp: 161, now: 161))
        #expect(guardian.count == 2)
        #expect(!guardian.firstSight(gatewayID: 1, nonce: "ffffffffffffffffffffffffffffffff", timestamp: 160, now: 220))
        #expect(guardian.firstSight(gatewayID: 4, nonce: nonce, timestamp: 221, now: 221))
        #expect(guardian.count == 2)
    }

    @Test("a steady rate the capacity holds for a minute is never refused")
    func replaySteadyRate() {
        // 12 requests/s: 61 s of them (732) fit 1,000; two windows (1,452) would not.
        let guardian = ReplayGuard(capacity: 1_000)
        var refused = 0
        for second in Int64(1_000)..<1_300 {
            for i in 0..<12 {
                let nonce = String(repeating: "0", count: 16) + String(String(second * 100 + Int64(i), radix: 16)).leftPadded(to: 16)
                if !guardian.firstSight(gatewayID: 1, nonce: nonce, timestamp: second, now: second) { refused += 1 }
            }
        }
        #expect(refused == 0)
        #expect(guardian.count <= 12 * 61)
    }
}

private extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}
