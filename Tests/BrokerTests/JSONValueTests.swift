@testable import BrokerAPI
@testable import BrokerCore
import GRDB
import Foundation
import Testing

/// The broker's JSON answers are written by hand: they must be the bytes
/// JSONEncoder writes (sorted keys, slashes not escaped) for every kind of
/// value, key order and awkward string.
@Suite("JSON answers")
struct JSONValueTests {
    static func viaEncoder(_ value: JSONValue) -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? encoder.encode(value)) ?? Data("null".utf8)
    }

    @Test("byte for byte what JSONEncoder writes, nested, with every kind of value and key order")
    func sameBytes() {
        let odd = "q\"b\\s/c\u{8}f\u{c}n\nr\rt\tu\u{1}\u{1f}\u{7f} é 😀 \u{2028}"
        let documents: [JSONValue] = [
            .null, true, false, 0, .int(Int64.min), .int(Int64.max), "", .string(odd), [], [:],
            .double(1.0), .double(0.1), .double(1e20), .double(1e-7), .double(-0.0), .double(123456789.125),
            .double(Double.greatestFiniteMagnitude), .double(Double.leastNonzeroMagnitude),
            ["a10": 1, "a9": 2, "B": 3, "a": 4, "_x": 5, "Z1": 6, "é": 7, "e": 8, "ab": 9, "a_b": 10, "A": 11, .init(stringLiteral: odd): 12],
            [
                "rule_id": "0123abcd", "gateway": ["id": 1, "name": "gw/1 \"east\""], "address": "203.0.113.10",
                "port": 20001, "protocol": "rdp", "gateways": [["id": 1, "name": "a"], ["id": 2, "name": nil]],
                "load": .double(0.25), "nested": [[[]], [[:]], ["x": [true, .null, .double(2.5)]]],
            ],
        ]
        for document in documents {
            let mine = document.encoded()
            #expect(mine == Self.viaEncoder(document), "\(String(decoding: mine, as: UTF8.self))")
        }
    }

    @Test("a document holding a number JSON cannot carry is null, as JSONEncoder refuses it")
    func nonFinite() {
        for document: JSONValue in [.double(.nan), ["a": [.double(.infinity)]], [.double(-.infinity)]] {
            #expect(document.encoded() == Data("null".utf8))
            #expect(Self.viaEncoder(document) == Data("null".utf8))
        }
    }

    @Test("parsing keeps each value's kind: whole numbers as integers, true as a boolean, digits in quotes as a string")
    func parseKinds() throws {
        let text = #"{"i": 1, "neg": -9223372036854775808, "d": 1.5, "t": true, "f": false, "n": null, "s": "1", "e": "", "a": [1, "x", [], {}], "o": {"k": [true]}}"#
        let value = try JSONValue.parse(Data(text.utf8))
        let expected: JSONValue = [
            "i": 1, "neg": .int(Int64.min), "d": .double(1.5), "t": true, "f": false, "n": nil, "s": "1", "e": "",
            "a": [1, "x", [], [:]], "o": ["k": [true]],
        ]
        if case .object(let fields) = value, case .object(let wanted) = expected {
            for (key, want) in wanted { #expect(fields[key] == want, "\(key)") }
            #expect(Set(fields.keys) == Set(wanted.keys))
        } else {
            Issue.record("not an object: \(value)")
        }
        #expect(try JSONValue.parse(Data("[]".utf8)) == .array([]))
        #expect(try JSONValue.parse(Data("{}".utf8)) == .object([:]))
        #expect(throws: APIError.self) { try JSONValue.parse(Data("{\"a\": ".utf8)) }
    }
}

/// Dates bound into the broker's SQLite statements are written by hand; they
/// must be the text GRDB itself stores, or comparisons and reads would change.
@Suite("stored dates")
struct StoredDateTests {
    @Test("the text GRDB writes for a date, at every millisecond edge, leap day and the ends of the range")
    func sameAsGRDB() {
        var dates = [0, 0.0005, 0.9995, 0.999_999, 951_782_400, 951_868_799.999, 4_107_542_400, 1_900_000_000.1235,
                     1_765_000_000.5, 253_402_300_799.999, -1, 253_402_300_800, 1e12].map(Date.init(timeIntervalSince1970:))
        dates.append(Date())
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20_000 { dates.append(Date(timeIntervalSince1970: Double.random(in: 0..<253_402_300_800, using: &generator))) }
        for _ in 0..<5_000 { dates.append(Date(timeIntervalSince1970: Double.random(in: 1.7e9..<2.1e9, using: &generator))) }
        var mismatches: [String] = []
        for date in dates {
            let grdb = String.fromDatabaseValue(date.databaseValue) ?? "?"
            if StoredDate.text(date) != grdb { mismatches.append("\(date.timeIntervalSince1970): \(StoredDate.text(date)) vs \(grdb)") }
        }
        let count = mismatches.count, first = mismatches.prefix(3).joined(separator: "; ")
        #expect(count == 0, "\(first)")
    }
}
