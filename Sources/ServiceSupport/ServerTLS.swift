import CertificateFiles
import FoundationEssentials
import NIOSSL
import SystemLayer

/// TLS of a control endpoint (issue 14): the gateway's (`control_tls_cert`,
/// `control_tls_key`) and the Security Gateway's (`ControlTLSCert`,
/// `ControlTLSKey`). The certificate and key the config names, or a
/// self-signed RSA 3072 pair the daemon makes in its state or data folder at
/// first start (`control-tls.crt`, `control-tls.key` 0600), CA:TRUE so that
/// a peer can pin it as its only trust root.
public struct ServerTLS: Sendable {
    /// The address a listener serves, as a made certificate's name (none for a wildcard address).
    public static func names(listening address: SocketAddress) -> [String] {
        ["\(address.ip)"].filter { $0 != "0.0.0.0" && $0 != "::" }
    }

    /// Why the pair cannot be used: the config key (or file) at fault and a sentence.
    public struct Problem: Error, Sendable, Codable, CustomStringConvertible {
        public let field: String
        public let message: String
        public var description: String { "\(field): \(message)" }
    }

    /// The server configuration (TLS 1.2 or later).
    public let configuration: TLSConfiguration
    /// The certificate, PEM (what the gateway registers with the broker).
    public let certificatePEM: String
    /// Where it came from, for the log.
    public let source: String
    /// "SHA256:AB:CD:..." of the certificate (what peers pin).
    public let fingerprint: String

    /// Where the OpenSSL part of `load` runs: making a missing pair,
    /// checking it (`CertificateFiles.checkServerPair`) and hashing it.
    public enum PairCheck: Sendable {
        /// In this process.
        case inProcess
        /// In a short-lived child (with our environment): `executable` with
        /// `arguments` and the request (one JSON argument) after them, which prints
        /// `ServerTLS.answer(request:)`. The daemon then never runs
        /// OpenSSL's decoders or key generation itself: they stay out of its
        /// address space and its resident memory (the Security Gateway,
        /// issue 15: about 2.4 MiB of libcrypto's pages), and a fault in
        /// them ends the child, not the daemon.
        case child(executable: String, arguments: [String])
    }

    /// A checked pair: its files, the exact bytes checked (the daemon loads
    /// these, not a second read), and the certificate's SHA-256. `Data`, so
    /// that a child's answer carries them as base64.
    struct CheckedPair: Codable, Sendable {
        var certificatePath: String
        var keyPath: String
        var certificatePEM: Data
        var keyPEM: Data
        var sha256: Data
    }

    /// What `load` asks of a check.
    struct PairRequest: Codable, Sendable {
        var certificate: String?
        var key: String?
        var folder: String
        var names: [String]
        var certificateField: String
        var keyField: String
        var stem: String
    }

    /// A check's answer: the pair, or the problem.
    struct PairAnswer: Codable, Sendable {
        var pair: CheckedPair?
        var problem: Problem?
    }

    /// Loads the configured pair, or the folder's (made when missing).
    /// - Parameters:
    ///   - fields: the config keys named in errors (certificate, key).
    ///   - names: IP addresses and names a made certificate is for.
    ///   - stem: the made pair's file names in `folder` (`STEM.crt`, `STEM.key`).
    ///   - check: where the pair is made and checked (see `PairCheck`).
    /// - Throws: `Problem` naming the config key and the file.
    public static func load(certificate: String?, key: String?, folder: String, names: [String],
                            fields: (certificate: String, key: String), stem: String = "control-tls",
                            check: PairCheck = .inProcess) throws(Problem) -> ServerTLS {
        let request = PairRequest(certificate: certificate, key: key, folder: folder, names: names,
                                  certificateField: fields.certificate, keyField: fields.key, stem: stem)
        let pair: CheckedPair
        switch check {
        case .inProcess:
            pair = try checkedPair(request)
        case .child(let executable, let arguments):
            pair = try checkedPairInChild(request, executable: executable, arguments: arguments)
        }
        do {
            let chain = try NIOSSLCertificate.fromPEMBytes(Array(pair.certificatePEM))
            var configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(pair.keyPEM), format: .pem)))
            configuration.minimumTLSVersion = .tlsv12
            return ServerTLS(configuration: configuration, certificatePEM: String(decoding: pair.certificatePEM, as: UTF8.self),
                             source: pair.certificatePath, fingerprint: TLSClientSession.fingerprint(Array(pair.sha256)))
        } catch {
            throw Problem(field: fields.certificate, message: "\(pair.certificatePath): \(error)")
        }
    }

    /// The child's side of `PairCheck.child`: checks (and makes) the pair a
    /// request names. - Returns: the answer, one JSON line, for stdout.
    public static func answer(request json: String) -> String {
        let answer: PairAnswer
        if let request = try? JSONDecoder().decode(PairRequest.self, from: Data(json.utf8)) {
            do throws(Problem) {
                answer = PairAnswer(pair: try checkedPair(request))
            } catch {
                answer = PairAnswer(problem: error)
            }
        } else {
            answer = PairAnswer(problem: Problem(field: "request", message: "not a certificate check request"))
        }
        let bytes = (try? JSONEncoder().encode(answer)) ?? Data()
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Makes a missing pair, reads and checks it, and hashes the certificate (OpenSSL).
    static func checkedPair(_ request: PairRequest) throws(Problem) -> CheckedPair {
        let certificatePath: String, keyPath: String
        if let certificate = request.certificate, let key = request.key {
            (certificatePath, keyPath) = (certificate, key)
        } else {
            certificatePath = request.folder + "/" + request.stem + ".crt"
            keyPath = request.folder + "/" + request.stem + ".key"
            if !FileManager.default.fileExists(atPath: certificatePath) || !FileManager.default.fileExists(atPath: keyPath) {
                try make(certificatePath: certificatePath, keyPath: keyPath, names: request.names, field: request.certificateField)
            }
        }
        guard let certificatePEM = FileManager.default.contents(atPath: certificatePath) else {
            throw Problem(field: request.certificateField, message: "\(certificatePath) cannot be read")
        }
        guard let keyPEM = FileManager.default.contents(atPath: keyPath) else {
            throw Problem(field: request.keyField, message: "\(keyPath) cannot be read")
        }
        do throws(CertificateFiles.Problem) {
            try CertificateFiles.checkServerPair(certificate: Array(certificatePEM), certificateFile: certificatePath,
                                                 key: Array(keyPEM), keyFile: keyPath)
            let hash = try CertificateFiles.sha256(pem: Array(certificatePEM), file: certificatePath)
            return CheckedPair(certificatePath: certificatePath, keyPath: keyPath, certificatePEM: certificatePEM,
                               keyPEM: keyPEM, sha256: Data(hash))
        } catch {
            throw Problem(field: error.file == keyPath ? request.keyField : request.certificateField, message: error.description)
        }
    }

    /// `checkedPair` in a child process (see `PairCheck.child`).
    static func checkedPairInChild(_ request: PairRequest, executable: String, arguments: [String]) throws(Problem) -> CheckedPair {
        let json = String(decoding: (try? JSONEncoder().encode(request)) ?? Data(), as: UTF8.self)
        let result: (status: Int32, output: [UInt8])
        do throws(Errno) {
            result = try ChildProcessLauncher.output(of: executable, arguments: [executable] + arguments + [json], limit: 256 * 1024)
        } catch {
            throw Problem(field: request.certificateField, message: "cannot start the certificate check (\(executable)): \(error)")
        }
        guard result.status == 0, let answer = try? JSONDecoder().decode(PairAnswer.self, from: Data(result.output)) else {
            throw Problem(field: request.certificateField,
                          message: "the certificate check (\(executable)) failed with exit status \(result.status) and no answer")
        }
        if let pair = answer.pair { return pair }
        throw answer.problem ?? Problem(field: request.certificateField, message: "the certificate check gave no reason")
    }

    private static func make(certificatePath: String, keyPath: String, names: [String], field: String) throws(Problem) {
        let made: (certificate: String, key: String)
        do throws(CertificateFiles.Problem) {
            made = try CertificateFiles.makeSelfSigned(commonName: names.first ?? "control endpoint",
                                                       subjectAltNames: names, ownTrustAnchor: true)
        } catch {
            throw Problem(field: field, message: "cannot make a self-signed certificate: \(error)")
        }
        do throws(Errno) {
            // The key first: a certificate without its key would be taken as made.
            try StateFile.writeAtomically(keyPath, Array(made.key.utf8), mode: 0o600, directoryOwner: true)
            try StateFile.writeAtomically(certificatePath, Array(made.certificate.utf8), mode: 0o644, directoryOwner: true)
        } catch {
            throw Problem(field: field, message: "cannot write \(certificatePath): \(error)")
        }
    }

    /// A client configuration that trusts exactly the certificates of a PEM
    /// file (a peer's own certificate, or its CA), without a name check: the
    /// peer is addressed by the IP address the config lists.
    public static func pinnedClient(trusting pemFile: String) throws -> TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(pemFile))
        configuration.certificateVerification = .noHostnameVerification
        return configuration
    }
}
