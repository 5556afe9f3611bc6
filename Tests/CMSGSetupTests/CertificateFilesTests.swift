import CertificateFiles
import Foundation
import SessionGrants
import Testing
import TestSupport

/// PEM material made with the openssl command, as an operator would bring it.
struct OpenSSLFiles {
    let dir: String

    init() throws {
        dir = NSTemporaryDirectory() + "certs-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    func remove() { try? FileManager.default.removeItem(atPath: dir) }

    func path(_ name: String) -> String { dir + "/" + name }

    func bytes(_ name: String) throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: path(name)))) }

    /// `openssl ARGS` in the folder. - Throws when it fails.
    func openssl(_ arguments: [String]) throws {
        let done = try ChildProcess.run("/usr/bin/openssl", arguments, directory: dir)
        guard done.status == 0 else { throw TimedOut("openssl \(arguments.joined(separator: " ")): \(done.stderr)", seconds: 0) }
    }

    /// A self-signed certificate and key: `rsa:BITS` or `dsa` (2048), signed with `digest`.
    func pair(_ name: String, key: String, digest: String = "-sha256") throws {
        if key == "dsa" {
            try openssl(["dsaparam", "-genkey", "-out", "\(name).key", "2048"])
            try openssl(["req", "-x509", "-new", "-key", "\(name).key", digest, "-days", "2", "-subj", "/CN=\(name)", "-out", "\(name).crt"])
        } else {
            try openssl(["req", "-x509", "-newkey", key, "-nodes", "-keyout", "\(name).key", digest, "-days", "2", "-subj", "/CN=\(name)",
                         "-out", "\(name).crt"])
        }
    }
}

@Suite("Certificates and keys through OpenSSL: HP's checks, self-signed RSA 3072", .serialized, .offPool)
struct CertificateFilesTests {
    func problem(_ files: OpenSSLFiles, _ cert: String, _ key: String, certBytes: [UInt8]? = nil) throws -> String? {
        let certPEM = try certBytes ?? files.bytes(cert)
        let keyPEM = try files.bytes(key)
        do throws(CertificateFiles.Problem) {
            try CertificateFiles.checkServerPair(certificate: certPEM, certificateFile: files.path(cert),
                                                 key: keyPEM, keyFile: files.path(key))
            return nil
        } catch {
            return error.description
        }
    }

    @Test("an RSA 2048 pair passes; Windows line endings are tolerated")
    func good() throws {
        let files = try OpenSSLFiles()
        defer { files.remove() }
        try files.pair("good", key: "rsa:2048")
        #expect(try problem(files, "good.crt", "good.key") == nil)
        let crlf = Array(String(decoding: try files.bytes("good.crt"), as: UTF8.self).replacingOccurrences(of: "\n", with: "\r\n").utf8)
        #expect(try problem(files, "good.crt", "good.key", certBytes: crlf) == nil)
        let info = try CertificateFiles.certificate(pem: try files.bytes("good.crt"), file: "good.crt")
        #expect(info.key == .init(kind: .rsa, bits: 2048) && info.selfSigned && info.subject.contains("CN=good"))
        #expect(info.signatureAlgorithm == "sha256WithRSAEncryption")
    }

    @Test("refused, naming the file: DSA, RSA under 2048, an MD5 signature, an EC key, a key of another certificate, not PEM, an encrypted key")
    func refused() throws {
        let files = try OpenSSLFiles()
        defer { files.remove() }
        try files.pair("dsa", key: "dsa")
        try files.pair("small", key: "rsa:1024")
        try files.pair("md5", key: "rsa:2048", digest: "-md5")
        try files.pair("other", key: "rsa:2048")
        try files.pair("good", key: "rsa:2048")
        try files.openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ec.key",
                           "-days", "2", "-subj", "/CN=ec", "-out", "ec.crt"])
        try files.openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-aes-128-cbc", "-pass", "pass:secret",
                           "-out", "encrypted.key"])
        #expect(try problem(files, "dsa.crt", "dsa.key")?.contains("dsa.crt: a DSA key") == true)
        #expect(try problem(files, "small.crt", "small.key")?.contains("small.crt: an RSA key of 1024 bits") == true)
        let md5 = try problem(files, "md5.crt", "md5.key")
        #expect(md5?.contains("md5.crt: signed with md5WithRSAEncryption") == true, "\(md5 ?? "accepted")")
        #expect(try problem(files, "ec.crt", "ec.key")?.contains("ec.crt: a key of type EC") == true)
        #expect(try problem(files, "good.crt", "other.key")?.contains("other.key: this key does not belong") == true)
        #expect(try problem(files, "good.key", "good.key")?.contains("not a PEM certificate") == true)
        #expect(try problem(files, "good.crt", "good.crt")?.contains("good.crt: not a PEM private key") == true)
        #expect(try problem(files, "good.crt", "encrypted.key")?.contains("encrypted") == true)
    }

    @Test("a self-signed certificate: RSA 3072, SHA-256, the names and addresses asked for, and it passes the checks")
    func selfSigned() throws {
        let made = try CertificateFiles.makeSelfSigned(commonName: "cm.example", subjectAltNames: ["cm.example", "203.0.113.5", "2001:db8::5"])
        let info = try CertificateFiles.certificate(pem: Array(made.certificate.utf8), file: "made")
        #expect(info.key == .init(kind: .rsa, bits: 3072) && info.signatureAlgorithm == "sha256WithRSAEncryption" && info.selfSigned)
        try CertificateFiles.checkServerPair(certificate: Array(made.certificate.utf8), certificateFile: "made.crt",
                                             key: Array(made.key.utf8), keyFile: "made.key")
        let files = try OpenSSLFiles()
        defer { files.remove() }
        try Data(made.certificate.utf8).write(to: URL(fileURLWithPath: files.path("made.crt")))
        let text = try ChildProcess.run("/usr/bin/openssl", ["x509", "-in", files.path("made.crt"), "-noout", "-text"]).stdout
        #expect(text.contains("DNS:cm.example") && text.contains("IP Address:203.0.113.5") && text.contains("IP Address:2001:DB8:0:0:0:0:0:5"))
        #expect(text.contains("TLS Web Server Authentication") && text.contains("CA:FALSE"))
    }

    @Test("a grant signing pair: an ES256 key whose certificate verifies the grants it signs")
    func grantPair() async throws {
        let pair = try CertificateFiles.makeGrantSigningPair(commonName: "grants")
        let signer = try await GrantSigner.load(pem: pair.key)
        #expect(signer.algorithm == .es256)
        let verifier = try await GrantVerifier.load(certificatePEM: pair.certificate, audience: "g")
        let now = Date()
        let grant = SessionGrant(sessionID: "s", agent: "10.0.0.5:4172", serverName: "a.test", audience: "g", issuedAt: now,
                                 expires: now.addingTimeInterval(60))
        #expect(try await verifier.verify(try await signer.sign(grant), recordUse: false).sessionID == "s")
    }
}
