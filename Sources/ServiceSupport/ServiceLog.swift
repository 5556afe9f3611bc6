import FoundationEssentials
import Logging
import SystemLayer

/// The daemons' log: one structured line per event. Under systemd (stderr is
/// the journal's stream) each event goes to the journal with its fields
/// (`MESSAGE`, `PRIORITY`, `SESSION_ID`, `CLIENT`, `TARGET`, `RULE_ID`,
/// `REASON`, ...); otherwise it is one line on stderr,
/// `TIME LEVEL LABEL: MESSAGE key=value ...`. Metadata whose key names a
/// secret (password, secret, token, key) is never written.
public struct ServiceLogHandler: LogHandler {
    public enum Sink: Sendable, Equatable {
        case journal
        case standardError
    }

    public let label: String
    public let sink: Sink
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?

    public init(label: String, level: Logger.Level, sink: Sink) {
        self.label = label
        self.logLevel = level
        self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let own = event.metadata { merged.merge(own) { _, new in new } }
        switch sink {
        case .journal:
            if !Systemd.journal(Self.journalFields(label: label, level: event.level, message: "\(event.message)", metadata: merged)) {
                StandardStreams.writeError(Self.line(label: label, level: event.level, message: "\(event.message)", metadata: merged))
            }
        case .standardError:
            StandardStreams.writeError(Self.line(label: label, level: event.level, message: "\(event.message)", metadata: merged))
        }
    }

    /// Installs the handler for the whole process: the journal when stderr is
    /// the journal's stream (running under systemd), stderr otherwise.
    public static func bootstrap(level: Logger.Level) {
        let sink: Sink = Systemd.stderrIsJournal ? .journal : .standardError
        LoggingSystem.bootstrap { label in ServiceLogHandler(label: label, level: level, sink: sink) }
    }

    // MARK: Formats (pure, tested)

    /// Journal field names for the metadata keys the daemons use.
    static let journalNames: [String: String] = [
        "session": "SESSION_ID", "session_id": "SESSION_ID",
        "client": "CLIENT", "target": "TARGET",
        "rule": "RULE_ID", "rule_id": "RULE_ID",
        "reason": "REASON",
    ]

    /// Whether `key` names a secret, whose value is never logged: it holds
    /// one of `secretWords`, in any case. Searched in the key's bytes (ASCII
    /// case folded), with no lowercased copy: `String.contains` on a
    /// lowercased string was most of a log line's cost.
    static func isSecret(_ key: String) -> Bool {
        var key = key
        return key.withUTF8 { bytes in
            secretWords.contains { word in
                guard bytes.count >= word.count else { return false }
                return (0...(bytes.count - word.count)).contains { start in
                    word.indices.allSatisfy { bytes[start + $0] | 0x20 == word[$0] }
                }
            }
        }
    }

    /// Lower-case ASCII, so that `byte | 0x20` (which folds A-Z) matches them.
    private static let secretWords = ["password", "secret", "token", "key", "authorization", "cookie"].map { Array($0.utf8) }

    static func syslogPriority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    /// A journal field name: upper case letters, digits and underscores, not
    /// starting with an underscore or a digit.
    static func journalName(_ key: String) -> String {
        if let known = journalNames[key] { return known }
        var name = String(key.uppercased().map { ($0.isASCII && ($0.isLetter || $0.isNumber)) ? $0 : "_" })
        while name.first == "_" || name.first?.isNumber == true { name.removeFirst() }
        return name.isEmpty ? "FIELD" : String(name.prefix(64))
    }

    static func journalFields(label: String, level: Logger.Level, message: String, metadata: Logger.Metadata) -> [(String, String)] {
        var fields: [(String, String)] = [
            ("MESSAGE", message),
            ("PRIORITY", String(syslogPriority(level))),
            ("SYSLOG_IDENTIFIER", label),
            ("LOG_LEVEL", level.rawValue),
        ]
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) where !isSecret(key) {
            fields.append((journalName(key), "\(value)"))
        }
        return fields
    }

    static func line(label: String, level: Logger.Level, message: String, metadata: Logger.Metadata, now: Date = Date()) -> String {
        var line = "\(UTCTimestamp.format(secondsSince1970: now.timeIntervalSince1970)) \(level.rawValue) \(label): "
        line += escaped(message, quotes: false)
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) where !isSecret(key) {
            line += " \(key)=\(quoted("\(value)"))"
        }
        return line + "\n"
    }

    static func quoted(_ value: String) -> String {
        guard value.isEmpty || value.utf8.contains(where: { $0 == 0x20 || $0 == 0x22 || $0 == 0x3D || $0 == 0x0A || $0 == 0x0D })
        else { return value }
        return "\"" + escaped(value, quotes: true) + "\""
    }

    /// Line breaks (LF and CR, also inside a CRLF) as `\n` and `\r`, so
    /// one event stays one line; with `quotes`, backslashes and double
    /// quotes escaped too.
    static func escaped(_ text: String, quotes: Bool) -> String {
        ByteEscape.apply(text) { byte in
            switch byte {
            case 0x0A: ByteEscape.backslash("n")
            case 0x0D: ByteEscape.backslash("r")
            case 0x5C where quotes: ByteEscape.backslash("\\")
            case 0x22 where quotes: ByteEscape.backslash("\"")
            default: nil
            }
        }
    }
}
