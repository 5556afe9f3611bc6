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
    public struct Problem: Error, Sendable, CustomStringConvertible {
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

    /// Loads the configured pair, or the folder's (made when missing).
    /// - Parameters:
    ///   - fields: the config keys named in errors (certificate, key).
    ///   - names: IP addresses and names a made certificate is for.
    ///   - stem: the made pair's file names in `folder` (`STEM.crt`, `STEM.key`).
    /// - Throws: `Problem` naming the config key and the file.
    public static func load(certificate: String?, key: String?, folder: String, names: [String],
                            fields: (certificate: String, key: String), stem: String = "control-tls") throws(Problem) -> ServerTLS {
        let certificatePath: String, keyPath: String
        if let certificate, let key {
            (certificatePath, keyPath) = (certificate, key)
        } else {
            certificatePath = folder + "/" + stem + ".crt"
            keyPath = folder + "/" + stem + ".key"
            if !FileManager.default.fileExists(atPath: certificatePath) || !FileManager.default.fileExists(atPath: keyPath) {
                try make(certificatePath: certificatePath, keyPath: keyPath, names: names, field: fields.certificate)
            }
        }
        guard let certificatePEM = FileManager.default.contents(atPath: certificatePath) else {
            throw Problem(field: fields.certificate, message: "\(certificatePath) cannot be read")
        }
        guard let keyPEM = FileManager.default.contents(atPath: keyPath) else {
            throw Problem(field: fields.key, message: "\(keyPath) cannot be read")
        }
        let hash: [UInt8]
        do throws(CertificateFiles.Problem) {
            try CertificateFiles.checkServerPair(certificate: Array(certificatePEM), certificateFile: certificatePath,
                                                 key: Array(keyPEM), keyFile: keyPath)
            hash = try CertificateFiles.sha256(pem: Array(certificatePEM), file: certificatePath)
        } catch {
            throw Problem(field: error.file == keyPath ? fields.key : fields.certificate, message: error.description)
        }
        do {
            let chain = try NIOSSLCertificate.fromPEMBytes(Array(certificatePEM))
            var configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(keyPEM), format: .pem)))
            configuration.minimumTLSVersion = .tlsv12
            return ServerTLS(configuration: configuration, certificatePEM: String(decoding: certificatePEM, as: UTF8.self),
                             source: certificatePath, fingerprint: TLSClientSession.fingerprint(hash))
        } catch {
            throw Problem(field: fields.certificate, message: "\(certificatePath): \(error)")
        }
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
