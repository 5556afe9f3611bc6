import COpenSSL

/// PEM certificates and keys through the system's OpenSSL: checked as HP's
/// Connection Manager requires them (PEM, RSA of at least 2,048 bits, no
/// DSA, no MD5 signatures; Windows line endings tolerated), and made when an
/// operator asks for a self-signed certificate (RSA 3072, SHA-256).
///
/// Every OpenSSL handle is made and freed inside one function of this file;
/// none leaves it.
public enum CertificateFiles {
    /// What a certificate holds that the checks and `status` look at.
    public struct CertificateInfo: Sendable, Equatable {
        public var subject: String
        public var key: KeyInfo
        /// OpenSSL's long name of the signature algorithm (`sha256WithRSAEncryption`, ...).
        public var signatureAlgorithm: String
        /// `notAfter` as OpenSSL prints it (`Dec  5 23:00:00 2036 GMT`).
        public var notAfter: String
        public var selfSigned: Bool
    }

    public enum KeyKind: String, Sendable, Equatable {
        case rsa = "RSA"
        case ec = "EC"
        case dsa = "DSA"
        case ed25519 = "Ed25519"
        case other = "other"
    }

    public struct KeyInfo: Sendable, Equatable, CustomStringConvertible {
        public var kind: KeyKind
        public var bits: Int

        public init(kind: KeyKind, bits: Int) {
            self.kind = kind
            self.bits = bits
        }
        public var description: String { "\(kind.rawValue) \(bits) bits" }
    }

    /// Why a file was refused: the file and what is wrong with it.
    public struct Problem: Error, Sendable, Equatable, CustomStringConvertible {
        public let file: String
        public let message: String

        public init(file: String, message: String) {
            self.file = file
            self.message = message
        }

        public var description: String { "\(file): \(message)" }
    }

    /// `bytes` with CR LF turned into LF (files saved on Windows).
    static func unixLineEndings(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        for (i, byte) in bytes.enumerated() where !(byte == 0x0D && i + 1 < bytes.count && bytes[i + 1] == 0x0A) {
            out.append(byte)
        }
        return out
    }

    /// Reads the first certificate of a PEM file.
    /// - Throws: `Problem` when it is not a PEM certificate.
    public static func certificate(pem: [UInt8], file: String) throws(Problem) -> CertificateInfo {
        let text = unixLineEndings(pem)
        guard contains(text, "-----BEGIN CERTIFICATE-----") else {
            throw Problem(file: file, message: "not a PEM certificate (no -----BEGIN CERTIFICATE----- line)")
        }
        return try withCertificate(text, file: file) { x509 in
            // Safe: `x509` is valid for the duration of this closure.
            let key = X509_get0_pubkey(x509)
            let info = keyInfo(key)
            let nid = X509_get_signature_nid(x509)
            let algorithm = OBJ_nid2ln(nid).map { String(cString: $0) } ?? "unknown (\(nid))"
            var subject = [CChar](repeating: 0, count: 512)
            X509_NAME_oneline(X509_get_subject_name(x509), &subject, Int32(subject.count))
            // Issued by itself: the same name, and its own key verifies its signature.
            let selfSigned = X509_NAME_cmp(X509_get_subject_name(x509), X509_get_issuer_name(x509)) == 0
                && key.map { X509_verify(x509, $0) == 1 } == true
            ERR_clear_error()
            return CertificateInfo(subject: String(decoding: subject.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self),
                                   key: info, signatureAlgorithm: algorithm,
                                   notAfter: timeText(X509_get0_notAfter(x509)), selfSigned: selfSigned)
        }
    }

    /// Reads a PEM private key (unencrypted).
    /// - Throws: `Problem` when it is not one.
    public static func privateKey(pem: [UInt8], file: String) throws(Problem) -> KeyInfo {
        try withPrivateKey(unixLineEndings(pem), file: file) { key in keyInfo(key) }
    }

    /// Checks a TLS server certificate and its key as HP requires: both PEM,
    /// RSA of at least 2,048 bits, not DSA, not signed with MD5, and the key
    /// belongs to the certificate.
    /// - Throws: `Problem` naming the file at fault.
    public static func checkServerPair(certificate certPEM: [UInt8], certificateFile: String,
                                       key keyPEM: [UInt8], keyFile: String) throws(Problem) {
        let cert = try certificate(pem: certPEM, file: certificateFile)
        try checkRSA(cert.key, file: certificateFile)
        if cert.signatureAlgorithm.lowercased().contains("md5") {
            throw Problem(file: certificateFile, message: "signed with \(cert.signatureAlgorithm): MD5 signatures are not accepted")
        }
        let key = try privateKey(pem: keyPEM, file: keyFile)
        try checkRSA(key, file: keyFile)
        let certText = unixLineEndings(certPEM), keyText = unixLineEndings(keyPEM)
        let matches = try withCertificate(certText, file: certificateFile) { x509 in
            (try? withPrivateKey(keyText, file: keyFile) { key in X509_check_private_key(x509, key) == 1 }) ?? false
        }
        guard matches else {
            ERR_clear_error()
            throw Problem(file: keyFile, message: "this key does not belong to the certificate in \(certificateFile)")
        }
    }

    /// SHA-256 of the first certificate's DER (what `openssl x509 -fingerprint -sha256` prints).
    public static func sha256(pem: [UInt8], file: String) throws(Problem) -> [UInt8] {
        try withCertificate(unixLineEndings(pem), file: file) { x509 throws(Problem) in
            var digest = [UInt8](repeating: 0, count: 32)
            var length: UInt32 = 0
            guard X509_digest(x509, EVP_sha256(), &digest, &length) == 1, length == 32 else {
                throw Problem(file: file, message: "cannot hash the certificate: \(lastError())")
            }
            return digest
        }
    }

    /// Checks a CA certificate file (trust for the broker's certificate): PEM, not DSA, not MD5-signed.
    public static func checkCACertificate(_ pem: [UInt8], file: String) throws(Problem) {
        let cert = try certificate(pem: pem, file: file)
        if cert.key.kind == .dsa { throw Problem(file: file, message: "a DSA key: DSA is not accepted") }
        if cert.key.kind == .rsa && cert.key.bits < 2048 {
            throw Problem(file: file, message: "an RSA key of \(cert.key.bits) bits: at least 2048 are required")
        }
        if cert.signatureAlgorithm.lowercased().contains("md5") {
            throw Problem(file: file, message: "signed with \(cert.signatureAlgorithm): MD5 signatures are not accepted")
        }
    }

    static func checkRSA(_ key: KeyInfo, file: String) throws(Problem) {
        switch key.kind {
        case .dsa: throw Problem(file: file, message: "a DSA key: DSA is not accepted (use RSA of at least 2048 bits)")
        case .rsa where key.bits < 2048: throw Problem(file: file, message: "an RSA key of \(key.bits) bits: at least 2048 are required")
        case .rsa: return
        default: throw Problem(file: file, message: "a key of type \(key.kind.rawValue): the certificate must have an RSA key of at least 2048 bits")
        }
    }

    /// Makes a self-signed TLS server certificate with a new RSA key.
    /// - Parameters:
    ///   - commonName: the subject's CN.
    ///   - subjectAltNames: IP addresses and DNS names the certificate is for.
    ///   - bits: the RSA key size (HP's tool makes 3072).
    ///   - ownTrustAnchor: a certificate its peers pin as the only trust root
    ///     (the gateway's control endpoint): CA:TRUE and keyCertSign, so that
    ///     verifiers such as BoringSSL accept it as its own issuer (as
    ///     `openssl req -x509` makes them).
    /// - Returns: the certificate and the key, PEM.
    /// - Throws: `Problem` (file "self-signed certificate") with OpenSSL's reason.
    public static func makeSelfSigned(commonName: String, subjectAltNames: [String], bits: Int = 3072,
                                      days: Int = 3650, ownTrustAnchor: Bool = false) throws(Problem) -> (certificate: String, key: String) {
        let what = "self-signed certificate"
        func fail(_ step: String) -> Problem { Problem(file: what, message: "\(step) failed: \(lastError())") }
        guard let context = EVP_PKEY_CTX_new_from_name(nil, "RSA", nil) else { throw fail("EVP_PKEY_CTX_new_from_name") }
        defer { EVP_PKEY_CTX_free(context) }
        guard EVP_PKEY_keygen_init(context) > 0, EVP_PKEY_CTX_set_rsa_keygen_bits(context, Int32(bits)) > 0 else {
            throw fail("RSA key set-up")
        }
        var generated: OpaquePointer?
        guard EVP_PKEY_generate(context, &generated) > 0, let key = generated else { throw fail("RSA key generation") }
        defer { EVP_PKEY_free(key) }
        var extensions: [(Int32, String)] = ownTrustAnchor
            ? [(NID_basic_constraints, "critical,CA:TRUE,pathlen:0"),
               (NID_key_usage, "critical,digitalSignature,keyEncipherment,keyCertSign"),
               (NID_ext_key_usage, "serverAuth")]
            : [(NID_basic_constraints, "critical,CA:FALSE"),
               (NID_key_usage, "critical,digitalSignature,keyEncipherment"),
               (NID_ext_key_usage, "serverAuth")]
        if !subjectAltNames.isEmpty {
            let names = subjectAltNames.map { isIPAddress($0) ? "IP:\($0)" : "DNS:\($0)" }.joined(separator: ",")
            extensions.append((NID_subject_alt_name, names))
        }
        let certificate = try selfSignedCertificate(key: key, commonName: commonName, days: days, extensions: extensions, what: what)
        let keyPEM = try pem(what) { bio in PEM_write_bio_PrivateKey(bio, key, nil, nil, 0, nil, nil) }
        return (certificate, keyPEM)
    }

    /// Makes a key pair for signing session grants: an ECDSA P-256 private
    /// key (ES256) and a self-signed certificate holding its public key,
    /// which the Security Gateways verify grants with.
    /// - Returns: the certificate and the key, PEM.
    public static func makeGrantSigningPair(commonName: String, days: Int = 3650) throws(Problem) -> (certificate: String, key: String) {
        let what = "grant signing key"
        func fail(_ step: String) -> Problem { Problem(file: what, message: "\(step) failed: \(lastError())") }
        guard let context = EVP_PKEY_CTX_new_from_name(nil, "EC", nil) else { throw fail("EVP_PKEY_CTX_new_from_name") }
        defer { EVP_PKEY_CTX_free(context) }
        guard EVP_PKEY_keygen_init(context) > 0, EVP_PKEY_CTX_set_group_name(context, "P-256") > 0 else {
            throw fail("EC key set-up")
        }
        var generated: OpaquePointer?
        guard EVP_PKEY_generate(context, &generated) > 0, let key = generated else { throw fail("EC key generation") }
        defer { EVP_PKEY_free(key) }
        let certificate = try selfSignedCertificate(key: key, commonName: commonName, days: days,
                                                    extensions: [(NID_basic_constraints, "critical,CA:FALSE"),
                                                                 (NID_key_usage, "critical,digitalSignature")], what: what)
        let keyPEM = try pem(what) { bio in PEM_write_bio_PrivateKey(bio, key, nil, nil, 0, nil, nil) }
        return (certificate, keyPEM)
    }

    /// A self-signed X.509 v3 certificate for `key`, signed with SHA-256, PEM.
    private static func selfSignedCertificate(key: OpaquePointer, commonName: String, days: Int,
                                              extensions: [(Int32, String)], what: String) throws(Problem) -> String {
        func fail(_ step: String) -> Problem { Problem(file: what, message: "\(step) failed: \(lastError())") }
        guard let x509 = X509_new() else { throw fail("X509_new") }
        defer { X509_free(x509) }
        guard X509_set_version(x509, 2) == 1 else { throw fail("X509_set_version") }
        // A random positive 127-bit serial number.
        guard let serial = BN_new() else { throw fail("BN_new") }
        defer { BN_free(serial) }
        guard BN_rand(serial, 127, -1, 0) == 1, BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x509)) != nil else {
            throw fail("serial number")
        }
        guard X509_gmtime_adj(X509_getm_notBefore(x509), -300) != nil,
              X509_gmtime_adj(X509_getm_notAfter(x509), days * 86400) != nil else { throw fail("validity") }
        guard X509_set_pubkey(x509, key) == 1 else { throw fail("X509_set_pubkey") }
        guard let name = X509_get_subject_name(x509),
              X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, commonName, -1, -1, 0) == 1,
              X509_set_issuer_name(x509, name) == 1 else { throw fail("subject") }
        var v3 = X509V3_CTX()
        X509V3_set_ctx(&v3, x509, x509, nil, nil, 0)
        for (nid, value) in extensions {
            guard let ext = X509V3_EXT_conf_nid(nil, &v3, nid, value) else { throw fail("extension \(value)") }
            defer { X509_EXTENSION_free(ext) }
            guard X509_add_ext(x509, ext, -1) == 1 else { throw fail("X509_add_ext") }
        }
        guard X509_sign(x509, key, EVP_sha256()) > 0 else { throw fail("X509_sign") }
        return try pem(what) { bio in PEM_write_bio_X509(bio, x509) }
    }

    // MARK: OpenSSL plumbing

    private static func contains(_ bytes: [UInt8], _ marker: String) -> Bool {
        let needle = Array(marker.utf8)
        guard bytes.count >= needle.count else { return false }
        for start in 0...(bytes.count - needle.count) where bytes[start] == needle[0] {
            if Array(bytes[start..<(start + needle.count)]) == needle { return true }
        }
        return false
    }

    /// Runs `body` with the first certificate of `pem`, freed afterwards.
    private static func withCertificate<T>(_ pem: [UInt8], file: String,
                                           _ body: (OpaquePointer) throws(Problem) -> T) throws(Problem) -> T {
        let parsed: OpaquePointer? = pem.withUnsafeBytes { raw in
            // Safe: the BIO reads `raw` only within this closure and is freed in it.
            guard let bio = BIO_new_mem_buf(raw.baseAddress, Int32(raw.count)) else { return nil }
            defer { BIO_free(bio) }
            return PEM_read_bio_X509(bio, nil, nil, nil)
        }
        guard let x509 = parsed else {
            throw Problem(file: file, message: "cannot read the PEM certificate: \(lastError())")
        }
        defer { X509_free(x509) }
        return try body(x509)
    }

    /// Runs `body` with the private key of `pem`, freed afterwards.
    private static func withPrivateKey<T>(_ pem: [UInt8], file: String,
                                          _ body: (OpaquePointer) throws(Problem) -> T) throws(Problem) -> T {
        guard contains(pem, "PRIVATE KEY-----") else {
            throw Problem(file: file, message: "not a PEM private key (no -----BEGIN ... PRIVATE KEY----- line)")
        }
        if contains(pem, "ENCRYPTED") {
            throw Problem(file: file, message: "the private key is encrypted; give an unencrypted PEM key")
        }
        let parsed: OpaquePointer? = pem.withUnsafeBytes { raw in
            guard let bio = BIO_new_mem_buf(raw.baseAddress, Int32(raw.count)) else { return nil }
            defer { BIO_free(bio) }
            // A null password callback with a null argument never prompts: an encrypted key just fails.
            return PEM_read_bio_PrivateKey(bio, nil, { _, _, _, _ in 0 }, nil)
        }
        guard let key = parsed else {
            throw Problem(file: file, message: "cannot read the PEM private key: \(lastError())")
        }
        defer { EVP_PKEY_free(key) }
        return try body(key)
    }

    private static func keyInfo(_ key: OpaquePointer?) -> KeyInfo {
        guard let key else { return KeyInfo(kind: .other, bits: 0) }
        let bits = Int(EVP_PKEY_get_bits(key))
        switch EVP_PKEY_get_base_id(key) {
        case EVP_PKEY_RSA: return KeyInfo(kind: .rsa, bits: bits)
        case EVP_PKEY_EC: return KeyInfo(kind: .ec, bits: bits)
        case EVP_PKEY_DSA: return KeyInfo(kind: .dsa, bits: bits)
        case EVP_PKEY_ED25519: return KeyInfo(kind: .ed25519, bits: bits)
        default: return KeyInfo(kind: .other, bits: bits)
        }
    }

    private static func timeText(_ time: UnsafePointer<ASN1_TIME>?) -> String {
        guard let time, let bio = BIO_new(BIO_s_mem()) else { return "" }
        defer { BIO_free(bio) }
        guard ASN1_TIME_print(bio, time) == 1 else { return "" }
        return memoryText(bio)
    }

    /// Writes PEM into a memory BIO with `write` and returns it as text.
    private static func pem(_ what: String, _ write: (OpaquePointer) -> Int32) throws(Problem) -> String {
        guard let bio = BIO_new(BIO_s_mem()) else { throw Problem(file: what, message: "BIO_new failed") }
        defer { BIO_free(bio) }
        guard write(bio) == 1 else { throw Problem(file: what, message: "PEM writing failed: \(lastError())") }
        return memoryText(bio)
    }

    private static func memoryText(_ bio: OpaquePointer) -> String {
        var data: UnsafeMutablePointer<CChar>?
        // BIO_get_mem_data is a macro over BIO_ctrl(BIO_CTRL_INFO).
        let length = BIO_ctrl(bio, BIO_CTRL_INFO, 0, &data)
        guard length > 0, let data else { return "" }
        // Safe: the BIO owns `length` bytes at `data` until it is freed (after this copy).
        return String(decoding: UnsafeRawBufferPointer(start: data, count: length), as: UTF8.self)
    }

    /// OpenSSL's most recent error as text (and the queue emptied).
    private static func lastError() -> String {
        let code = ERR_get_error()
        ERR_clear_error()
        guard code != 0 else { return "no detail from OpenSSL" }
        var buffer = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &buffer, buffer.count)
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private static func isIPAddress(_ text: String) -> Bool {
        text.contains(":") || (text.split(separator: ".").count == 4 && text.allSatisfy { $0.isNumber || $0 == "." })
    }
}
