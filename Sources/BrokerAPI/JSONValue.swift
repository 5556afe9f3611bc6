import ControlProtocol
import Foundation

/// A JSON document as it was sent, so that each field's type can be checked and
/// reported by name (a `Codable` struct would stop at the first mismatch with a
/// coding path, and could not list unknown fields).
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// "a string", "true or false", ...: how an error names what it got.
    var kind: String {
        switch self {
        case .null: "null"
        case .bool: "true or false"
        case .int, .double: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }

    /// Parses `data` as one JSON document.
    /// - Throws: `APIError` 400 saying where the JSON is malformed.
    static func parse(_ data: Data) throws(APIError) -> JSONValue {
        do {
            return try JSONDecoder().decode(JSONValue.self, from: data)
        } catch let error as DecodingError {
            throw APIError(.badRequest, "malformed JSON body: \(Self.describe(error))")
        } catch {
            throw APIError(.badRequest, "malformed JSON body: \(error)")
        }
    }

    /// The document as compact JSON with sorted keys: byte for byte what
    /// JSONEncoder writes with `.sortedKeys` and `.withoutEscapingSlashes`
    /// (tested), written straight to bytes; JSONEncoder was 3 % of the
    /// broker's CPU per connect call (issue 15). Numbers that are not whole
    /// are still formatted by JSONEncoder, one at a time. A document holding
    /// a non-finite number, which JSONEncoder refuses, is `null`.
    func encoded() -> Data {
        var out: [UInt8] = []
        out.reserveCapacity(256)
        do {
            try write(to: &out)
        } catch {
            return Data("null".utf8)
        }
        return Data(out)
    }

    private struct NotFinite: Error {}

    private func write(to out: inout [UInt8]) throws {
        switch self {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let value): out.append(contentsOf: (value ? "true" : "false").utf8)
        case .int(let value): out.append(contentsOf: String(value).utf8)
        case .double(let value):
            guard value.isFinite else { throw NotFinite() }
            out.append(contentsOf: try JSONEncoder().encode(value))
        case .string(let value): ControlJSON.appendString(value, to: &out, escapingSlashes: false)
        case .array(let values):
            out.append(UInt8(ascii: "["))
            for (index, value) in values.enumerated() {
                if index > 0 { out.append(UInt8(ascii: ",")) }
                try value.write(to: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let fields):
            out.append(UInt8(ascii: "{"))
            for (index, field) in fields.sorted(by: { $0.key < $1.key }).enumerated() {
                if index > 0 { out.append(UInt8(ascii: ",")) }
                ControlJSON.appendString(field.key, to: &out, escapingSlashes: false)
                out.append(UInt8(ascii: ":"))
                try field.value.write(to: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    private static func describe(_ error: DecodingError) -> String {
        switch error {
        case .dataCorrupted(let context):
            let underlying = (context.underlyingError as? NSError)?.userInfo[NSDebugDescriptionErrorKey] as? String
            return underlying ?? context.debugDescription
        default:
            return "\(error)"
        }
    }
}

extension JSONValue: Codable {
    public init(from decoder: any Decoder) throws {
        // Each kind is tried in turn, and a failed try costs an error: the
        // common kinds go first. A string decodes as nothing else and
        // nothing else as a string, so it can lead; a whole number must stay
        // `.int` (before Double), and JSON's true is not a number.
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode(Int64.self) {
            self = .int(value)
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .double(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            // Last, so a bad value inside an object is what the error names.
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .int(let value): try container.encode(value)
        case .double(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        case .array(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral, ExpressibleByNilLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(Dictionary(elements, uniquingKeysWith: { _, last in last }))
    }
    public init(nilLiteral: ()) { self = .null }
}

extension JSONValue {
    /// `.string`, or `.null` for nil.
    static func optional(_ value: String?) -> JSONValue { value.map { .string($0) } ?? .null }
    /// `.int`, or `.null` for nil.
    static func optional(_ value: Int64?) -> JSONValue { value.map { .int($0) } ?? .null }
    /// An ISO 8601 date-time in UTC (`2026-05-01T10:00:00Z`).
    static func date(_ value: Date) -> JSONValue { .string(value.formatted(.iso8601)) }
}
