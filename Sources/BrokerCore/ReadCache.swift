import Foundation
import GRDB
import Synchronization

/// Values `SQLiteBrokerStore` read, by key, so that the calls every connect
/// makes do not read the database again (issue 15: a read is a hop to
/// GRDB's reader queue and back, about 150 µs of the broker's CPU). Two are
/// kept: the sessions `session(tokenHash:now:)` found (every call of the
/// API is authenticated) and the `connectReading(desktopID:)` of desktops
/// (a desktop, its gateways and their keys).
///
/// An entry is what the database said at some generation. Every commit of
/// the store's writer that changes a table the values come from starts a
/// new generation and empties the cache (`ReadCacheInvalidator`), before
/// the write returns: a logout, a user disabled or deleted, a password
/// changed, an entitlement removed, a gateway's key or address changed,
/// takes effect at the next call. A read that began before such a commit
/// cannot store what it read after it (`insert(_:_:ifGeneration:)`).
///
/// Only commits of this process are seen: the SQLite file serves one broker
/// process (as its rule reservations already assume). The PostgreSQL store,
/// which several brokers share, does not cache.
final class ReadCache<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    private struct State {
        var generation: UInt64 = 0
        var entries: [Key: Value] = [:]
    }

    /// At most this many entries; the cache is emptied when full (a bound,
    /// not a policy: a deployment has far fewer live sessions or desktops in use).
    static var capacity: Int { 10_000 }

    private let state = Mutex(State())

    /// The cached value for `key` if `isValid` accepts it (an entry it
    /// refuses is dropped), and the generation to store a database read
    /// under when there is none.
    func lookup(_ key: Key, isValid: (Value) -> Bool = { _ in true }) -> (found: Value?, generation: UInt64) {
        state.withLock { state in
            guard let entry = state.entries[key] else { return (nil, state.generation) }
            guard isValid(entry) else {
                state.entries[key] = nil
                return (nil, state.generation)
            }
            return (entry, state.generation)
        }
    }

    /// Keeps a value read from the database, unless a commit that could
    /// change it came since `generation` was taken.
    func insert(_ key: Key, _ value: Value, ifGeneration generation: UInt64) {
        state.withLock { state in
            guard state.generation == generation else { return }
            if state.entries.count >= Self.capacity { state.entries.removeAll(keepingCapacity: true) }
            state.entries[key] = value
        }
    }

    /// Forgets the entry for `key` and starts a new generation (reads under
    /// way store nothing), keeping the other entries. Call it after the
    /// commit that changed that entry alone.
    func remove(_ key: Key) {
        state.withLock { state in
            state.generation &+= 1
            state.entries[key] = nil
        }
    }

    /// Forgets every entry and starts a new generation.
    func invalidate() {
        state.withLock { state in
            state.generation &+= 1
            state.entries.removeAll(keepingCapacity: true)
        }
    }

    var count: Int { state.withLock { $0.entries.count } }
}

extension ReadCache where Key == String, Value == AuthenticatedSession {
    /// The session for `tokenHash` unless it has expired at `now`, compared
    /// as the store's query does: both to the millisecond (`StoredDate`).
    func session(_ tokenHash: String, now: Date) -> (found: AuthenticatedSession?, generation: UInt64) {
        let nowMilliseconds = StoredDate.milliseconds(now)
        return lookup(tokenHash) { StoredDate.milliseconds($0.session.expires) > nowMilliseconds }
    }
}

/// Empties a `ReadCache` when a commit of the writer changed one of its
/// tables in a way that matters to it.
///
/// SQLite does not report changes to `WITHOUT ROWID` tables, among them
/// `user_session` and `desktop_user`: every write that changes or removes
/// such rows calls `notify(_:table:)` in its transaction (tested for each
/// such write of the store).
final class ReadCacheInvalidator: TransactionObserver, Sendable {
    struct Kinds: OptionSet, Sendable {
        let rawValue: UInt8
        static let insert = Kinds(rawValue: 1)
        static let update = Kinds(rawValue: 2)
        static let delete = Kinds(rawValue: 4)
        static let all: Kinds = [.insert, .update, .delete]
    }

    /// What empties the session cache: a user changed or deleted (a new
    /// user changes no session found before), a session changed or removed
    /// (likewise a new one), a gateway removed (its sessions' login gateway
    /// becomes null).
    static let sessionTables: [String: Kinds] = [
        "user_account": [.update, .delete], "user_session": [.update, .delete], "gateway": .delete,
    ]
    /// What empties the connect readings: anything of a desktop, its
    /// protocols and entitlements, the gateways (a new member of a cluster
    /// is a candidate) and clusters; a user deleted (their entitlements go).
    static let readingTables: [String: Kinds] = [
        "desktop": .all, "desktop_protocol": .all, "desktop_user": .all,
        "gateway": .all, "gateway_cluster": .all, "user_account": .delete,
    ]

    private let tables: [String: Kinds]
    private let invalidate: @Sendable () -> Void
    /// Whether the transaction under way changed an observed table. Touched
    /// only on the writer's queue, in its callbacks.
    private let changed = Mutex(false)

    init(tables: [String: Kinds], invalidate: @escaping @Sendable () -> Void) {
        self.tables = tables
        self.invalidate = invalidate
    }

    /// Tells the observers, inside a write transaction, that it changed
    /// rows of `table` (a `WITHOUT ROWID` table, whose changes SQLite does not report).
    static func notify(_ db: Database, table: String) throws {
        try db.notifyChanges(in: Table(table))
    }

    func observes(eventsOfKind eventKind: DatabaseEventKind) -> Bool {
        switch eventKind {
        case .insert(let table): tables[table]?.contains(.insert) == true
        case .update(let table, _): tables[table]?.contains(.update) == true
        case .delete(let table): tables[table]?.contains(.delete) == true
        }
    }

    func databaseDidChange(with event: DatabaseEvent) {
        changed.withLock { $0 = true }
        stopObservingDatabaseChangesUntilNextTransaction()
    }

    func databaseDidChange() {
        changed.withLock { $0 = true }
    }

    func databaseDidCommit(_ db: Database) {
        if changed.withLock({ value in defer { value = false }; return value }) {
            invalidate()
        }
    }

    func databaseDidRollback(_ db: Database) {
        changed.withLock { $0 = false }
    }
}
