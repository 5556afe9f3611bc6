/// Escaping for the daemons' text formats (log lines, metrics help),
/// byte by byte on UTF-8: Swift's `Character` treats CRLF as one character,
/// so a character-level replace of "\n" would leave a CRLF's line break in
/// place. The bytes replaced are ASCII, which never occur inside a
/// multi-byte UTF-8 sequence.
enum ByteEscape {
    /// `text` with each byte `replacement` maps replaced by those bytes.
    static func apply(_ text: String, _ replacement: (UInt8) -> [UInt8]?) -> String {
        guard text.utf8.contains(where: { replacement($0) != nil }) else { return text }
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count + 8)
        for byte in text.utf8 {
            if let bytes = replacement(byte) { out += bytes } else { out.append(byte) }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// A backslash and `letter`.
    static func backslash(_ letter: Character) -> [UInt8] { [0x5C, letter.asciiValue!] }
}
