/// UTC timestamps with milliseconds computed from the Unix time alone: no
/// time zone database, no locale. Foundation's `Date.ISO8601FormatStyle`
/// loads ICU's time zone and calendar data on first use (about 4 MiB of
/// resident pages in every daemon that logs), and GRDB writes a stored date
/// through DateFormatter and ICU; neither text needs any of it.
public enum UTCTimestamp {
    /// ISO 8601 (`2026-12-06T15:43:33.123Z`), the milliseconds truncated: log lines.
    /// - Parameter secondsSince1970: Unix time; before 1970 and after 9999 are clamped.
    public static func format(secondsSince1970: Double) -> String {
        let clamped = min(max(secondsSince1970.isFinite ? secondsSince1970 : 0, 0), 253_402_300_799.999)
        return text(millisecondsSince1970: Int64((clamped * 1000).rounded(.down)), separator: UInt8(ascii: "T"), zone: true)
    }

    /// SQLite's date text (`2026-12-06 15:43:33.123`, UTC), as GRDB stores a date.
    /// - Parameter millisecondsSince1970: 0 (1970) to 253,402,300,799,999 (the end of 9999).
    public static func sqliteText(millisecondsSince1970: Int64) -> String {
        text(millisecondsSince1970: millisecondsSince1970, separator: UInt8(ascii: " "), zone: false)
    }

    private static func text(millisecondsSince1970 totalMilliseconds: Int64, separator: UInt8, zone: Bool) -> String {
        let milliseconds = Int(totalMilliseconds % 1000)
        let seconds = totalMilliseconds / 1000
        let days = seconds / 86_400
        let secondOfDay = Int(seconds % 86_400)
        let (year, month, day) = civil(daysSince1970: days)
        var out = [UInt8]()
        out.reserveCapacity(24)
        digits(year, 4, &out); out.append(UInt8(ascii: "-"))
        digits(month, 2, &out); out.append(UInt8(ascii: "-"))
        digits(day, 2, &out); out.append(separator)
        digits(secondOfDay / 3600, 2, &out); out.append(UInt8(ascii: ":"))
        digits(secondOfDay / 60 % 60, 2, &out); out.append(UInt8(ascii: ":"))
        digits(secondOfDay % 60, 2, &out); out.append(UInt8(ascii: "."))
        digits(milliseconds, 3, &out)
        if zone { out.append(UInt8(ascii: "Z")) }
        return String(decoding: out, as: UTF8.self)
    }

    /// The proleptic Gregorian date of a day count from 1970-01-01
    /// (days-from-civil inverted, in 400-year eras of 146,097 days).
    static func civil(daysSince1970: Int64) -> (year: Int, month: Int, day: Int) {
        let z = daysSince1970 + 719_468                 // days since 0000-03-01
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097                                                    // [0, 146096]
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365   // [0, 399]
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)       // [0, 365], from March 1
        let monthIndex = (5 * dayOfYear + 2) / 153                                           // [0, 11], March = 0
        let day = dayOfYear - (153 * monthIndex + 2) / 5 + 1
        let month = monthIndex < 10 ? monthIndex + 3 : monthIndex - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        return (Int(year), Int(month), Int(day))
    }

    private static func digits(_ value: Int, _ width: Int, _ out: inout [UInt8]) {
        var divisor = 1
        for _ in 1..<width { divisor *= 10 }
        var rest = value
        while divisor > 0 {
            out.append(UInt8(ascii: "0") + UInt8(rest / divisor % 10))
            rest %= divisor
            divisor /= 10
        }
    }
}
