import ControlProtocol
import Foundation
import Synchronization
import SystemLayer

/// The pushed rules on disk (issue 15): a snapshot, `rules.json`, and a
/// journal after it, `rules.journal.<generation>`, one JSON record a line
/// (`{"put": <rule>}` or `{"delete": "<id>"}`). A change appends its records
/// with one write and one fdatasync, so a push costs what it changes, not
/// the number of rules held; only an acknowledged change is answered, and a
/// crash at any point loses none of them (a torn last line is the one being
/// written when it happened, never acknowledged).
///
/// Compaction: when the journal holds more records than max(256, rules
/// held), the next change starts a new journal generation and a background
/// thread writes the snapshot of that moment (temporary file, fsync, rename,
/// fsync of the folder), which names the generation it continues from, then
/// removes the older journals. Load reads the snapshot and replays every
/// journal of its generation or later. The first change of a process writes
/// a snapshot whole (so what an earlier process left is folded in once).
public struct RuleStore: Sendable {
    public let path: String
    private let directory: String
    private let journal: Journal

    /// - Parameter onSyncFailure: told (on the background sync's thread)
    ///   when a change answered under `JournalSync.background` could not be
    ///   made durable; the next change then writes the whole set again.
    public init(directory: String, onSyncFailure: @escaping @Sendable (String) -> Void = { _ in }) {
        self.directory = directory
        path = directory + "/rules.json"
        let state = BlockingMutex(Journal.State())
        let syncer = BackgroundSync(name: "rules-sync") { [state] file, error in
            state.withLock { j in if j.file === file { j.file = nil } }
            onSyncFailure("cannot make \(file.path) durable: \(error)")
        }
        journal = Journal(state: state, syncer: syncer)
    }

    /// The journal's state and each rule's last JSON, by id (re-encoded only
    /// when the rule changed), with its place in the saved order.
    private final class Journal: Sendable {
        struct Entry {
            var sequence: Int
            var state: RuleState
            var json: [UInt8]
        }
        struct State {
            var table: [String: Entry] = [:]
            var nextSequence = 0
            var file: AppendOnlyFile?
            var generation = 0
            var records = 0
            /// A snapshot is being written in the background.
            var compacting = false
        }
        let state: BlockingMutex<State>
        /// Makes changes durable after their answer (`JournalSync.background`).
        let syncer: BackgroundSync
        /// Snapshots are written one at a time, and never one older than the
        /// latest written (a slow background write must not replace a newer
        /// snapshot). Taken after `state` or alone, never the other way round.
        let snapshots = Mutex(0)

        init(state: BlockingMutex<State>, syncer: BackgroundSync) {
            self.state = state
            self.syncer = syncer
        }
    }

    private struct File: Codable {
        var version: Int
        var rules: [RuleState]
        /// Version 2: the journal generation that follows this snapshot.
        var journal: Int?
    }

    /// A journal line as read back (`ControlJSON.encodeRule`/`encodeDelete` write them).
    private enum Record: Decodable {
        case put(RuleState)
        case delete(String)

        enum CodingKeys: String, CodingKey { case put, delete }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            if let rule = try container.decodeIfPresent(RuleState.self, forKey: .put) {
                self = .put(rule)
            } else {
                self = .delete(try container.decode(String.self, forKey: .delete))
            }
        }
    }

    /// What `load` found.
    public struct Loaded: Sendable {
        public var rules: [RuleState]
        /// Set when the file could not be read as rules: what was wrong and
        /// where the bad file was moved (it is kept, never deleted).
        public var problem: String?
    }

    func journalPath(_ generation: Int) -> String { directory + "/rules.journal.\(generation)" }

    /// Journal generations present in the folder, ascending.
    private func journalGenerations() -> [Int] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.compactMap { name in
            name.hasPrefix("rules.journal.") ? Int(name.dropFirst("rules.journal.".count)) : nil
        }.sorted()
    }

    /// Reads the snapshot and replays the journals after it. A snapshot that
    /// is not valid is moved aside to `rules.json.bad-<unix seconds>` and
    /// reported in `problem`; the gateway then starts without pushed rules
    /// (the broker re-pushes the ones it wants at registration). A journal
    /// line that does not parse ends that journal's replay (the torn end of a
    /// write a crash interrupted) and is reported when it is not the last.
    public func load(now: Int64 = ControlClock.unixSeconds()) -> Loaded {
        let bytes: [UInt8]?
        do throws(Errno) {
            bytes = try StateFile.read(path)
        } catch {
            return Loaded(rules: [], problem: "\(path): cannot read the rules: \(error)")
        }
        var rules: [RuleState] = []
        var since = 0
        if let bytes {
            let why: String
            do {
                let file = try JSONDecoder().decode(File.self, from: Data(bytes))
                if file.version == 1 || file.version == 2 {
                    if Set(file.rules.map(\.id)).count == file.rules.count {
                        rules = file.rules
                        since = file.journal ?? 0
                        return replayJournals(onto: rules, since: since)
                    }
                    why = "a rule id appears twice"
                } else {
                    why = "version \(file.version) is not known to this gateway (expected 1 or 2)"
                }
            } catch {
                why = "not valid rules JSON (\(Self.shortDescription(error)))"
            }
            let aside = path + ".bad-\(now)"
            do throws(Errno) {
                try StateFile.rename(path, to: aside)
            } catch {
                return Loaded(rules: [], problem: "\(path): \(why); could not move it aside (\(error)); starting without pushed rules")
            }
            return Loaded(rules: [], problem: "\(path): \(why); kept as \(aside); starting without pushed rules")
        }
        return replayJournals(onto: rules, since: since)
    }

    private func replayJournals(onto snapshot: [RuleState], since: Int) -> Loaded {
        // Deleted rules leave a hole until the end: a replay costs O(records), not O(records x rules).
        var rules: [RuleState?] = snapshot
        var positions: [String: Int] = [:]
        for (index, rule) in snapshot.enumerated() { positions[rule.id] = index }
        var problems: [String] = []
        let decoder = JSONDecoder()
        for generation in journalGenerations() where generation >= since {
            let file = journalPath(generation)
            guard let contents = try? StateFile.read(file, limit: 1 << 30) else { continue }
            let bytes = AppendOnlyFile.records(in: contents)
            let lines = bytes.split(separator: 0x0A, omittingEmptySubsequences: true)
            for (index, line) in lines.enumerated() {
                guard let record = try? decoder.decode(Record.self, from: Data(line)) else {
                    if index != lines.count - 1 || bytes.last == 0x0A {
                        problems.append("\(file): line \(index + 1) is not a rule record; the records after it are not replayed")
                    }
                    break
                }
                switch record {
                case .put(let rule):
                    if let position = positions[rule.id] {
                        rules[position] = rule
                    } else {
                        positions[rule.id] = rules.count
                        rules.append(rule)
                    }
                case .delete(let id):
                    if let position = positions.removeValue(forKey: id) { rules[position] = nil }
                }
            }
        }
        return Loaded(rules: rules.compactMap { $0 }, problem: problems.isEmpty ? nil : problems.joined(separator: "; "))
    }

    /// An append not yet known to be durable: `makeDurable` waits for it.
    public typealias Pending = AppendOnlyFile.Appended

    /// Records the change from the last saved rules to `rules`: appended to
    /// the journal and made durable before this returns.
    /// - Throws: `ControlError` 500 naming the file.
    public func save(_ rules: [RuleState]) throws(ControlError) {
        if let pending = try record(rules) { try makeDurable(pending) }
    }

    /// Waits until `pending` is durable; concurrent callers share one
    /// fdatasync (group commit). On failure the next change writes the
    /// whole set again (the journal may hold a torn record). With
    /// `.background` it asks the background sync instead and returns at
    /// once (a failure then reaches `onSyncFailure`).
    /// - Throws: `ControlError` 500 naming the file.
    public func makeDurable(_ pending: Pending, sync: JournalSync = .eachChange) throws(ControlError) {
        if sync == .background {
            journal.syncer.request(pending)
            return
        }
        do throws(Errno) {
            try pending.makeDurable()
        } catch {
            journal.state.withLock { j in if j.file === pending.file { j.file = nil } }
            throw ControlError(500, "cannot make \(pending.file.path) durable: \(error)")
        }
    }

    /// `save` without the wait: the change is in the journal file (page
    /// cache), and durable once `makeDurable` returns for what this answers
    /// (nil: nothing to wait for, e.g. a snapshot written durably). Costs
    /// O(rules held): for the control plane's rare whole-set saves.
    /// - Throws: `ControlError` 500 naming the file.
    public func record(_ rules: [RuleState]) throws(ControlError) -> Pending? {
        try journal.state.withLock { j throws(ControlError) -> Pending? in
            // Replay keeps a known rule where it was and appends new ones: a
            // known rule after a new one, or known rules in another order,
            // is an order the journal cannot say: a snapshot says it.
            var seenNew = false, reordered = false, last = -1
            var wanted = Set<String>()
            wanted.reserveCapacity(rules.count)
            for rule in rules {
                wanted.insert(rule.id)
                if let known = j.table[rule.id] {
                    if seenNew || known.sequence < last { reordered = true }
                    last = known.sequence
                } else {
                    seenNew = true
                }
            }
            let removing = j.table.keys.filter { !wanted.contains($0) }
            return try commit(&j, upserting: rules, removing: removing, order: reordered ? rules.map(\.id) : nil)
        }
    }

    /// Tells the store the rules in force after a load (no write): the first
    /// change of the process then writes them whole as a snapshot, with the
    /// change, and a new journal after it.
    public func seed(_ rules: [RuleState]) {
        journal.state.withLock { j in
            guard j.file == nil else { return }
            j.table = [:]
            for (index, rule) in rules.enumerated() {
                j.table[rule.id] = Journal.Entry(sequence: index, state: rule, json: ControlJSON.encodeRule(rule))
            }
            j.nextSequence = rules.count
        }
    }

    /// Records one change (issue 15): `upserting` rules added or replaced
    /// (a known id keeps its place), `removing` ids deleted. Costs what it
    /// changes, not the rules held. Nothing is recorded when the write fails.
    /// - Throws: `ControlError` 500 naming the file.
    public func record(upserting: [RuleState] = [], removing: [String] = []) throws(ControlError) -> Pending? {
        try journal.state.withLock { j throws(ControlError) -> Pending? in
            try commit(&j, upserting: upserting, removing: removing, order: nil)
        }
    }

    /// Appends the change's records (or, for the first change of a process,
    /// after a failed append, or with `order` set, writes the whole set as a
    /// snapshot), then updates the table.
    private func commit(_ j: inout Journal.State, upserting: [RuleState], removing: [String],
                        order: [String]?) throws(ControlError) -> Pending? {
        var changed: [(id: String, state: RuleState, json: [UInt8])] = []
        var gone: [String] = []
        var records: [UInt8] = []
        for rule in upserting {
            if let known = j.table[rule.id], known.state == rule { continue }
            let json = ControlJSON.encodeRule(rule)
            changed.append((rule.id, rule, json))
            records += Array(#"{"put":"#.utf8) + json + Array("}\n".utf8)
        }
        for id in Set(removing) where j.table[id] != nil {
            gone.append(id)
            records += ControlJSON.encodeDelete(id) + [0x0A]
        }
        let count = changed.count + gone.count
        var pending: Pending?
        if j.file == nil || order != nil {
            // The whole set, then a new journal: the table changes only once it is written.
            var next = j.table
            var sequence = j.nextSequence
            apply(changed, gone, to: &next, sequence: &sequence)
            if let order {
                for (index, id) in order.enumerated() { next[id]?.sequence = index }
                sequence = order.count
            }
            let generation = (journalGenerations().last ?? j.generation) + 1
            try writeSnapshot(json: Self.ordered(next), generation: generation)
            do throws(Errno) {
                j.file = try AppendOnlyFile(path: journalPath(generation))
            } catch {
                throw ControlError(500, "cannot open \(journalPath(generation)): \(error)")
            }
            j.table = next
            j.nextSequence = sequence
            j.generation = generation
            j.records = 0
            removeJournals(before: generation)
            return nil
        }
        if count > 0, let file = j.file {
            do throws(Errno) {
                pending = try file.append(records)
            } catch {
                // The journal may end in a torn record: the next change starts afresh with a snapshot.
                j.file = nil
                throw ControlError(500, "cannot append to \(file.path): \(error)")
            }
            j.records += count
            apply(changed, gone, to: &j.table, sequence: &j.nextSequence)
        }
        if j.records > max(256, j.table.count), !j.compacting {
            compact(&j)
        }
        return pending
    }

    private func apply(_ changed: [(id: String, state: RuleState, json: [UInt8])], _ gone: [String],
                       to table: inout [String: Journal.Entry], sequence: inout Int) {
        for change in changed {
            if table[change.id] != nil {
                table[change.id]!.state = change.state
                table[change.id]!.json = change.json
            } else {
                table[change.id] = Journal.Entry(sequence: sequence, state: change.state, json: change.json)
                sequence += 1
            }
        }
        for id in gone { table[id] = nil }
    }

    /// The rules' JSON in their saved order.
    private static func ordered(_ table: [String: Journal.Entry]) -> [[UInt8]] {
        table.values.sorted { $0.sequence < $1.sequence }.map(\.json)
    }

    /// Waits (blocking, up to `timeoutMilliseconds`) until every change
    /// answered under `JournalSync.background` is durable (or its sync
    /// failed): at a stop. - Returns: false at the deadline.
    @discardableResult
    public func flush(timeoutMilliseconds: Int = 30_000) -> Bool {
        journal.syncer.flush(timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Journal files with changes answered under `JournalSync.background`
    /// not yet known durable (0: every such change is, or its sync failed).
    public var unsynced: Int { journal.syncer.outstanding }

    /// Waits (polling, up to `timeoutMilliseconds`) until no snapshot is
    /// being written, so that another process loading the directory now sees
    /// a snapshot and the journals it names (a hot upgrade's successor).
    /// - Returns: false when a compaction was still running at the deadline.
    public func waitForCompaction(timeoutMilliseconds: Int = 30_000) -> Bool {
        BlockingWait.until(timeoutMilliseconds: timeoutMilliseconds) { !journal.state.withLock { $0.compacting } }
    }

    /// Starts a new journal generation now and writes the snapshot of this
    /// moment on a thread of its own (the ordering too: the table is shared
    /// copy-on-write); older journals go once it is durable.
    private func compact(_ j: inout Journal.State) {
        let generation = j.generation + 1
        guard let file = try? AppendOnlyFile(path: journalPath(generation)) else { return }
        j.file = file
        j.generation = generation
        j.records = 0
        j.compacting = true
        let table = j.table
        let store = self
        let started = try? SystemThread.spawn(name: "rules-compact") {
            try? store.writeSnapshot(json: Self.ordered(table), generation: generation)
            store.removeJournals(before: generation)
            store.journal.state.withLock { $0.compacting = false }
        }
        if started == nil {
            try? writeSnapshot(json: Self.ordered(table), generation: generation)
            removeJournals(before: generation)
            j.compacting = false
        }
    }

    /// `{"version": 2, "journal": N, "rules": [...]}`, one rule per line, replaced atomically.
    private func writeSnapshot(json: [[UInt8]], generation: Int) throws(ControlError) {
        try journal.snapshots.withLock { latest throws(ControlError) in
            guard generation > latest else { return }
            try writeSnapshotFile(json, generation: generation)
            latest = generation
        }
    }

    private func writeSnapshotFile(_ json: [[UInt8]], generation: Int) throws(ControlError) {
        var bytes = Array(#"{"version":2,"journal":\#(generation),"rules":["#.utf8)
        for (index, rule) in json.enumerated() {
            bytes.append(contentsOf: index == 0 ? [0x0A] : [0x2C, 0x0A])
            bytes.append(contentsOf: rule)
        }
        bytes.append(contentsOf: Array("\n]}\n".utf8))
        do throws(Errno) {
            try StateFile.writeAtomically(path, bytes, mode: 0o600)
        } catch {
            throw ControlError(500, "cannot write \(path): \(error)")
        }
    }

    private func removeJournals(before generation: Int) {
        for old in journalGenerations() where old < generation { StateFile.remove(journalPath(old)) }
    }

    static func shortDescription(_ error: any Error) -> String {
        switch error {
        case DecodingError.dataCorrupted(let context), DecodingError.typeMismatch(_, let context),
             DecodingError.valueNotFound(_, let context):
            let at = context.codingPath.map(\.stringValue).joined(separator: ".")
            return at.isEmpty ? context.debugDescription : "at \(at): \(context.debugDescription)"
        case DecodingError.keyNotFound(let key, _):
            return "missing \(key.stringValue)"
        default:
            return "\(error)"
        }
    }
}
