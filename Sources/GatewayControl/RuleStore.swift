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

    public init(directory: String) {
        self.directory = directory
        path = directory + "/rules.json"
        journal = Journal()
    }

    /// The journal's state and each rule's last JSON, by id (re-encoded only when the rule changed).
    private final class Journal: Sendable {
        struct State {
            var table: [String: (state: RuleState, json: [UInt8])] = [:]
            /// The rules in order, as last saved.
            var order: [String] = []
            var file: AppendOnlyFile?
            var generation = 0
            var records = 0
            /// A snapshot is being written in the background.
            var compacting = false
        }
        let state = Mutex(State())
        /// Snapshots are written one at a time, and never one older than the
        /// latest written (a slow background write must not replace a newer
        /// snapshot). Taken after `state` or alone, never the other way round.
        let snapshots = Mutex(0)
    }

    private struct File: Codable {
        var version: Int
        var rules: [RuleState]
        /// Version 2: the journal generation that follows this snapshot.
        var journal: Int?
    }

    private enum Record: Codable {
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

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            switch self {
            case .put(let rule): try container.encode(rule, forKey: .put)
            case .delete(let id): try container.encode(id, forKey: .delete)
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
        var rules = snapshot
        var problems: [String] = []
        let decoder = JSONDecoder()
        for generation in journalGenerations() where generation >= since {
            let file = journalPath(generation)
            guard let bytes = try? StateFile.read(file, limit: 1 << 30) else { continue }
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
                    if let position = rules.firstIndex(where: { $0.id == rule.id }) { rules[position] = rule } else { rules.append(rule) }
                case .delete(let id):
                    rules.removeAll { $0.id == id }
                }
            }
        }
        return Loaded(rules: rules, problem: problems.isEmpty ? nil : problems.joined(separator: "; "))
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
    /// whole set again (the journal may hold a torn record).
    /// - Throws: `ControlError` 500 naming the file.
    public func makeDurable(_ pending: Pending) throws(ControlError) {
        do throws(Errno) {
            try pending.makeDurable()
        } catch {
            journal.state.withLock { j in if j.file === pending.file { j.file = nil } }
            throw ControlError(500, "cannot make \(pending.file.path) durable: \(error)")
        }
    }

    /// `save` without the wait: the change is in the journal file (page
    /// cache), and durable once `makeDurable` returns for what this answers
    /// (nil: nothing to wait for, e.g. a snapshot written durably).
    /// - Throws: `ControlError` 500 naming the file.
    public func record(_ rules: [RuleState]) throws(ControlError) -> Pending? {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return try journal.state.withLock { j throws(ControlError) -> Pending? in
            var pending: Pending?
            var next: [String: (state: RuleState, json: [UInt8])] = [:]
            next.reserveCapacity(rules.count)
            var records: [UInt8] = []
            var count = 0
            // Replay keeps a known rule where it was and appends new ones: a
            // known rule after a new one is an order the journal cannot say.
            var seenNew = false, reordered = false
            do {
                for rule in rules {
                    if j.table[rule.id] == nil { seenNew = true } else if seenNew { reordered = true }
                    if let known = j.table[rule.id], known.state == rule {
                        next[rule.id] = known
                    } else {
                        let json = [UInt8](try encoder.encode(rule))
                        next[rule.id] = (rule, json)
                        records += Array(#"{"put":"#.utf8) + json + Array("}\n".utf8)
                        count += 1
                    }
                }
                for id in j.order where next[id] == nil {
                    records += [UInt8](try encoder.encode(Record.delete(id))) + [0x0A]
                    count += 1
                }
            } catch {
                throw ControlError(500, "cannot encode the rules: \(error)")
            }
            let order = rules.map(\.id)
            if j.file == nil || reordered {
                // The first change of this process, or after a failed append: the whole set, then a new journal.
                let generation = (journalGenerations().last ?? j.generation) + 1
                try writeSnapshot(rules, json: rules.map { next[$0.id]!.json }, generation: generation)
                do throws(Errno) {
                    j.file = try AppendOnlyFile(path: journalPath(generation))
                } catch {
                    throw ControlError(500, "cannot open \(journalPath(generation)): \(error)")
                }
                j.generation = generation
                j.records = 0
                removeJournals(before: generation)
            } else if count > 0, let file = j.file {
                do throws(Errno) {
                    pending = try file.append(records)
                } catch {
                    // The journal may end in a torn record: the next change starts afresh with a snapshot.
                    j.file = nil
                    throw ControlError(500, "cannot append to \(file.path): \(error)")
                }
                j.records += count
            }
            j.table = next
            j.order = order
            if j.records > max(256, rules.count), !j.compacting {
                compact(&j, rules: rules)
            }
            return pending
        }
    }

    /// Waits (polling, up to `timeoutMilliseconds`) until no snapshot is
    /// being written, so that another process loading the directory now sees
    /// a snapshot and the journals it names (a hot upgrade's successor).
    /// - Returns: false when a compaction was still running at the deadline.
    public func waitForCompaction(timeoutMilliseconds: Int = 30_000) -> Bool {
        var waited = 0
        while journal.state.withLock({ $0.compacting }) {
            guard waited < timeoutMilliseconds else { return false }
            BlockingWait.sleep(milliseconds: 5)
            waited += 5
        }
        return true
    }

    /// Starts a new journal generation now and writes the snapshot of this
    /// moment on a thread of its own; older journals go once it is durable.
    private func compact(_ j: inout Journal.State, rules: [RuleState]) {
        let generation = j.generation + 1
        guard let file = try? AppendOnlyFile(path: journalPath(generation)) else { return }
        j.file = file
        j.generation = generation
        j.records = 0
        j.compacting = true
        let json = rules.map { j.table[$0.id]!.json }
        let store = self
        let started = try? SystemThread.spawn(name: "rules-compact") {
            try? store.writeSnapshot(rules, json: json, generation: generation)
            store.removeJournals(before: generation)
            store.journal.state.withLock { $0.compacting = false }
        }
        if started == nil {
            try? writeSnapshot(rules, json: json, generation: generation)
            removeJournals(before: generation)
            j.compacting = false
        }
    }

    /// `{"version": 2, "journal": N, "rules": [...]}`, one rule per line, replaced atomically.
    private func writeSnapshot(_ rules: [RuleState], json: [[UInt8]], generation: Int) throws(ControlError) {
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
