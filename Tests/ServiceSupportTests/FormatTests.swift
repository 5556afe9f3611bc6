import Foundation
@testable import ServiceSupport
@testable import SystemLayer
import Testing

@Suite("Log timestamps and small JSON answers, without Foundation's locale machinery")
struct FormatTests {
    @Test("UTC timestamps match the calendar at era, century and leap-year edges", arguments: [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (0.0015, "1970-01-01T00:00:00.001Z"),
        (951_782_400.0, "2000-02-29T00:00:00.000Z"),           // a leap day in a year divisible by 400
        (951_868_799.999, "2000-02-29T23:59:59.999Z"),
        (4_107_542_400.0, "2100-03-01T00:00:00.000Z"),         // 2100 is not a leap year: Feb 28 then Mar 1
        (1_796_571_813.123, "2026-12-06T15:43:33.123Z"),
        (1_709_164_800.5, "2024-02-29T00:00:00.500Z"),
        (-5.0, "1970-01-01T00:00:00.000Z"),                    // clamped, not a crash
        (.infinity, "1970-01-01T00:00:00.000Z"),
        (1e15, "9999-12-31T23:59:59.999Z"),
    ])
    func timestamps(seconds: Double, expected: String) {
        #expect(UTCTimestamp.format(secondsSince1970: seconds) == expected)
    }

    @Test("every day from 1970 to 2400 agrees with Foundation's Gregorian calendar in UTC")
    func everyDayAgreesWithFoundation() throws {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = try #require(TimeZone(identifier: "UTC"))
        var mismatches: [String] = []
        for day in stride(from: Int64(0), through: 157_054, by: 1) {      // 2400-01-01 is day 157,054
            let date = Date(timeIntervalSince1970: Double(day) * 86_400)
            let parts = calendar.dateComponents([.year, .month, .day], from: date)
            let ours = UTCTimestamp.civil(daysSince1970: day)
            if ours.year != parts.year || ours.month != parts.month || ours.day != parts.day {
                mismatches.append("day \(day): \(ours) vs \(parts)")
                if mismatches.count > 5 { break }
            }
        }
        #expect(mismatches.isEmpty, "\(mismatches)")
    }

    @Test("flat JSON: keys sorted, strings escaped, numbers and booleans bare, and it parses back")
    func flatJSON() throws {
        let bytes = FlatJSON.encode([
            "status": "success", "code": 200, "ok": true, "off": false,
            "error": "a \"quoted\" \\ path /v1/x\nnext\tline\u{01} é",
        ])
        let text = String(decoding: bytes, as: UTF8.self)
        #expect(text == #"{"code":200,"error":"a \"quoted\" \\ path /v1/x\nnext\tline\u0001 é","off":false,"ok":true,"status":"success"}"#)
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
        #expect(parsed["error"] as? String == "a \"quoted\" \\ path /v1/x\nnext\tline\u{01} é")
        #expect(parsed["code"] as? Int == 200)
        #expect(String(decoding: FlatJSON.encode([:]), as: UTF8.self) == "{}")
    }

    @Test("a CR or CRLF in a log message or value stays on the event's one line")
    func lineBreaksAreEscaped() {
        let line = ServiceLogHandler.line(label: "sg", level: .warning, message: "a\r\nb\rc",
                                          metadata: ["client": "x\r\ny", "plain": "z"], now: Date(timeIntervalSince1970: 0))
        #expect(line == "1970-01-01T00:00:00.000Z warning sg: a\\r\\nb\\rc client=\"x\\r\\ny\" plain=z\n")
        #expect(line.utf8.filter { $0 == 0x0A || $0 == 0x0D }.count == 1)
        // The metrics exposition escapes the same way: a CRLF's line feed cannot end the sample line.
        #expect(PrometheusText.escape("a\r\nb\"c\\") == "a\r\\nb\\\"c\\\\")
        #expect(PrometheusText.escape("a\r\nb\"", quotes: false) == "a\r\\nb\"")
    }

    @Test("percent-decoding agrees with Foundation's removingPercentEncoding", arguments: [
        "plain", "a%2Fb", "%C3%A9t%C3%A9", "100%25", "%41%62", "a%2", "%", "%zz", "%FF", "%C3", "a+b", "",
    ])
    func percentDecoding(text: String) {
        #expect(PercentDecoding.decode(text) == text.removingPercentEncoding)
    }
}
