/// A strict, bounded reader and writer for the small XML documents of the
/// PCoIP broker protocol. Pure Swift, no Foundation, no libxml2: the bytes
/// come from strangers (clients on the internet, third-party brokers), so
/// the grammar is cut down to what the protocol uses and everything else is
/// refused by name.
///
/// Accepted: an optional UTF-8 byte order mark, an optional `<?xml ...?>`
/// declaration, elements with attributes (`"` or `'` quoted, no duplicates),
/// character data, `<![CDATA[...]]>`, comments, the five predefined entities
/// and character references. Refused: DTDs (`<!DOCTYPE`), entity
/// declarations, any other entity, processing instructions, more than one
/// root, and anything beyond `Limits` (size, depth, element count, name,
/// attribute and text lengths). No entity is ever expanded into more bytes
/// than it was written with, so no "billion laughs".
public enum BrokerXML {
    /// Bounds on one document.
    public struct Limits: Sendable, Equatable {
        public var maxBytes: Int
        public var maxDepth: Int
        public var maxElements: Int
        public var maxAttributesPerElement: Int
        public var maxNameBytes: Int

        public init(maxBytes: Int = 64 * 1024, maxDepth: Int = 16, maxElements: Int = 4096,
                    maxAttributesPerElement: Int = 16, maxNameBytes: Int = 128) {
            self.maxBytes = maxBytes
            self.maxDepth = maxDepth
            self.maxElements = maxElements
            self.maxAttributesPerElement = maxAttributesPerElement
            self.maxNameBytes = maxNameBytes
        }

        public static let standard = Limits()
    }

    /// One attribute, in document order.
    public struct Attribute: Sendable, Equatable {
        public var name: String
        public var value: String

        public init(_ name: String, _ value: String) {
            self.name = name
            self.value = value
        }
    }

    /// An element: its name, attributes, child elements and the character
    /// data directly inside it (all pieces joined, whitespace kept).
    public struct Element: Sendable, Equatable {
        public var name: String
        public var attributes: [Attribute]
        public var children: [Element]
        public var text: String

        public init(_ name: String, attributes: [Attribute] = [], children: [Element] = [], text: String = "") {
            self.name = name
            self.attributes = attributes
            self.children = children
            self.text = text
        }

        /// An element holding only `text`.
        public static func leaf(_ name: String, _ text: String, attributes: [Attribute] = []) -> Element {
            Element(name, attributes: attributes, text: text)
        }

        /// The first child called `name`.
        public func child(_ name: String) -> Element? { children.first { $0.name == name } }

        /// Every child called `name`.
        public func children(_ name: String) -> [Element] { children.filter { $0.name == name } }

        /// The text of the first child called `name`, without surrounding whitespace.
        public func childText(_ name: String) -> String? { child(name)?.trimmedText }

        /// The value of attribute `name`.
        public func attribute(_ name: String) -> String? { attributes.first { $0.name == name }?.value }

        /// `text` without leading and trailing XML whitespace.
        public var trimmedText: String {
            var scalars = Substring(text).unicodeScalars[...]
            while let first = scalars.first, BrokerXML.isSpace(first.value) { scalars = scalars.dropFirst() }
            while let last = scalars.last, BrokerXML.isSpace(last.value) { scalars = scalars.dropLast() }
            return String(String.UnicodeScalarView(scalars))
        }

        /// A copy with the first child called `name` replaced by `new` (or appended when absent).
        public func replacing(_ name: String, with new: Element) -> Element {
            var copy = self
            if let index = copy.children.firstIndex(where: { $0.name == name }) {
                copy.children[index] = new
            } else {
                copy.children.append(new)
            }
            return copy
        }
    }

    /// Why a document was refused, with the byte offset where it was noticed.
    public struct ParseError: Error, Sendable, Equatable, CustomStringConvertible {
        public let offset: Int
        public let reason: String

        public var description: String { "malformed XML at byte \(offset): \(reason)" }
    }

    /// Parses one document.
    /// - Throws: `ParseError` naming the first problem.
    public static func parse(_ bytes: some Collection<UInt8>, limits: Limits = .standard) throws(ParseError) -> Element {
        guard bytes.count <= limits.maxBytes else {
            throw ParseError(offset: limits.maxBytes, reason: "the document is larger than \(limits.maxBytes) bytes")
        }
        var parser = Parser(bytes: Array(bytes), limits: limits)
        return try parser.document()
    }

    /// Writes `root` as a document with an XML declaration (UTF-8, no pretty-printing).
    public static func serialize(_ root: Element) -> [UInt8] {
        var out: [UInt8] = Array("<?xml version=\"1.0\" encoding=\"UTF-8\"?>".utf8)
        write(root, into: &out)
        return out
    }

    private static func write(_ element: Element, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "<"))
        out += element.name.utf8
        for attribute in element.attributes {
            out.append(UInt8(ascii: " "))
            out += attribute.name.utf8
            out += Array("=\"".utf8)
            escape(attribute.value, attribute: true, into: &out)
            out.append(UInt8(ascii: "\""))
        }
        if element.children.isEmpty && element.text.isEmpty {
            out += Array("/>".utf8)
            return
        }
        out.append(UInt8(ascii: ">"))
        escape(element.text, attribute: false, into: &out)
        for child in element.children { write(child, into: &out) }
        out += Array("</".utf8)
        out += element.name.utf8
        out.append(UInt8(ascii: ">"))
    }

    private static func escape(_ text: String, attribute: Bool, into out: inout [UInt8]) {
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "<"): out += Array("&lt;".utf8)
            case UInt8(ascii: ">"): out += Array("&gt;".utf8)
            case UInt8(ascii: "&"): out += Array("&amp;".utf8)
            case UInt8(ascii: "\"") where attribute: out += Array("&quot;".utf8)
            case 0x0A where attribute: out += Array("&#10;".utf8)
            case 0x0D: out += Array("&#13;".utf8)
            case 0x09 where attribute: out += Array("&#9;".utf8)
            default: out.append(byte)
            }
        }
    }

    static func isSpace(_ value: UInt32) -> Bool { value == 0x20 || value == 0x09 || value == 0x0A || value == 0x0D }

    // MARK: The reader

    private struct Parser {
        let bytes: [UInt8]
        let limits: Limits
        var index = 0
        var elements = 0

        init(bytes: [UInt8], limits: Limits) {
            self.bytes = bytes
            self.limits = limits
        }

        func fail(_ reason: String) -> ParseError { ParseError(offset: index, reason: reason) }

        var atEnd: Bool { index >= bytes.count }

        func peek(_ offset: Int = 0) -> UInt8? {
            index + offset < bytes.count ? bytes[index + offset] : nil
        }

        func starts(with text: StaticString) -> Bool {
            let count = text.utf8CodeUnitCount
            guard index + count <= bytes.count else { return false }
            return text.withUTF8Buffer { prefix in
                for i in 0..<count where bytes[index + i] != prefix[i] { return false }
                return true
            }
        }

        mutating func skipSpace() {
            while let byte = peek(), BrokerXML.isSpace(UInt32(byte)) { index += 1 }
        }

        mutating func document() throws(ParseError) -> Element {
            if starts(with: "\u{FEFF}") { index += 3 }
            if starts(with: "<?xml") {
                guard let end = find("?>") else { throw fail("the XML declaration is not closed") }
                let declaration = String(decoding: bytes[index..<end], as: UTF8.self).lowercased()
                if let encoding = declaration.firstRange(of: "encoding=") {
                    let value = declaration[encoding.upperBound...].dropFirst().prefix { $0 != "\"" && $0 != "'" }
                    guard value == "utf-8" || value == "utf8" else { throw fail("encoding \(value): only UTF-8 is accepted") }
                }
                index = end + 2
            }
            try misc()
            guard peek() == UInt8(ascii: "<") else {
                throw fail(atEnd ? "no root element" : "text before the root element")
            }
            let root = try element(depth: 1)
            try misc()
            guard atEnd else { throw fail("content after the root element") }
            return root
        }

        /// Whitespace and comments between top-level items; refuses DTDs and PIs.
        mutating func misc() throws(ParseError) {
            while true {
                skipSpace()
                if starts(with: "<!--") { try comment(); continue }
                if starts(with: "<!DOCTYPE") || starts(with: "<!doctype") { throw fail("DTDs (<!DOCTYPE) are not allowed") }
                if starts(with: "<!") { throw fail("markup declarations are not allowed") }
                if starts(with: "<?") { throw fail("processing instructions are not allowed") }
                return
            }
        }

        mutating func comment() throws(ParseError) {
            index += 4
            guard let end = find("-->") else { throw fail("a comment is not closed") }
            index = end + 3
        }

        func find(_ text: StaticString) -> Int? {
            let count = text.utf8CodeUnitCount
            var i = index
            while i + count <= bytes.count {
                let match = text.withUTF8Buffer { needle in
                    for j in 0..<count where bytes[i + j] != needle[j] { return false }
                    return true
                }
                if match { return i }
                i += 1
            }
            return nil
        }

        mutating func name() throws(ParseError) -> String {
            let start = index
            guard let first = peek(), Self.isNameStart(first) else { throw fail("expected a name") }
            index += 1
            while let byte = peek(), Self.isNameByte(byte) {
                index += 1
                if index - start > limits.maxNameBytes { throw fail("a name is longer than \(limits.maxNameBytes) bytes") }
            }
            return try utf8(bytes[start..<index])
        }

        static func isNameStart(_ byte: UInt8) -> Bool {
            (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || byte == UInt8(ascii: "_")
                || byte == UInt8(ascii: ":") || byte >= 0x80
        }

        static func isNameByte(_ byte: UInt8) -> Bool {
            isNameStart(byte) || (byte >= 0x30 && byte <= 0x39) || byte == UInt8(ascii: "-") || byte == UInt8(ascii: ".")
        }

        func utf8(_ slice: ArraySlice<UInt8>) throws(ParseError) -> String {
            guard let text = String(validating: slice, as: UTF8.self) else { throw fail("the bytes are not UTF-8") }
            return text
        }

        mutating func element(depth: Int) throws(ParseError) -> Element {
            guard depth <= limits.maxDepth else { throw fail("elements nest deeper than \(limits.maxDepth)") }
            elements += 1
            guard elements <= limits.maxElements else { throw fail("more than \(limits.maxElements) elements") }
            index += 1 // "<"
            var element = Element(try name())
            while true {
                let hadSpace = peek().map { BrokerXML.isSpace(UInt32($0)) } ?? false
                skipSpace()
                guard let byte = peek() else { throw fail("the start tag of <\(element.name)> is not closed") }
                if byte == UInt8(ascii: "/") {
                    guard peek(1) == UInt8(ascii: ">") else { throw fail("expected `/>`") }
                    index += 2
                    return element
                }
                if byte == UInt8(ascii: ">") {
                    index += 1
                    break
                }
                guard hadSpace else { throw fail("expected whitespace before an attribute of <\(element.name)>") }
                let attributeName = try name()
                if element.attributes.contains(where: { $0.name == attributeName }) {
                    throw fail("attribute \(attributeName) of <\(element.name)> is given twice")
                }
                guard element.attributes.count < limits.maxAttributesPerElement else {
                    throw fail("<\(element.name)> has more than \(limits.maxAttributesPerElement) attributes")
                }
                skipSpace()
                guard peek() == UInt8(ascii: "=") else { throw fail("expected `=` after attribute \(attributeName)") }
                index += 1
                skipSpace()
                guard let quote = peek(), quote == UInt8(ascii: "\"") || quote == UInt8(ascii: "'") else {
                    throw fail("the value of attribute \(attributeName) is not quoted")
                }
                index += 1
                var value: [UInt8] = []
                while true {
                    guard let c = peek() else { throw fail("the value of attribute \(attributeName) is not closed") }
                    if c == quote { index += 1; break }
                    if c == UInt8(ascii: "<") { throw fail("`<` inside the value of attribute \(attributeName)") }
                    if c == UInt8(ascii: "&") { value += try reference(); continue }
                    // Attribute-value normalisation: whitespace characters become spaces.
                    value.append(BrokerXML.isSpace(UInt32(c)) ? 0x20 : c)
                    index += 1
                }
                element.attributes.append(Attribute(attributeName, try utf8(value[...])))
            }
            // Content.
            var text: [UInt8] = []
            while true {
                guard let byte = peek() else { throw fail("<\(element.name)> is not closed") }
                if byte == UInt8(ascii: "<") {
                    if starts(with: "</") {
                        index += 2
                        let closing = try name()
                        guard closing == element.name else {
                            throw fail("</\(closing)> closes <\(element.name)>")
                        }
                        skipSpace()
                        guard peek() == UInt8(ascii: ">") else { throw fail("expected `>` after </\(closing)") }
                        index += 1
                        element.text = try utf8(text[...])
                        return element
                    }
                    if starts(with: "<!--") { try comment(); continue }
                    if starts(with: "<![CDATA[") {
                        index += 9
                        guard let end = find("]]>") else { throw fail("a CDATA section is not closed") }
                        text += bytes[index..<end]
                        index = end + 3
                        continue
                    }
                    if starts(with: "<!") { throw fail("markup declarations are not allowed") }
                    if starts(with: "<?") { throw fail("processing instructions are not allowed") }
                    element.children.append(try self.element(depth: depth + 1))
                    continue
                }
                if byte == UInt8(ascii: "&") { text += try reference(); continue }
                if byte == UInt8(ascii: "]") && starts(with: "]]>") { throw fail("`]]>` outside a CDATA section") }
                text.append(byte)
                index += 1
            }
        }

        /// `&name;` or `&#N;`/`&#xH;` at `index`; the bytes it stands for.
        mutating func reference() throws(ParseError) -> [UInt8] {
            let start = index
            index += 1
            var body: [UInt8] = []
            while let byte = peek(), byte != UInt8(ascii: ";") {
                body.append(byte)
                index += 1
                if body.count > 10 { index = start; throw fail("an entity reference is not closed with `;`") }
            }
            guard peek() == UInt8(ascii: ";") else { index = start; throw fail("an entity reference is not closed with `;`") }
            index += 1
            switch String(decoding: body, as: UTF8.self) {
            case "lt": return [UInt8(ascii: "<")]
            case "gt": return [UInt8(ascii: ">")]
            case "amp": return [UInt8(ascii: "&")]
            case "quot": return [UInt8(ascii: "\"")]
            case "apos": return [UInt8(ascii: "'")]
            case let name where name.hasPrefix("#"):
                let digits = name.dropFirst()
                let value: UInt32?
                if digits.hasPrefix("x") { value = UInt32(digits.dropFirst(), radix: 16) } else { value = UInt32(digits, radix: 10) }
                guard let value, value == 0x9 || value == 0xA || value == 0xD || value >= 0x20,
                      let scalar = Unicode.Scalar(value) else {
                    index = start
                    throw fail("character reference &\(name); is not a valid XML character")
                }
                return Array(String(Character(scalar)).utf8)
            case let name:
                index = start
                throw fail("entity &\(name); is not defined (only the five predefined entities are)")
            }
        }
    }
}
