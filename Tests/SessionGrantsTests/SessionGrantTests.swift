import Foundation
import Testing
import SessionGrants
import TestSupport

/// Keys and certificates made by the real `openssl` command for each test run.
final class KeyFactory: @unchecked Sendable {
    let dir: String

    init() throws {
        dir = NSTemporaryDirectory() + "grants-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    @discardableResult
    func openssl(_ arguments: [String]) throws -> Int32 {
        try ChildProcess.run("/usr/bin/openssl", arguments, directory: dir).status
    }

    func read(_ name: String) throws -> String { try String(contentsOfFile: dir + "/" + name, encoding: .utf8) }

    /// `openssl dgst -sha256 -sign`: PKCS #1 v1.5 for RSA, DER for ECDSA.
    func sign(_ input: [UInt8], key: String) throws -> [UInt8] {
        let name = "input-\(UUID().uuidString)"
        _ = FileManager.default.createFile(atPath: dir + "/" + name, contents: Data(input))
        #expect(try openssl(["dgst", "-sha256", "-sign", key, "-out", name + ".sig", name]) == 0)
        return [UInt8](try #require(FileManager.default.contents(atPath: dir + "/" + name + ".sig")))
    }

    /// (private key PEM, certificate PEM) for `kind`: rsa2048, rsa1024, ec256, ec384, dsa.
    func pair(_ kind: String, digest: String = "-sha256") throws -> (key: String, cert: String) {
        let key = "\(kind).key", cert = "\(kind)\(digest).crt"
        if !FileManager.default.fileExists(atPath: dir + "/" + key) {
            let generated: Int32
            switch kind {
            case "rsa2048": generated = try openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key])
            case "rsa1024": generated = try openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", key])
            case "ec256": generated = try openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key])
            case "ec384": generated = try openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", key])
            case "dsa":
                try openssl(["genpkey", "-genparam", "-algorithm", "DSA", "-pkeyopt", "dsa_paramgen_bits:2048", "-out", "dsa.param"])
                generated = try openssl(["genpkey", "-paramfile", "dsa.param", "-out", key])
            default: fatalError(kind)
            }
            #expect(generated == 0, "openssl could not make a \(kind) key")
        }
        let signed = try openssl(["req", "-x509", "-new", "-key", key, digest, "-days", "2", "-subj", "/CN=cm.test", "-out", cert])
        #expect(signed == 0, "openssl could not make a \(kind) \(digest) certificate")
        return (try read(key), try read(cert))
    }
}

@Suite("Session grants", .serialized, .offPool)
struct SessionGrantTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    func grant(audience: String = "sg-group-a", singleUse: Bool = false, notBefore: Date? = nil, expires: TimeInterval = 300) -> SessionGrant {
        SessionGrant(sessionID: "s-1", agent: "10.0.0.5:4172", serverName: "agent-5.pcoip.example", client: "198.51.100.7",
                     audience: audience, issuedAt: now, notBefore: notBefore, expires: now.addingTimeInterval(expires),
                     singleUse: singleUse)
    }

    @Test("RS256 (RSA 2048) and ES256 (P-256): signed by the key, verified by the certificate, claims intact",
          arguments: ["rsa2048", "ec256"])
    func roundTrip(kind: String) async throws {
        let keys = try KeyFactory()
        let (key, cert) = try keys.pair(kind)
        let signer = try await GrantSigner.load(pem: key)
        let verifier = try await GrantVerifier.load(certificatePEM: cert, audience: "sg-group-a")
        #expect(signer.algorithm == (kind == "ec256" ? .es256 : .rs256) && verifier.algorithm == signer.algorithm)
        let original = grant()
        let token = try await signer.sign(original)
        let verified = try await verifier.verify(token, now: now.addingTimeInterval(10))
        #expect(verified == original)
    }

    @Test("forged, expired, not yet valid, other group, replayed: each refused with its reason")
    func refusals() async throws {
        let keys = try KeyFactory()
        let (key, cert) = try keys.pair("ec256")
        let signer = try await GrantSigner.load(pem: key)
        let verifier = try await GrantVerifier.load(certificatePEM: cert, audience: "sg-group-a")
        let token = try await signer.sign(grant())

        // A signature byte changed.
        var parts = token.split(separator: ".").map(String.init)
        var sig = Array(parts[2].utf8)
        sig[5] = sig[5] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
        parts[2] = String(decoding: sig, as: UTF8.self)
        await #expect(throws: GrantError.badSignature) { try await verifier.verify(parts.joined(separator: "."), now: now) }
        // The payload changed (another agent), signature kept.
        let otherPayload = try await signer.sign(SessionGrant(sessionID: "s-1", agent: "10.9.9.9:4172", serverName: "agent-5.pcoip.example",
                                                               audience: "sg-group-a", issuedAt: now, expires: now.addingTimeInterval(300)))
        let spliced = [token.split(separator: ".")[0], otherPayload.split(separator: ".")[1], token.split(separator: ".")[2]].joined(separator: ".")
        await #expect(throws: GrantError.badSignature) { try await verifier.verify(spliced, now: now) }
        // Signed by another key of the same kind.
        let (strangerKey, _) = try KeyFactory().pair("ec256")
        let stranger = try await GrantSigner.load(pem: strangerKey)
        await #expect(throws: GrantError.badSignature) { try await verifier.verify(try await stranger.sign(grant()), now: now) }
        // Time.
        await #expect(throws: GrantError.expired) { try await verifier.verify(token, now: now.addingTimeInterval(331)) }
        _ = try await verifier.verify(token, now: now.addingTimeInterval(320))  // within the 30 s leeway
        let later = try await signer.sign(grant(notBefore: now.addingTimeInterval(600), expires: 900))
        await #expect(throws: GrantError.notYetValid) { try await verifier.verify(later, now: now) }
        // Another gateway group.
        let elsewhere = try await signer.sign(grant(audience: "sg-group-b"))
        await #expect(throws: GrantError.wrongAudience("sg-group-b")) { try await verifier.verify(elsewhere, now: now) }
        // Single use: the second presentation is a replay; a reusable grant is fine twice.
        let once = try await signer.sign(grant(singleUse: true))
        _ = try await verifier.verify(once, now: now)
        await #expect(throws: GrantError.replayed) { try await verifier.verify(once, now: now) }
        _ = try await verifier.verify(token, now: now)
        _ = try await verifier.verify(token, now: now)
        // Garbage.
        for junk in ["", "a.b", "a.b.c", "....", String(repeating: "x", count: 10_000)] {
            await #expect(throws: GrantError.self) { try await verifier.verify(junk, now: now) }
        }
    }

    @Test("base64url parts decode as Foundation's decoder did (through padding), for every length and alphabet, junk included")
    func base64urlMatchesFoundation() throws {
        // The decoder before this one: the alphabet checked, `-_` mapped, padded, Foundation decoding.
        func reference(_ text: String) -> [UInt8]? {
            guard text.utf8.allSatisfy({ b in
                (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D || b == 0x5F
            }), text.utf8.count % 4 != 1 else { return nil }
            var base64 = text.utf8.map { $0 == 0x2D ? UInt8(ascii: "+") : $0 == 0x5F ? UInt8(ascii: "/") : $0 }
            while base64.count % 4 != 0 { base64.append(UInt8(ascii: "=")) }
            return Data(base64Encoded: String(decoding: base64, as: UTF8.self)).map { [UInt8]($0) }
        }
        let prefix = base64url(#"{"alg":"ES256"}"#) + "." + base64url(#"{"sid":"s"}"#) + "."
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        let junk = Array("+/= é\u{0}\n")
        var generator = SystemRandomNumberGenerator()
        var cases = ["", "A", "AA", "AAA", "AAAA", "QR", "QUJ", "_-_-", "c2ln"]
        for length in 0..<40 {
            for _ in 0..<25 {
                var text = String((0..<length).map { _ in alphabet.randomElement(using: &generator)! })
                if length > 0 && Int.random(in: 0..<5, using: &generator) == 0 {
                    let at = text.index(text.startIndex, offsetBy: Int.random(in: 0..<length, using: &generator))
                    text.replaceSubrange(at...at, with: String(junk.randomElement(using: &generator)!))
                }
                cases.append(text)
            }
        }
        for text in cases {
            let decoded = (try? GrantToken(parsing: prefix + text))?.signature
            #expect(decoded == reference(text), "\(text.debugDescription)")
        }
    }

    @Test("the unverified header: alg must be a string, crit must be absent, the header a JSON object")
    func headerChecks() throws {
        func parse(_ header: String) -> Result<GrantToken, GrantError> {
            Result { () throws(GrantError) in try GrantToken(parsing: base64url(header) + "." + base64url(#"{"sid":"s"}"#) + ".c2ln") }
        }
        #expect(try parse(#"{"alg":"ES256","typ":"JWT"}"#).get().algorithm == "ES256")
        #expect(try parse(#"{"alg":"ES256"}"#).get().payload == Array(#"{"sid":"s"}"#.utf8))
        for (header, reason) in [
            (#"{"typ":"JWT"}"#, "the header has no alg"), (#"{"alg":256}"#, "the header has no alg"),
            (#"{"alg":""}"#, "the header has no alg"), (#"{"alg":"\#(String(repeating: "A", count: 17))"}"#, "the header has no alg"),
            (#"{"alg":"ES256","crit":["exp"]}"#, "critical header extensions are not supported"),
            (#"{"alg":"ES256","crit":null}"#, "critical header extensions are not supported"),
            (#"["alg","ES256"]"#, "the header is not base64url JSON"), ("alg", "the header is not base64url JSON"),
        ] {
            #expect(throws: GrantError.malformed(reason), "\(header)") { try parse(header).get() }
        }
        #expect(throws: GrantError.malformed("the header is not base64url JSON")) {
            try GrantToken(parsing: "e30+." + base64url("{}") + ".c2ln")
        }
    }

    @Test("alg none, and HS256 keyed with the public certificate, are refused before any signature check")
    func algorithmConfusion() async throws {
        let keys = try KeyFactory()
        let (key, cert) = try keys.pair("rsa2048")
        let signer = try await GrantSigner.load(pem: key)
        let verifier = try await GrantVerifier.load(certificatePEM: cert, audience: "sg-group-a")
        let payload = String(try await signer.sign(grant()).split(separator: ".")[1])
        let none = base64url(#"{"alg":"none","typ":"JWT"}"#) + "." + payload + "."
        await #expect(throws: GrantError.algorithmNotAllowed("none")) { try await verifier.verify(none, now: now) }
        let hs = base64url(#"{"alg":"HS256","typ":"JWT"}"#) + "." + payload
        let mac = hmacSHA256(key: Array(cert.utf8), message: Array(hs.utf8))
        let hsToken = hs + "." + base64url(mac)
        await #expect(throws: GrantError.algorithmNotAllowed("HS256")) { try await verifier.verify(hsToken, now: now) }
        // ES256 presented to an RS256 verifier.
        let es = base64url(#"{"alg":"ES256","typ":"JWT"}"#) + "." + payload + ".AAAA"
        await #expect(throws: GrantError.algorithmNotAllowed("ES256")) { try await verifier.verify(es, now: now) }
    }

    @Test("tokens signed by the openssl command (RS256; ES256 as raw r || s) verify; a DER ES256 signature, a changed header and a signed payload that is not a grant are refused")
    func signaturesMadeElsewhere() async throws {
        let keys = try KeyFactory()
        let expected = grant()
        let payload = String(decoding: try JSONEncoder().encode(expected), as: UTF8.self)
        for kind in ["rsa2048", "ec256"] {
            let (_, cert) = try keys.pair(kind)
            let verifier = try await GrantVerifier.load(certificatePEM: cert, audience: "sg-group-a")
            let header = base64url(#"{"alg":"\#(kind == "ec256" ? "ES256" : "RS256")","typ":"JWT"}"#)
            func token(_ header: String, _ payload: String) throws -> (input: String, signature: [UInt8]) {
                let input = header + "." + base64url(payload)
                let signed = try keys.sign(Array(input.utf8), key: "\(kind).key")
                return (input, kind == "ec256" ? try rawECDSA(fromDER: signed) : signed)
            }
            let good = try token(header, payload)
            #expect(try await verifier.verify(good.input + "." + base64url(good.signature), now: now) == expected, "\(kind)")
            // The header is signed too: another typ with the same signature fails.
            let otherHeader = base64url(#"{"alg":"\#(kind == "ec256" ? "ES256" : "RS256")","typ":"jwt"}"#)
            let moved = otherHeader + "." + base64url(payload) + "." + base64url(good.signature)
            await #expect(throws: GrantError.badSignature, "\(kind)") { try await verifier.verify(moved, now: now) }
            // A signature cut short, and (ES256) the DER form JWS does not use.
            let cut = good.input + "." + base64url(Array(good.signature.dropLast()))
            await #expect(throws: GrantError.badSignature, "\(kind)") { try await verifier.verify(cut, now: now) }
            if kind == "ec256" {
                let der = try keys.sign(Array(good.input.utf8), key: "ec256.key")
                await #expect(throws: GrantError.badSignature) { try await verifier.verify(good.input + "." + base64url(der), now: now) }
            }
            // Signed, but not a grant: named after the signature is checked.
            let partial = try token(header, #"{"sid":"s-1"}"#)
            await #expect(throws: GrantError.malformed("the payload is not a grant (agent: missing)"), "\(kind)") {
                try await verifier.verify(partial.input + "." + base64url(partial.signature), now: now)
            }
            let array = try token(header, "[1]")
            await #expect(throws: GrantError.malformed("the payload is not a grant (not a JSON object)"), "\(kind)") {
                try await verifier.verify(array.input + "." + base64url(array.signature), now: now)
            }
        }
    }

    @Test("DSA keys, RSA under 2,048 bits, other curves and MD5-signed certificates are refused with a clear message")
    func weakKeys() async throws {
        let keys = try KeyFactory()
        let dsa = try keys.pair("dsa")
        await #expect(throws: GrantError.self) { _ = try await GrantSigner.load(pem: dsa.key) }
        await #expect { _ = try await GrantVerifier.load(certificatePEM: dsa.cert, audience: "a") } throws: { error in
            "\(error)".contains("refused") && "\(error)".contains("DSA")
        }
        let small = try keys.pair("rsa1024")
        await #expect(throws: GrantError.weakKey("RSA key of 1024 bits; at least 2,048 are required")) { _ = try await GrantSigner.load(pem: small.key) }
        await #expect(throws: GrantError.weakCertificate("its RSA key is smaller than 2,048 bits")) {
            _ = try await GrantVerifier.load(certificatePEM: small.cert, audience: "a")
        }
        let p384 = try keys.pair("ec384")
        await #expect(throws: GrantError.self) { _ = try await GrantSigner.load(pem: p384.key) }
        await #expect(throws: GrantError.weakCertificate("its key is neither RSA nor ECDSA P-256")) {
            _ = try await GrantVerifier.load(certificatePEM: p384.cert, audience: "a")
        }
        let md5 = try keys.pair("rsa2048", digest: "-md5")
        await #expect(throws: GrantError.weakCertificate("signed with MD5")) {
            _ = try await GrantVerifier.load(certificatePEM: md5.cert, audience: "a")
        }
        await #expect(throws: GrantError.unreadableKey("not a PEM private key")) { _ = try await GrantSigner.load(pem: "hello") }
        await #expect(throws: GrantError.unreadableCertificate("not a PEM X.509 certificate")) {
            _ = try await GrantVerifier.load(certificatePEM: "hello", audience: "a")
        }
    }
}

/// Unpadded base64url, as a JWT's parts are written.
func base64url(_ text: String) -> String { base64url(Array(text.utf8)) }

func base64url(_ bytes: [UInt8]) -> String {
    Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
        .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
}

/// An ECDSA P-256 signature in DER (SEQUENCE of two INTEGERs) as JWS
/// writes it: r and s, 32 bytes each.
func rawECDSA(fromDER der: [UInt8]) throws -> [UInt8] {
    var at = 2   // SEQUENCE, length (short form: at most 72 bytes)
    try #require(der.count > 8 && der[0] == 0x30)
    var raw: [UInt8] = []
    for _ in 0..<2 {
        try #require(der[at] == 0x02)
        let length = Int(der[at + 1])
        var value = Array(der[(at + 2)..<(at + 2 + length)])
        while value.count > 32 && value.first == 0 { value.removeFirst() }
        raw += [UInt8](repeating: 0, count: 32 - value.count) + value
        at += 2 + length
    }
    return raw
}

/// HMAC-SHA-256 by the `openssl` command (the attacker's tool in the algorithm-confusion test).
func hmacSHA256(key: [UInt8], message: [UInt8]) -> [UInt8] {
    let dir = NSTemporaryDirectory() + "hmac-\(UUID().uuidString)"
    try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    _ = FileManager.default.createFile(atPath: dir + "/m", contents: Data(message))
    let hexKey = key.map { String(format: "%02x", $0) }.joined()
    _ = try! ChildProcess.run("/usr/bin/openssl", ["dgst", "-sha256", "-mac", "HMAC", "-macopt", "hexkey:\(hexKey)",
                                                   "-binary", "-out", dir + "/mac", dir + "/m"])
    return [UInt8](FileManager.default.contents(atPath: dir + "/mac")!)
}
