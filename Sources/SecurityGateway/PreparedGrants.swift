import Dispatch
import FoundationEssentials
import Glibc
import ServiceSupport
import SessionGrants
import Synchronization
import SystemLayer

/// Grants a Connection Manager prepared on this gateway, found by the SNI a
/// client presents (and by its address where two grants share an SNI). The
/// tokens are kept as signed, in a journal file, so that they survive a
/// restart: at load each is verified again and the expired ones are dropped.
///
/// Lookups come from the relay's loops (one per new TCP connection on 4172)
/// and take one short lock; preparing and revoking come from the control
/// endpoint.
///
/// Persistence costs O(1) per change, so that preparing thousands of
/// sessions stays fast: each change is one JSON line appended to the
/// journal (`prepare`, `remove`, `used`); a prepare or revoke returns once
/// its line is durable (fdatasync, shared by the changes that wait at the
/// same time); a single-use grant consumed by a connection is appended on
/// the loop and made durable in the background (`BackgroundSync`: one
/// thread of its own, one fdatasync for the uses appended meanwhile). When the journal holds
/// much more than the live state it is rewritten, so its size stays
/// O(live grants): a background thread writes the snapshot of that moment
/// to a temporary file and fsyncs it while changes go on being appended to
/// the journal (and kept in memory); then, under the lock, those records
/// are appended to the snapshot, which is synced and renamed over the
/// journal (and the folder fsynced). A crash at any point leaves the old
/// journal or the new one, each holding every acknowledged change.
public final class PreparedGrants: Sendable {
    public struct Entry: Sendable, Equatable {
        public let grant: SessionGrant
        public let token: String
        /// The grant's agent as an address (nil: not one), read once at the
        /// prepare rather than at each connection.
        public let agentAddress: SocketAddress?

        init(grant: SessionGrant, token: String) {
            self.grant = grant
            self.token = token
            agentAddress = SocketAddress(grant.agent)
        }
    }

    private struct State {
        /// Live grants by lower-cased SNI.
        var byName: [String: [Entry]] = [:]
        var count = 0
        /// Single-use grants already used, until they expire: preparing one
        /// of them again is refused (a replayed prepare).
        var consumed: [UsedGrantID: Date] = [:]
        /// The journal (nil: memory only, or not opened yet).
        var journal: AppendOnlyFile?
        /// Records in the journal, to know when to rewrite it.
        var records = 0
        /// The last record appended (`waitDurable` makes it, and every one
        /// before it, durable; earlier journals are in the snapshot that
        /// replaced them).
        var lastAppended: AppendOnlyFile.Appended?
        /// Why the journal cannot be written, when it cannot.
        var journalError: String?
        /// While a snapshot is written in the background: the records
        /// appended since it was taken, and how many (nil: none is being written).
        var tail: (bytes: [UInt8], records: Int)?
    }

    private let state: BlockingMutex<State>
    private let path: String?
    /// The most grants held; preparing beyond it is refused.
    public let capacity: Int
    /// Makes single-use grants' "used" records durable after the lookup
    /// that consumed them (on a thread of its own, one fdatasync for what
    /// was appended meanwhile: no thread hop per connection).
    private let syncer: BackgroundSync

    /// - Parameter path: the journal the tokens persist in (nil: memory only).
    ///   It is opened by `restore` (or by the first change).
    public init(path: String?, capacity: Int = 50_000) {
        self.path = path
        self.capacity = capacity
        let state = BlockingMutex<State>(State())
        self.state = state
        // Gathering 2 ms: in a reconnect storm (thousands of connections a
        // second) one fdatasync covers the uses of those 2 ms instead of
        // each of a few; a use is durable about 2 ms later.
        syncer = BackgroundSync(name: "grants-sync", gatherMicroseconds: 2_000) { [state] file, error in
            state.withLock { $0.journalError = "cannot sync \(file.path): \(error)" }
        }
    }

    public var count: Int { state.withLock { $0.count } }

    /// Waits (blocking, up to 30 s) until the "used" records appended so far
    /// are durable or their sync failed: at a stop.
    public func flush() { syncer.flush() }

    /// "Used" records whose background sync has not finished (tests).
    public var unsyncedUses: Int { syncer.outstanding }

    /// Why the journal cannot be written (the last failure), or nil.
    public var storeProblem: String? { state.withLock { $0.journalError } }

    /// Reloads persisted tokens, verifying each again with `verifier`, then
    /// rewrites the journal with what is still live. A last line cut short
    /// (the process stopped while appending it) is dropped; other lines that
    /// cannot be read are skipped, and the file that held them is kept
    /// beside the new one as `<path>.bad-<unix time>`.
    /// - Returns: how many were kept and how many dropped (expired, or no longer verifying).
    @discardableResult
    public func restore(verifier: GrantVerifier, now: Date = Date()) async -> (kept: Int, dropped: Int) {
        guard let path else { return (0, 0) }
        let bytes = (try? StateFile.read(path, limit: 1 << 30)) ?? []
        let replay = Journal.replay(Array(AppendOnlyFile.records(in: bytes)), now: now)
        state.withLock { s in
            for (id, expires) in replay.consumed { s.consumed[UsedGrantID(id)] = expires }
        }
        var kept = 0, dropped = 0
        for token in replay.tokens {
            // Single use is enforced here (consumed ids persist), not by the verifier.
            if let grant = try? await verifier.verify(token, now: now, recordUse: false) {
                if insert(Entry(grant: grant, token: token)) { kept += 1 }
            } else {
                dropped += 1
            }
        }
        if replay.damagedLines > 0 {
            try? StateFile.rename(path, to: path + ".bad-\(Int(now.timeIntervalSince1970))")
        }
        StateFile.remove(compactingPath(path))   // a snapshot a stop interrupted
        state.withLock { s in _ = compact(&s) }
        return (kept, dropped)
    }

    public enum PrepareResult: Sendable, Equatable {
        case added
        /// The same grant (`jti`) is already prepared: nothing changes.
        case alreadyPrepared
        /// A single-use grant that was already used (a replay).
        case alreadyUsed
        case full
        /// The journal could not be written (nothing changed), or not synced
        /// (the grant is held, but might not survive a restart).
        case notStored(String)
    }

    /// Adds a verified grant; returns once it is durable in the journal.
    public func prepare(_ grant: SessionGrant, token: String, now: Date = Date()) -> PrepareResult {
        prepare(many: [(grant, token)], now: now)[0]
    }

    /// Prepares many grants under one hold of the lock, each as `prepare`
    /// would, with one fdatasync for them all (a batch of prepares).
    /// - Returns: one result per grant, in order.
    public func prepare(many items: [(grant: SessionGrant, token: String)], now: Date = Date()) -> [PrepareResult] {
        guard !items.isEmpty else { return [] }
        let (results, last) = state.withLock { s -> ([PrepareResult], AppendOnlyFile.Appended?) in
            var results: [PrepareResult] = []
            results.reserveCapacity(items.count)
            var last: AppendOnlyFile.Appended?
            for (grant, token) in items {
                let name = Self.key(grant.serverName)
                if s.consumed[UsedGrantID(grant.id)] != nil { results.append(.alreadyUsed); continue }
                if s.byName[name]?.contains(where: { $0.grant.id == grant.id }) == true { results.append(.alreadyPrepared); continue }
                if s.count >= capacity { removeExpired(&s, now: now) }
                guard s.count < capacity else { results.append(.full); continue }
                do throws(Errno) {
                    try append(&s, Journal.Record(op: .prepare, id: grant.id, token: token))
                } catch {
                    results.append(.notStored("cannot write \(path ?? "-"): \(error)"))
                    continue
                }
                s.byName[name, default: []].append(Entry(grant: grant, token: token))
                s.count += 1
                last = s.lastAppended
                results.append(.added)
            }
            compactIfLarge(&s)
            return (results, last)
        }
        // One fdatasync covers every line before the last.
        guard let problem = waitDurable(last) else { return results }
        return results.map { $0 == .added ? .notStored(problem) : $0 }
    }

    /// The key of a server name: lower case. A name that already is (as SNI
    /// names almost always are) is its own key, so the table holds no second
    /// copy of it per grant and a lookup allocates nothing for it.
    static func key(_ name: String) -> String {
        if name.utf8.allSatisfy({ $0 < 0x80 && !(0x41...0x5A).contains($0) }) { return name }
        return name.lowercased()
    }

    /// Adds a restored entry. - Returns: false when its id is already there.
    private func insert(_ entry: Entry) -> Bool {
        let name = Self.key(entry.grant.serverName)
        return state.withLock { s in
            guard s.byName[name]?.contains(where: { $0.grant.id == entry.grant.id }) != true else { return false }
            s.byName[name, default: []].append(entry)
            s.count += 1
            return true
        }
    }

    /// The grant for a client presenting `serverName` from `client`: one that
    /// names this client first, else one that names no client. Expired
    /// grants are skipped. Single-use grants are removed by the lookup (the
    /// use is journalled at once and made durable in the background).
    public func lookup(serverName: String, client: String, now: Date = Date(), leeway: TimeInterval = 30) -> Entry? {
        let name = Self.key(serverName)
        var used: AppendOnlyFile.Appended?
        let found = state.withLock { s -> Entry? in
            guard let entries = s.byName[name] else { return nil }
            let live = entries.filter { now.timeIntervalSince($0.grant.expires) < leeway && $0.grant.notBefore.timeIntervalSince(now) <= leeway }
            let match = live.first(where: { $0.grant.client == client }) ?? live.first(where: { $0.grant.client == nil })
            if let match, match.grant.singleUse {
                s.consumed[UsedGrantID(match.grant.id)] = match.grant.expires
                s.byName[name]?.removeAll { $0.grant.id == match.grant.id }
                if s.byName[name]?.isEmpty == true { s.byName[name] = nil }
                s.count -= 1
                // A failed write is recorded in journalError (health); the use stands in memory.
                try? append(&s, Journal.Record(op: .used, id: match.grant.id, expires: match.grant.expires.timeIntervalSince1970))
                compactIfLarge(&s)
                used = s.lastAppended
            }
            return match
        }
        if let used, path != nil { syncer.request(used) }
        return found
    }

    /// Removes grants by session id or grant id. - Returns: how many went.
    @discardableResult
    public func revoke(sessionID: String? = nil, grantID: String? = nil) -> Int {
        removeAll { entry in
            (sessionID != nil && entry.grant.sessionID == sessionID) || (grantID != nil && entry.grant.id == grantID)
        }
    }

    /// Drops grants expired beyond the leeway, and forgets used single-use
    /// ids that have expired. - Returns: how many grants went.
    @discardableResult
    public func sweep(now: Date = Date(), leeway: TimeInterval = 30) -> Int {
        let removed = removeAll { now.timeIntervalSince($0.grant.expires) >= leeway }
        state.withLock { s in s.consumed = s.consumed.filter { now.timeIntervalSince($0.value) < leeway } }
        return removed
    }

    public var all: [Entry] { state.withLock { $0.byName.values.flatMap { $0 } } }

    // MARK: Journal

    private func removeAll(where doomed: (Entry) -> Bool) -> Int {
        let (removed, last) = state.withLock { s -> (Int, AppendOnlyFile.Appended?) in
            var removed = 0
            for (name, entries) in s.byName {
                var kept: [Entry] = []
                for entry in entries {
                    if doomed(entry) {
                        removed += 1
                        try? append(&s, Journal.Record(op: .remove, id: entry.grant.id))
                    } else {
                        kept.append(entry)
                    }
                }
                if kept.count != entries.count { s.byName[name] = kept.isEmpty ? nil : kept }
            }
            s.count -= removed
            compactIfLarge(&s)
            return (removed, s.lastAppended)
        }
        if removed > 0 { _ = waitDurable(last) }
        return removed
    }

    /// Expired grants go when the store is full (they no longer admit anyone).
    private func removeExpired(_ s: inout State, now: Date, leeway: TimeInterval = 30) {
        for (name, entries) in s.byName {
            let kept = entries.filter { now.timeIntervalSince($0.grant.expires) < leeway }
            guard kept.count != entries.count else { continue }
            for entry in entries where now.timeIntervalSince(entry.grant.expires) >= leeway {
                try? append(&s, Journal.Record(op: .remove, id: entry.grant.id))
            }
            s.count -= entries.count - kept.count
            s.byName[name] = kept.isEmpty ? nil : kept
        }
        s.consumed = s.consumed.filter { now.timeIntervalSince($0.value) < leeway }
    }

    /// Appends one record (under the state lock, so the journal's order is
    /// the order of the changes), opening the journal first if needed.
    /// - Throws: `Errno` when the line cannot be written; the state must then not change.
    private func append(_ s: inout State, _ record: Journal.Record) throws(Errno) {
        guard let path else { return }
        if s.journal == nil, let error = compact(&s) { throw error }
        guard let journal = s.journal else { throw Errno(rawValue: EIO) }
        let line = record.line
        do throws(Errno) {
            s.lastAppended = try journal.append(line)
        } catch {
            s.journalError = "cannot write \(path): \(error)"
            throw error
        }
        s.records += 1
        if s.tail != nil {
            s.tail!.bytes += line
            s.tail!.records += 1
        }
    }

    /// Rewrites the journal once it holds several times the live state
    /// (called after a change has been applied to the state, so the snapshot holds it).
    private func compactIfLarge(_ s: inout State) {
        guard let path, s.tail == nil, s.records > max(1024, 4 * (s.count + s.consumed.count)) else { return }
        // The state is shared copy-on-write with the thread; encoding it happens there.
        let (byName, consumed) = (s.byName, s.consumed)
        s.tail = ([], 0)
        let started = try? SystemThread.spawn(name: "grants-compact") { [self] in
            compactInBackground(path: path, byName: byName, consumed: consumed)
        }
        if started == nil {
            s.tail = nil
            compact(&s)
        }
    }

    /// Where the background snapshot is written before it replaces the journal.
    private func compactingPath(_ path: String) -> String { path + ".compacting" }

    private func compactInBackground(path: String, byName: [String: [Entry]], consumed: [UsedGrantID: Date]) {
        let (snapshot, records) = Self.snapshot(byName: byName, consumed: consumed)
        let temporary = compactingPath(path)
        StateFile.remove(temporary)
        let written: AppendOnlyFile
        do throws(Errno) {
            written = try AppendOnlyFile(path: temporary)
            try written.append(snapshot).makeDurable()
        } catch {
            StateFile.remove(temporary)
            state.withLock { s in
                s.tail = nil
                s.journalError = "cannot rewrite \(path): \(error)"
            }
            return
        }
        state.withLock { s in
            let tail = s.tail ?? ([], 0)
            s.tail = nil
            do throws(Errno) {
                if !tail.bytes.isEmpty { try written.append(tail.bytes).makeDurable() }
                try StateFile.rename(temporary, to: path)
            } catch {
                // The journal is as it was, and holds everything.
                StateFile.remove(temporary)
                s.journalError = "cannot rewrite \(path): \(error)"
                return
            }
            // From here on the journal's name is the snapshot's: appends go to it.
            s.records = records + tail.records
            do throws(Errno) {
                try StateFile.syncDirectory(of: path)
                s.journal = try AppendOnlyFile(path: path)
                s.journalError = nil
            } catch {
                // Not known durable: the next change writes a snapshot synchronously.
                s.journal = nil
                s.journalError = "cannot rewrite \(path): \(error)"
            }
        }
    }

    /// Waits (polling, up to `timeoutMilliseconds`) until no snapshot is
    /// being written in the background. - Returns: false at the deadline.
    public func waitForCompaction(timeoutMilliseconds: Int = 30_000) -> Bool {
        BlockingWait.until(timeoutMilliseconds: timeoutMilliseconds) { state.withLock { $0.tail == nil } }
    }

    /// The journal lines of a snapshot of `byName` and `consumed`, and how many.
    private static func snapshot(byName: [String: [Entry]], consumed: [UsedGrantID: Date]) -> (bytes: [UInt8], records: Int) {
        var snapshot: [UInt8] = []
        var records = 0
        for entries in byName.values {
            for entry in entries {
                snapshot += Journal.Record(op: .prepare, id: entry.grant.id, token: entry.token).line
                records += 1
            }
        }
        for (id, expires) in consumed {
            snapshot += Journal.Record(op: .used, id: id.string, expires: expires.timeIntervalSince1970).line
            records += 1
        }
        return (snapshot, records)
    }

    /// Rewrites the journal as a snapshot of the live state (atomically,
    /// durably) and reopens it for appending. On failure the old journal stays.
    /// - Returns: the failure, or nil.
    @discardableResult
    private func compact(_ s: inout State) -> Errno? {
        guard let path else { return nil }
        let (snapshot, records) = Self.snapshot(byName: s.byName, consumed: s.consumed)
        do throws(Errno) {
            try StateFile.writeAtomically(path, snapshot, mode: 0o600)
            s.journal = try AppendOnlyFile(path: path)
            s.records = records
            s.journalError = nil
            return nil
        } catch {
            s.journalError = "cannot rewrite \(path): \(error)"
            return error
        }
    }

    /// Waits until `appended` (and every record before it) is durable;
    /// concurrent waiters share one fdatasync. - Returns: the problem, or nil.
    private func waitDurable(_ appended: AppendOnlyFile.Appended?) -> String? {
        guard path != nil, let appended else { return nil }
        do throws(Errno) {
            try appended.makeDurable()
            return nil
        } catch {
            let problem = "cannot sync \(appended.file.path): \(error)"
            state.withLock { $0.journalError = problem }
            return problem
        }
    }
}

/// A used single-use grant's id (`jti`), kept until the grant expires so a
/// replayed prepare is refused. The CM's ids are UUIDs: one written exactly
/// as `UUID.uuidString` writes it is kept as its 16 bytes (about 40 B per
/// used grant in the table instead of about 110 with a heap string); any
/// other id is kept as it is. Two ids are the same only if their strings
/// are.
struct UsedGrantID: Hashable, Sendable {
    private enum Form: Hashable, Sendable {
        case uuid(UUID)
        case other(String)
    }
    private let form: Form

    init(_ id: String) {
        if id.utf8.count == 36, let uuid = UUID(uuidString: id), uuid.uuidString == id {
            form = .uuid(uuid)
        } else {
            form = .other(id)
        }
    }

    /// The id as the grant had it.
    var string: String {
        switch form {
        case .uuid(let uuid): return uuid.uuidString
        case .other(let id): return id
        }
    }
}

/// The journal's lines: one JSON object each. Earlier versions wrote one
/// JSON object `{"tokens": [...], "consumed": {...}}`; `replay` reads that too.
enum Journal {
    enum Operation: String, Decodable {
        case prepare, remove, used
    }

    struct Record: Decodable {   // written by `line`
        var op: Operation
        var id: String
        var token: String?
        /// For `used`: the grant's expiry (seconds since 1970).
        var expires: Double?

        /// The record as one JSON line (what `JSONEncoder` would write, by
        /// hand: a "used" record is written on the relay loop at each
        /// single-use connection). JSON escapes any newline in a string.
        var line: [UInt8] {
            var out: [UInt8] = []
            out.reserveCapacity(40 + id.utf8.count + (token?.utf8.count ?? 0))
            out.append(contentsOf: #"{"op":"#.utf8)
            FlatJSON.appendString(op.rawValue, to: &out)
            out.append(contentsOf: #","id":"#.utf8)
            FlatJSON.appendString(id, to: &out)
            if let token {
                out.append(contentsOf: #","token":"#.utf8)
                FlatJSON.appendString(token, to: &out)
            }
            if let expires {
                out.append(contentsOf: #","expires":"#.utf8)
                // Whole seconds (a JWT's exp) as an integer; JSON has no
                // infinity or NaN, so those are left out (never a token's).
                if let whole = Int64(exactly: expires) {
                    out.append(contentsOf: String(whole).utf8)
                } else if expires.isFinite {
                    out.append(contentsOf: expires.description.utf8)
                } else {
                    out.append(contentsOf: "null".utf8)
                }
            }
            out.append(contentsOf: "}\n".utf8)
            return out
        }
    }

    /// What a journal file holds after replaying its records in order.
    struct Replayed {
        /// Live tokens, in the order they were prepared.
        var tokens: [String] = []
        /// Used single-use grant ids that have not expired.
        var consumed: [String: Date] = [:]
        /// Lines that could not be read.
        var damagedLines = 0
    }

    static func replay(_ bytes: [UInt8], now: Date) -> Replayed {
        var result = Replayed()
        if let old = try? JSONDecoder().decode(EarlierGrantFile.self, from: Data(bytes)) {
            result.tokens = old.tokens
            for (id, expires) in old.consumed where now.timeIntervalSince1970 < expires {
                result.consumed[id] = Date(timeIntervalSince1970: expires)
            }
            return result
        }
        var live: [String: (order: Int, token: String)] = [:]
        var order = 0
        let decoder = JSONDecoder()
        var lines = bytes.split(separator: UInt8(ascii: "\n"))
        // A last line without its newline was being appended when the
        // process stopped: its change was never acknowledged, so it is dropped
        // quietly (it is not damage).
        if bytes.last != UInt8(ascii: "\n"), !lines.isEmpty { lines.removeLast() }
        for line in lines {
            guard let record = try? decoder.decode(Record.self, from: Data(line)) else {
                result.damagedLines += 1
                continue
            }
            switch record.op {
            case .prepare:
                guard let token = record.token else { result.damagedLines += 1; continue }
                order += 1
                live[record.id] = (order, token)
            case .remove:
                live[record.id] = nil
            case .used:
                live[record.id] = nil
                if let expires = record.expires, now.timeIntervalSince1970 < expires {
                    result.consumed[record.id] = Date(timeIntervalSince1970: expires)
                }
            }
        }
        result.tokens = live.values.sorted { $0.order < $1.order }.map(\.token)
        return result
    }
}

/// The grant file of earlier versions: the signed tokens, and the ids of
/// single-use grants already used (with their expiry).
struct EarlierGrantFile: Codable {
    var tokens: [String]
    var consumed: [String: Double]
}
