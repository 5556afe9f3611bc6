import CertificateFiles
import Foundation
import NIOSSL
import SystemLayer

/// TLS of the control endpoint (issue 14): the certificate and key the
/// config names (`control_tls_cert`, `control_tls_key`), or a self-signed RSA
/// 3072 pair the gateway makes in its state directory at first start
/// (`control-tls.crt`, `control-tls.key` 0600). The certificate goes to the
/// broker in the signed registration and the broker trusts only it.
public struct ControlTLS: Sendable {
    public static let certificateFile = "control-tls.crt"
    public static let keyFile = "control-tls.key"

    /// The server configuration for the control endpoint (TLS 1.2 or later).
    public let configuration: TLSConfiguration
    /// The certificate, PEM, as registered with the broker.
    public let certificatePEM: String
    /// Where it came from, for the log.
    public let source: String

    /// Loads the configured pair, or the state directory's (made when missing).
    /// - Parameters:
    ///   - names: IP addresses and names the made certificate is for.
    /// - Throws: `ControlError` naming the config key or the file.
    public static func load(certificate: String?, key: String?, stateDirectory: String, names: [String]) throws(ControlError) -> ControlTLS {
        let certificatePath: String, keyPath: String, field: String
        if let certificate, let key {
            (certificatePath, keyPath, field) = (certificate, key, "control_tls_cert")
        } else {
            certificatePath = stateDirectory + "/" + certificateFile
            keyPath = stateDirectory + "/" + keyFile
            field = "control_tls_cert"
            if !FileManager.default.fileExists(atPath: certificatePath) || !FileManager.default.fileExists(atPath: keyPath) {
                try make(certificatePath: certificatePath, keyPath: keyPath, names: names)
            }
        }
        guard let certificatePEM = FileManager.default.contents(atPath: certificatePath) else {
            throw ControlError(500, field: field, "\(field): \(certificatePath) cannot be read")
        }
        guard let keyPEM = FileManager.default.contents(atPath: keyPath) else {
            throw ControlError(500, field: "control_tls_key", "control_tls_key: \(keyPath) cannot be read")
        }
        do throws(CertificateFiles.Problem) {
            try CertificateFiles.checkServerPair(certificate: Array(certificatePEM), certificateFile: certificatePath,
                                                 key: Array(keyPEM), keyFile: keyPath)
        } catch {
            throw ControlError(500, field: error.file == keyPath ? "control_tls_key" : field,
                               "\(error.file == keyPath ? "control_tls_key" : field): \(error)")
        }
        do {
            let chain = try NIOSSLCertificate.fromPEMBytes(Array(certificatePEM))
            var configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(keyPEM), format: .pem)))
            configuration.minimumTLSVersion = .tlsv12
            return ControlTLS(configuration: configuration, certificatePEM: String(decoding: certificatePEM, as: UTF8.self),
                              source: certificatePath)
        } catch {
            throw ControlError(500, field: field, "\(field): \(certificatePath): \(error)")
        }
    }

    private static func make(certificatePath: String, keyPath: String, names: [String]) throws(ControlError) {
        let made: (certificate: String, key: String)
        do throws(CertificateFiles.Problem) {
            made = try CertificateFiles.makeSelfSigned(commonName: names.first ?? "leostream-gateway control",
                                                       subjectAltNames: names, ownTrustAnchor: true)
        } catch {
            throw ControlError(500, field: "control_tls_cert", "control_tls_cert: cannot make a self-signed certificate: \(error)")
        }
        do throws(Errno) {
            // The key first: a certificate without its key would be taken as made.
            try StateFile.writeAtomically(keyPath, Array(made.key.utf8), mode: 0o600, directoryOwner: true)
            try StateFile.writeAtomically(certificatePath, Array(made.certificate.utf8), mode: 0o644, directoryOwner: true)
        } catch {
            throw ControlError(500, field: "control_tls_cert", "control_tls_cert: cannot write \(certificatePath): \(error)")
        }
    }
}
