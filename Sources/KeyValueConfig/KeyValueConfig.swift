/// `Key = value` files, as HP's tools write `SecurityGateway.conf` and
/// `ConnectionManager.conf`: one setting per line, `#` starts a comment,
/// keys compare without case, a key given twice is an error. Every error
/// names the file and the line. Pure: the caller reads and writes the file.
public struct KeyValueFile: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        /// As written.
        public var key: String
        public var value: String
        /// 1-based.
        public var line: Int
    }

    public let file: String
    public private(set) var entries: [Entry]

    /// Parses `text`.
    /// - Throws: `ConfigFileError` for a line that is not `Key = value`, an
    ///   empty key or value, or a key given twice.
    public init(parsing text: String, file: String) throws(ConfigFileError) {
        self.file = file
        entries = []
        var seen: [String: Int] = [:]
        // Windows line endings are tolerated.
        // "\r\n" is one Character in Swift: both end a line.
        for (index, raw) in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }).enumerated() {
            let line = index + 1
            var content = Substring(raw)
            if content.last == "\r" { content = content.dropLast() }
            if let hash = content.firstIndex(of: "#") { content = content[..<hash] }
            let trimmed = Self.trim(content)
            if trimmed.isEmpty { continue }
            guard let equals = trimmed.firstIndex(of: "=") else {
                throw ConfigFileError(file: file, line: line, message: "expected `Key = value`")
            }
            let key = Self.trim(trimmed[..<equals])
            let value = Self.trim(trimmed[trimmed.index(after: equals)...])
            guard !key.isEmpty else { throw ConfigFileError(file: file, line: line, message: "missing key before `=`") }
            guard !value.isEmpty else { throw ConfigFileError(file: file, line: line, message: "\(key): missing value") }
            if let first = seen[key.lowercased()] {
                throw ConfigFileError(file: file, line: line, message: "\(key) is set twice (first on line \(first))")
            }
            seen[key.lowercased()] = line
            entries.append(Entry(key: String(key), value: String(value), line: line))
        }
    }

    /// The entry for `key` (any case).
    public func entry(_ key: String) -> Entry? {
        let lower = key.lowercased()
        return entries.first { $0.key.lowercased() == lower }
    }

    /// An error at the line of `entry`.
    public func error(_ entry: Entry, _ message: String) -> ConfigFileError {
        ConfigFileError(file: file, line: entry.line, message: "\(entry.key): \(message)")
    }

    /// An error about the file as a whole (a required key is missing, ...).
    public func error(_ message: String) -> ConfigFileError {
        ConfigFileError(file: file, line: 0, message: message)
    }

    /// `text` with `changes` applied: a key present keeps its line (and the
    /// comments around it) and gets the new value, or is removed when the
    /// new value is nil; a new key is appended. Keys compare without case.
    public static func updating(_ text: String, with changes: [(key: String, value: String?)]) -> String {
        var lines = text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }).map(String.init)
        if lines.last == "" { lines.removeLast() }
        for change in changes {
            let lower = change.key.lowercased()
            let index = lines.firstIndex { line in
                var content = Substring(line)
                if let hash = content.firstIndex(of: "#") { content = content[..<hash] }
                guard let equals = content.firstIndex(of: "=") else { return false }
                return trim(content[..<equals]).lowercased() == lower
            }
            switch (index, change.value) {
            case (let index?, let value?): lines[index] = "\(change.key) = \(value)"
            case (let index?, nil): lines.remove(at: index)
            case (nil, let value?): lines.append("\(change.key) = \(value)")
            case (nil, nil): break
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// `text` without leading and trailing spaces, tabs and CRs.
    public static func trim(_ text: Substring) -> Substring {
        var text = text
        while let first = text.first, first == " " || first == "\t" || first == "\r" { text = text.dropFirst() }
        while let last = text.last, last == " " || last == "\t" || last == "\r" { text = text.dropLast() }
        return text
    }

    // MARK: Typed values

    /// `true`/`false` (also yes/no, on/off, 1/0).
    public func bool(_ entry: Entry) throws(ConfigFileError) -> Bool {
        switch entry.value.lowercased() {
        case "true", "yes", "on", "1": return true
        case "false", "no", "off", "0": return false
        default: throw error(entry, "\"\(entry.value)\" is not true or false")
        }
    }

    /// A whole number within `range`.
    public func int(_ entry: Entry, _ range: ClosedRange<Int>) throws(ConfigFileError) -> Int {
        guard let n = Int(entry.value), range.contains(n) else {
            throw error(entry, "\"\(entry.value)\" is not a number \(range.lowerBound)-\(range.upperBound)")
        }
        return n
    }

    /// Seconds, optionally written with an `s`, within `range`.
    public func seconds(_ entry: Entry, _ range: ClosedRange<Double>) throws(ConfigFileError) -> Double {
        let text = entry.value.hasSuffix("s") ? String(entry.value.dropLast()) : entry.value
        guard let seconds = Double(text), range.contains(seconds) else {
            throw error(entry, "\"\(entry.value)\" is not a number of seconds \(range.lowerBound)-\(range.upperBound)")
        }
        return seconds
    }

    /// A comma-separated list of non-empty items.
    public func list(_ entry: Entry) -> [String] {
        entry.value.split(separator: ",").map { String(Self.trim($0)) }.filter { !$0.isEmpty }
    }

    /// One word (no whitespace) of at most `maxBytes` bytes.
    public func word(_ entry: Entry, maxBytes: Int = 255) throws(ConfigFileError) -> String {
        guard entry.value.utf8.count <= maxBytes, !entry.value.contains(where: { $0 == " " || $0 == "\t" }) else {
            throw error(entry, "must be one word of at most \(maxBytes) bytes")
        }
        return entry.value
    }
}

/// A config file problem: the file, the line (0 for the file as a whole) and what is wrong.
public struct ConfigFileError: Error, Sendable, Equatable, CustomStringConvertible {
    public let file: String
    public let line: Int
    public let message: String

    public init(file: String, line: Int, message: String) {
        self.file = file
        self.line = line
        self.message = message
    }

    public var description: String { line > 0 ? "\(file):\(line): \(message)" : "\(file): \(message)" }
}
