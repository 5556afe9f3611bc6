import Foundation

/// Where the broker's PostgreSQL database is, from a `postgres://` URL as
/// libpq writes them: `postgres://USER@HOST:PORT/DATABASE?sslmode=...`.
///
/// The password never comes from the URL (a command line is visible to every
/// user of the machine): it comes from a file or the environment
/// (`leostream-broker --database-password-file`).
public struct PostgresSettings: Sendable, Equatable {
    /// libpq's `sslmode` values this store supports.
    public enum TLSMode: String, Sendable, CaseIterable {
        /// Never TLS.
        case disable
        /// TLS when the server offers it, without checking its certificate (libpq's default).
        case prefer
        /// TLS always, without checking the certificate.
        case require
        /// TLS always; the certificate must chain to `sslrootcert` (or the
        /// system's CAs) and name the host.
        case verifyFull = "verify-full"
    }

    public var host: String
    public var port: Int
    public var user: String
    public var database: String
    /// A folder holding the server's Unix socket (`?host=/run/postgresql`); then `host` is only a label.
    public var socketDirectory: String?
    public var tlsMode: TLSMode
    /// PEM file of the CA (or certificate) `verify-full` trusts.
    public var rootCertificate: String?

    /// Where the data lives, for logs and `--info`: never holds a password.
    public var location: String {
        var text = "postgres://\(user)@\(host.contains(":") ? "[\(host)]" : host):\(port)/\(database)"
        var query: [String] = []
        if let socketDirectory { query.append("host=\(socketDirectory)") }
        if tlsMode != .prefer { query.append("sslmode=\(tlsMode.rawValue)") }
        if !query.isEmpty { text += "?" + query.joined(separator: "&") }
        return text
    }

    public init(host: String, port: Int = 5432, user: String, database: String, socketDirectory: String? = nil,
                tlsMode: TLSMode = .prefer, rootCertificate: String? = nil) {
        self.host = host
        self.port = port
        self.user = user
        self.database = database
        self.socketDirectory = socketDirectory
        self.tlsMode = tlsMode
        self.rootCertificate = rootCertificate
    }

    /// Whether `text` is a PostgreSQL URL (else the broker reads it as an SQLite path).
    public static func isURL(_ text: String) -> Bool {
        text.hasPrefix("postgres://") || text.hasPrefix("postgresql://")
    }

    /// A problem with the URL, naming the part that is wrong.
    public struct Problem: Error, Sendable, Equatable, CustomStringConvertible {
        public var description: String
    }

    /// Parses a URL; errors name the part that is wrong and say what is expected.
    public static func parse(_ text: String) throws(Problem) -> PostgresSettings {
        guard isURL(text), let url = URLComponents(string: text) else {
            throw Problem(description: "must be postgres://USER@HOST[:PORT]/DATABASE[?sslmode=...], got '\(text)'")
        }
        if url.password != nil {
            throw Problem(description: "must not hold the password (a command line is visible to every user of the machine): give it in --database-password-file or LEOSTREAM_BROKER_DATABASE_PASSWORD")
        }
        guard let user = url.user, !user.isEmpty else {
            throw Problem(description: "names no user: postgres://USER@HOST/DATABASE")
        }
        let database = String(url.path.drop(while: { $0 == "/" }))
        guard !database.isEmpty, !database.contains("/") else {
            throw Problem(description: "names no database: postgres://USER@HOST/DATABASE")
        }
        var host = url.host ?? ""
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        var settings = PostgresSettings(host: host, port: url.port ?? 5432, user: user.removingPercentEncoding ?? user,
                                        database: database.removingPercentEncoding ?? database)
        if !(1...65535).contains(settings.port) {
            throw Problem(description: "port must be 1 to 65535, got \(settings.port)")
        }
        for item in url.queryItems ?? [] {
            let value = item.value ?? ""
            switch item.name {
            case "sslmode":
                guard let mode = TLSMode(rawValue: value) else {
                    throw Problem(description: "sslmode must be one of \(TLSMode.allCases.map(\.rawValue).joined(separator: ", ")), got '\(value)'")
                }
                settings.tlsMode = mode
            case "sslrootcert":
                guard !value.isEmpty else { throw Problem(description: "sslrootcert names no file") }
                settings.rootCertificate = value
            case "host":
                guard value.hasPrefix("/") else {
                    throw Problem(description: "host in the query must be the folder of the server's Unix socket (an absolute path), got '\(value)'")
                }
                settings.socketDirectory = value
            default:
                throw Problem(description: "unknown parameter '\(item.name)' (known: sslmode, sslrootcert, host)")
            }
        }
        if settings.socketDirectory == nil && settings.host.isEmpty {
            throw Problem(description: "names no host: postgres://USER@HOST/DATABASE (or ?host=/run/postgresql for the Unix socket)")
        }
        if settings.socketDirectory != nil && settings.host.isEmpty { settings.host = "localhost" }
        if settings.rootCertificate != nil && settings.tlsMode != .verifyFull {
            throw Problem(description: "sslrootcert is used only with sslmode=verify-full")
        }
        return settings
    }
}
