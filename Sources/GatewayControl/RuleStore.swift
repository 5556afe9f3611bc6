import ControlProtocol
import Foundation
import Synchronization
import SystemLayer

/// The pushed rules on disk: `rules.json` in the state directory, replaced
/// atomically (temporary file, fsync, rename, fsync of the directory) on
/// every change, read at start. Each rule's JSON is kept from one save to
/// the next and re-encoded only when the rule changed, so a save with
/// thousands of rules costs a concatenation and a write, not thousands of
/// encodings (a push used to spend 40% of its time here at 2,000 rules).
public struct RuleStore: Sendable {
    public let path: String
    private let encoded = EncodedRules()

    public init(directory: String) {
        path = directory + "/rules.json"
    }

    /// Each rule's last JSON, by id, with the state it encodes.
    private final class EncodedRules: Sendable {
        let table = Mutex<[String: (state: RuleState, json: [UInt8])]>([:])
    }

    private struct File: Codable {
        var version: Int
        var rules: [RuleState]
    }

    /// What `load` found.
    public struct Loaded: Sendable {
        public var rules: [RuleState]
        /// Set when the file could not be read as rules: what was wrong and
        /// where the bad file was moved (it is kept, never deleted).
        public var problem: String?
    }

    /// Reads the rules. A file that is not valid is moved aside to
    /// `rules.json.bad-<unix seconds>` and reported in `problem`; the
    /// gateway then starts without pushed rules (the broker re-pushes the
    /// ones it wants at registration).
    public func load(now: Int64 = ControlClock.unixSeconds()) -> Loaded {
        let bytes: [UInt8]?
        do throws(Errno) {
            bytes = try StateFile.read(path)
        } catch {
            return Loaded(rules: [], problem: "\(path): cannot read the rules: \(error)")
        }
        guard let bytes else { return Loaded(rules: [], problem: nil) }
        let why: String
        do {
            let file = try JSONDecoder().decode(File.self, from: Data(bytes))
            if file.version == 1 {
                let ids = Set(file.rules.map(\.id))
                if ids.count == file.rules.count { return Loaded(rules: file.rules, problem: nil) }
                why = "a rule id appears twice"
            } else {
                why = "version \(file.version) is not known to this gateway (expected 1)"
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

    /// Replaces the file with `rules`: `{"version": 1, "rules": [...]}`, one
    /// rule per line.
    /// - Throws: `ControlError` 500 naming the file.
    public func save(_ rules: [RuleState]) throws(ControlError) {
        var bytes = Array(#"{"version":1,"rules":["#.utf8)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        do {
            try encoded.table.withLock { table in
                var next: [String: (state: RuleState, json: [UInt8])] = [:]
                next.reserveCapacity(rules.count)
                for (index, rule) in rules.enumerated() {
                    let json: [UInt8]
                    if let known = table[rule.id], known.state == rule {
                        json = known.json
                    } else {
                        json = [UInt8](try encoder.encode(rule))
                    }
                    bytes.append(contentsOf: index == 0 ? [0x0A] : [0x2C, 0x0A])
                    bytes.append(contentsOf: json)
                    next[rule.id] = (rule, json)
                }
                table = next
            }
        } catch {
            throw ControlError(500, "cannot encode the rules: \(error)")
        }
        bytes.append(contentsOf: Array("\n]}\n".utf8))
        do throws(Errno) {
            try StateFile.writeAtomically(path, bytes, mode: 0o600)
        } catch {
            throw ControlError(500, "cannot write \(path): \(error)")
        }
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
