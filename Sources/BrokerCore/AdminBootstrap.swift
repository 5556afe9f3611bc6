import Foundation

/// Creates the first admin of an empty store.
public enum AdminBootstrap {
    /// What `ensureAdmin` did.
    public enum Outcome: Sendable, Equatable {
        /// The store had users already; nothing changed (the password given, if any, is not used).
        case usersExist(count: Int)
        /// The admin was created with this id.
        case created(id: Int64)
    }

    /// Why the first admin could not be made.
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    /// On an empty store, creates `login` as an enabled admin with `password`.
    /// - Parameter password: nil when none was given; an error on an empty store.
    /// - Throws: `Failure` saying what to give, or why the password is refused
    ///   (the message never contains the password).
    public static func ensureAdmin(store: any BrokerStore, login: String, password: String?,
                                   hasher: PasswordHasher, now: Date) async throws -> Outcome {
        let count = try await store.userCount()
        if count > 0 { return .usersExist(count: count) }
        guard let password else {
            throw Failure(description: "the database has no users yet: give the first admin's password with --admin-password-file FILE or the LEOSTREAM_BROKER_ADMIN_PASSWORD environment variable")
        }
        do {
            try Validate.password(password, field: "admin password")
        } catch {
            throw Failure(description: "\(error.message.replacingOccurrences(of: "must be", with: "the first admin's password must be"))")
        }
        let hash = await hasher.hashed(password)
        do {
            let user = try await store.createUser(UserChanges(login: login, passwordHash: hash, displayName: "Administrator",
                                                              role: .admin, enabled: true), now: now)
            return .created(id: user.id)
        } catch {
            throw Failure(description: "cannot create the first admin '\(login)': \(error)")
        }
    }

    /// Reads a password file: its first line, without the line break.
    /// - Throws: `Failure` naming the file.
    public static func readPasswordFile(_ path: String, what: String = "the admin password file") throws -> String {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw Failure(description: "\(path): cannot read \(what): \((error as NSError).localizedDescription)")
        }
        let line = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        let password = line.hasSuffix("\r") ? String(line.dropLast()) : String(line)
        if password.isEmpty {
            throw Failure(description: "\(path): \(what) is empty")
        }
        return password
    }
}
