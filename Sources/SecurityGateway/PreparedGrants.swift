import Foundation
import SessionGrants
import Synchronization

/// Grants a Connection Manager prepared on this gateway, found by the SNI a
/// client presents (and by its address where two grants share an SNI). The
/// tokens are kept as signed, in a file, so that they survive a restart:
/// at load each is verified again and the expired ones are dropped.
///
/// Lookups come from the relay's loops (one per new TCP connection on 4172)
/// and take one short lock; preparing and revoking come from the control
/// endpoint.
public final class PreparedGrants: Sendable {
    public struct Entry: Sendable, Equatable {
        public let grant: SessionGrant
        public let token: String
    }

    private struct State {
        var byName: [String: [Entry]] = [:]
        var count = 0
        /// Single-use grants already used, until they expire: preparing one
        /// of them again is refused (a replayed prepare).
        var consumed: [String: Date] = [:]
    }

    private let state = Mutex<State>(State())
    private let path: String?
    /// The most grants held; preparing beyond it is refused.
    public let capacity: Int

    /// - Parameter path: the file the tokens persist in (nil: memory only).
    public init(path: String?, capacity: Int = 50_000) {
        self.path = path
        self.capacity = capacity
    }

    public var count: Int { state.withLock { $0.count } }

    /// Reloads persisted tokens, verifying each again with `verifier`.
    /// - Returns: how many were kept and how many dropped (expired, or no longer verifying).
    @discardableResult
    public func restore(verifier: GrantVerifier, now: Date = Date()) async -> (kept: Int, dropped: Int) {
        guard let path, let data = FileManager.default.contents(atPath: path),
              let file = try? JSONDecoder().decode(PersistedGrants.self, from: data) else { return (0, 0) }
        state.withLock { s in
            for (id, expires) in file.consumed where now.timeIntervalSince1970 < expires { s.consumed[id] = Date(timeIntervalSince1970: expires) }
        }
        var kept = 0, dropped = 0
        for token in file.tokens {
            // Single use is enforced here (consumed ids persist), not by the verifier.
            if let grant = try? await verifier.verify(token, now: now, recordUse: false) {
                insert(Entry(grant: grant, token: token))
                kept += 1
            } else {
                dropped += 1
            }
        }
        if dropped > 0 { persist() }
        return (kept, dropped)
    }

    public enum PrepareResult: Sendable, Equatable {
        case added
        /// The same grant (`jti`) is already prepared: nothing changes.
        case alreadyPrepared
        /// A single-use grant that was already used (a replay).
        case alreadyUsed
        case full
    }

    /// Adds a verified grant.
    public func prepare(_ grant: SessionGrant, token: String) -> PrepareResult {
        let result = state.withLock { s -> PrepareResult in
            if s.consumed[grant.id] != nil { return .alreadyUsed }
            if s.byName[grant.serverName]?.contains(where: { $0.grant.id == grant.id }) == true { return .alreadyPrepared }
            guard s.count < capacity else { return .full }
            s.byName[grant.serverName, default: []].append(Entry(grant: grant, token: token))
            s.count += 1
            return .added
        }
        if result == .added { persist() }
        return result
    }

    private func insert(_ entry: Entry) {
        state.withLock { s in
            guard s.byName[entry.grant.serverName]?.contains(where: { $0.grant.id == entry.grant.id }) != true else { return }
            s.byName[entry.grant.serverName, default: []].append(entry)
            s.count += 1
        }
    }

    /// The grant for a client presenting `serverName` from `client`: one that
    /// names this client first, else one that names no client. Expired
    /// grants are skipped. Single-use grants are removed by the lookup.
    public func lookup(serverName: String, client: String, now: Date = Date(), leeway: TimeInterval = 30) -> Entry? {
        let name = serverName.lowercased()
        var consumed = false
        let found = state.withLock { s -> Entry? in
            guard let entries = s.byName[name] else { return nil }
            let live = entries.filter { now.timeIntervalSince($0.grant.expires) < leeway && $0.grant.notBefore.timeIntervalSince(now) <= leeway }
            let match = live.first(where: { $0.grant.client == client }) ?? live.first(where: { $0.grant.client == nil })
            if let match, match.grant.singleUse {
                s.consumed[match.grant.id] = match.grant.expires
                s.byName[name]?.removeAll { $0.grant.id == match.grant.id }
                if s.byName[name]?.isEmpty == true { s.byName[name] = nil }
                s.count -= 1
                consumed = true
            }
            return match
        }
        if consumed { persist() }
        return found
    }

    /// Removes grants by session id or grant id. - Returns: how many went.
    @discardableResult
    public func revoke(sessionID: String? = nil, grantID: String? = nil) -> Int {
        let removed = state.withLock { s -> Int in
            var removed = 0
            for (name, entries) in s.byName {
                let kept = entries.filter { entry in
                    !((sessionID != nil && entry.grant.sessionID == sessionID) || (grantID != nil && entry.grant.id == grantID))
                }
                removed += entries.count - kept.count
                s.byName[name] = kept.isEmpty ? nil : kept
            }
            s.count -= removed
            return removed
        }
        if removed > 0 { persist() }
        return removed
    }

    /// Drops grants expired beyond the leeway. - Returns: how many went.
    @discardableResult
    public func sweep(now: Date = Date(), leeway: TimeInterval = 30) -> Int {
        let removed = state.withLock { s -> Int in
            var removed = 0
            for (name, entries) in s.byName {
                let kept = entries.filter { now.timeIntervalSince($0.grant.expires) < leeway }
                removed += entries.count - kept.count
                s.byName[name] = kept.isEmpty ? nil : kept
            }
            s.count -= removed
            s.consumed = s.consumed.filter { now.timeIntervalSince($0.value) < leeway }
            return removed
        }
        if removed > 0 { persist() }
        return removed
    }

    public var all: [Entry] { state.withLock { $0.byName.values.flatMap { $0 } } }

    /// Writes the tokens: a temporary file, fsync, rename (atomic on one
    /// filesystem), so a crash leaves the old file or the new one.
    private func persist() {
        guard let path else { return }
        let file = state.withLock { s in
            PersistedGrants(tokens: s.byName.values.flatMap { $0.map(\.token) },
                            consumed: s.consumed.mapValues { $0.timeIntervalSince1970 })
        }
        guard let data = try? JSONEncoder().encode(file) else { return }
        let temporary = path + ".tmp"
        guard FileManager.default.createFile(atPath: temporary, contents: data, attributes: [.posixPermissions: 0o600]),
              let handle = FileHandle(forWritingAtPath: temporary) else { return }
        try? handle.synchronize()
        try? handle.close()
        _ = rename(temporary, path)
    }
}

/// The grant file: the signed tokens, and the ids of single-use grants
/// already used (with their expiry), so a restart does not reopen them.
struct PersistedGrants: Codable {
    var tokens: [String]
    var consumed: [String: Double]
}
