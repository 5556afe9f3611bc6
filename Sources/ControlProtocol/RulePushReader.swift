/// A push's body read by hand, for the shape a broker sends: one flat object
/// of the known fields, strings without escapes, whole numbers. Anything
/// else (an escape, a fraction, `null`, a field twice, an unknown field,
/// bad UTF-8, a value of the wrong type) gives nil, and the caller decodes
/// the body with `ControlJSON.decodeStrict`, whose value or refusal is the
/// answer. So this reader never refuses and never decides what a body
/// means where the strict decoder would decide otherwise (a test compares
/// the two on valid bodies and on thousands of damaged ones).
///
/// `JSONDecoder` was about 6 % of the control thread's CPU per push (issue
/// 15): Foundation's decoder, its key strategy and the strict wrapper.
public enum RulePushReader {
    public static func read(_ bytes: [UInt8]) -> RulePush? {
        var reader = Cursor(bytes: bytes)
        return reader.push()
    }

    private struct Cursor {
        let bytes: [UInt8]
        var at = 0

        init(bytes: [UInt8]) { self.bytes = bytes }

        mutating func push() -> RulePush? {
            skipSpace()
            guard take(UInt8(ascii: "{")) else { return nil }
            var proto: RuleProtocol?, method: RoutingMethod?, target: String?, client: String?
            var port: Int?, expiry: Int?, path: ForwardingPath?
            var seen: UInt8 = 0
            skipSpace()
            if !take(UInt8(ascii: "}")) {
                while true {
                    skipSpace()
                    guard let key = plainString() else { return nil }
                    skipSpace()
                    guard take(UInt8(ascii: ":")) else { return nil }
                    skipSpace()
                    // Each field once, with a value of its type.
                    let bit: UInt8, read: Bool
                    switch key {
                    case "protocol": proto = plainString().flatMap(RuleProtocol.init(rawValue:)); (bit, read) = (1, proto != nil)
                    case "method": method = integer().flatMap(RoutingMethod.init(rawValue:)); (bit, read) = (2, method != nil)
                    case "target": target = plainString(); (bit, read) = (4, target != nil)
                    case "client_ip": client = plainString(); (bit, read) = (8, client != nil)
                    case "port": port = integer(); (bit, read) = (16, port != nil)
                    case "unused_expiry_s": expiry = integer(); (bit, read) = (32, expiry != nil)
                    case "forwarding_path": path = plainString().flatMap(ForwardingPath.init(rawValue:)); (bit, read) = (64, path != nil)
                    default: return nil
                    }
                    guard read, seen & bit == 0 else { return nil }
                    seen |= bit
                    skipSpace()
                    if take(UInt8(ascii: ",")) { continue }
                    guard take(UInt8(ascii: "}")) else { return nil }
                    break
                }
            }
            skipSpace()
            guard at == bytes.count, let proto, let method, let target else { return nil }
            return RulePush(protocol: proto, method: method, target: target, clientIP: client, port: port,
                            unusedExpirySeconds: expiry, forwardingPath: path)
        }

        mutating func skipSpace() {
            while at < bytes.count, bytes[at] == 0x20 || bytes[at] == 0x0A || bytes[at] == 0x0D || bytes[at] == 0x09 { at += 1 }
        }

        mutating func take(_ byte: UInt8) -> Bool {
            guard at < bytes.count, bytes[at] == byte else { return false }
            at += 1
            return true
        }

        /// A string with no escape and no control character, valid UTF-8.
        mutating func plainString() -> String? {
            guard take(UInt8(ascii: "\"")) else { return nil }
            let start = at
            while at < bytes.count {
                let byte = bytes[at]
                if byte == UInt8(ascii: "\"") {
                    at += 1
                    return String(validating: bytes[start..<(at - 1)], as: UTF8.self)
                }
                if byte == UInt8(ascii: "\\") || byte < 0x20 { return nil }
                at += 1
            }
            return nil
        }

        /// A whole number as JSON writes it (no leading zero, no fraction or
        /// exponent) that fits an `Int`.
        mutating func integer() -> Int? {
            let negative = take(UInt8(ascii: "-"))
            let start = at
            var value = 0
            while at < bytes.count, bytes[at] >= 0x30, bytes[at] <= 0x39 {
                let digit = Int(bytes[at] - 0x30)
                let (times, overflowTimes) = value.multipliedReportingOverflow(by: 10)
                let (sum, overflowSum) = negative ? times.subtractingReportingOverflow(digit) : times.addingReportingOverflow(digit)
                guard !overflowTimes, !overflowSum else { return nil }
                value = sum
                at += 1
            }
            let digits = at - start
            guard digits > 0, !(digits > 1 && bytes[start] == 0x30) else { return nil }
            // A fraction or an exponent: the strict decoder's to judge.
            if at < bytes.count, bytes[at] == UInt8(ascii: ".") || bytes[at] == UInt8(ascii: "e") || bytes[at] == UInt8(ascii: "E") {
                return nil
            }
            return value
        }
    }
}

extension RulePush {
    /// A push's body: read by hand when it has the usual shape
    /// (`RulePushReader`), else by `ControlJSON.decodeStrict`.
    /// - Throws: `ControlMessageError` naming the field, as `decodeStrict` does.
    public static func decode(_ bytes: [UInt8]) throws(ControlMessageError) -> RulePush {
        if let push = RulePushReader.read(bytes) { return push }
        return try ControlJSON.decodeStrict(RulePush.self, from: bytes, allowed: fields)
    }
}
