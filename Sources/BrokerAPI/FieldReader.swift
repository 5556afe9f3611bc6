import BrokerCore

/// Reads the fields of a JSON object body, checking each one's type and naming
/// the field in every error.
///
/// Two policies for fields the call does not take (LEOSTREAM-REST.md, "Errors"):
/// - `.leostream`: unknown fields are ignored and listed in `extraFields`,
///   read-only fields are ignored with an entry in `warnings`;
/// - `.strict` (the product's own calls): either is a 400.
struct FieldReader {
    enum Policy {
        case leostream
        case strict
    }

    private let object: [String: JSONValue]
    /// Where the object sits in the body, for error messages (`protocols[2]`); "" at the top.
    private let path: String
    private(set) var extraFields: [String] = []
    private(set) var warnings: [String] = []

    /// - Throws: `APIError` 400 when the body is not an object, or (strict) holds
    ///   an unknown or read-only field.
    init(_ value: JSONValue, known: Set<String>, readOnly: Set<String> = [], policy: Policy, path: String = "") throws(APIError) {
        guard case .object(let object) = value else {
            let what = path.isEmpty ? "the body" : path
            throw APIError(.badRequest, "\(what) must be a JSON object, got \(value.kind)", field: path.isEmpty ? nil : path)
        }
        self.object = object
        self.path = path
        for key in object.keys.sorted() where !known.contains(key) {
            let name = qualified(key)
            switch (policy, readOnly.contains(key)) {
            case (.leostream, true): warnings.append("\(name) is read-only and was ignored")
            case (.leostream, false): extraFields.append(name)
            case (.strict, true): throw APIError.badField(name, "is read-only")
            case (.strict, false):
                throw APIError.badField(name, "unknown field (this call takes \(known.sorted().joined(separator: ", ")))")
            }
        }
    }

    func contains(_ key: String) -> Bool { object[key] != nil }

    /// A string field: nil when absent.
    /// - Parameter nullAs: what `null` means (nil: `null` is refused, the field is required to be a string).
    func string(_ key: String, nullAs: String? = nil) throws(APIError) -> String? {
        switch object[key] {
        case nil: return nil
        case .string(let value)?: return value
        case .null? where nullAs != nil: return nullAs
        case let other?: throw mismatch(key, "a string", other)
        }
    }

    /// An integer field: nil when absent. Integral numbers written as `1.0` are accepted.
    func int(_ key: String) throws(APIError) -> Int? {
        guard let value = object[key] else { return nil }
        guard let number = Self.integer(value) else { throw mismatch(key, "an integer", value) }
        return number
    }

    /// A true/false field: nil when absent.
    func bool(_ key: String) throws(APIError) -> Bool? {
        switch object[key] {
        case nil: return nil
        case .bool(let value)?: return value
        case let other?: throw mismatch(key, "true or false", other)
        }
    }

    /// A reference to another row: an id, or `null`/`0` for none. nil when absent.
    func reference(_ key: String) throws(APIError) -> NullableChange<Int64>? {
        switch object[key] {
        case nil: return nil
        case .null?: return .clear
        case let value?:
            guard let number = Self.integer(value) else { throw mismatch(key, "an integer id or null", value) }
            if number == 0 { return .clear }
            if number < 0 { throw APIError.badField(qualified(key), "must be a positive id, 0 or null, got \(number)") }
            return .set(Int64(number))
        }
    }

    /// An array field: nil when absent.
    func array(_ key: String) throws(APIError) -> [JSONValue]? {
        switch object[key] {
        case nil: return nil
        case .array(let value)?: return value
        case let other?: throw mismatch(key, "an array", other)
        }
    }

    func qualified(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    private func mismatch(_ key: String, _ expected: String, _ got: JSONValue) -> APIError {
        APIError.badField(qualified(key), "must be \(expected), got \(got.kind)")
    }

    private static func integer(_ value: JSONValue) -> Int? {
        switch value {
        case .int(let number): return Int(exactly: number)
        case .double(let number) where number.rounded() == number && abs(number) < 9.0e15: return Int(number)
        default: return nil
        }
    }
}

/// Calls a core check and turns its `FieldError` into a 400.
func validating<T>(_ body: () throws(FieldError) -> T) throws(APIError) -> T {
    do { return try body() } catch { throw APIError.invalid(error) }
}
