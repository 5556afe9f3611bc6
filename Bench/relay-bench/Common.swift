import Glibc
import SystemLayer

// Shared helpers: argv parsing, messages, clocks, /proc readings, percentiles.

/// Writes a line to stderr (Swift 6 forbids touching the C `stderr` global).
func note(_ message: String) {
    let line = "relay-bench: " + message + "\n"
    var bytes = Array(line.utf8)
    _ = bytes.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress, $0.count) }
}

/// Prints `message` and exits with status 2 (usage or setup error).
func fail(_ message: String) -> Never {
    note("error: " + message)
    exit(2)
}

@inline(__always)
func nowNs() -> UInt64 { MonotonicClock.nowNanoseconds }

/// `--key value` pairs parsed by hand. Every option takes a value.
struct Options {
    private var values: [String: String] = [:]

    init(_ arguments: ArraySlice<String>, allowed: Set<String>) {
        var it = arguments.makeIterator()
        while let key = it.next() {
            guard key.hasPrefix("--"), allowed.contains(String(key.dropFirst(2))) else {
                fail("unknown option \(key) (allowed: \(allowed.sorted().map { "--" + $0 }.joined(separator: " ")))")
            }
            guard let value = it.next() else { fail("\(key) needs a value") }
            values[String(key.dropFirst(2))] = value
        }
    }

    func string(_ key: String) -> String? { values[key] }

    func required(_ key: String) -> String {
        guard let value = values[key] else { fail("--\(key) is required") }
        return value
    }

    func int(_ key: String, default value: Int) -> Int {
        guard let text = values[key] else { return value }
        guard let number = Int(String(text.filter { $0 != "_" })), number >= 0 else {
            fail("--\(key) wants a non-negative integer, got \(text)")
        }
        return number
    }

    func double(_ key: String, default value: Double) -> Double {
        guard let text = values[key] else { return value }
        guard let number = Double(text), number >= 0 else { fail("--\(key) wants a non-negative number, got \(text)") }
        return number
    }

    func address(_ key: String) -> SocketAddress {
        let text = required(key)
        guard let address = SocketAddress(text) else { fail("--\(key): not a numeric HOST:PORT: \(text)") }
        return address
    }
}

/// Resident set size of a process in KiB (VmRSS from /proc/PID/status), or nil if it is gone.
func residentKiB(pid: Int32) -> Int? {
    guard let file = fopen("/proc/\(pid)/status", "r") else { return nil }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 512)
    while fgets(&line, Int32(line.count), file) != nil {
        let text = String(decoding: line.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if text.hasPrefix("VmRSS:") {
            let digits = text.dropFirst(6).filter(\.isNumber)
            return Int(digits)
        }
    }
    return nil
}

/// Summed VmRSS of `pids` in KiB; exits if one of them is gone (the measurement would be wrong).
func summedResidentKiB(_ pids: [Int32]) -> Int {
    var total = 0
    for pid in pids {
        guard let kib = residentKiB(pid: pid) else { fail("process \(pid) is gone (cannot read /proc/\(pid)/status)") }
        total += kib
    }
    return total
}

/// Number of descriptors a process holds (from /proc/PID/fd), or -1.
func openDescriptors(pid: Int32) -> Int {
    guard let dir = opendir("/proc/\(pid)/fd") else { return -1 }
    defer { closedir(dir) }
    var count = 0
    while readdir(dir) != nil { count += 1 }
    return count - 2
}

/// The p-th percentile (0...100) of sorted values, nearest-rank (zero when there are none).
func percentile<Value: Comparable & AdditiveArithmetic>(_ sorted: [Value], _ p: Double) -> Value {
    guard !sorted.isEmpty else { return .zero }
    let rank = Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1
    return sorted[max(0, min(sorted.count - 1, rank))]
}

/// Error counts by kind, printed as `kind:count,...`.
struct ErrorTally {
    private(set) var counts: [String: Int] = [:]
    var total: Int { counts.values.reduce(0, +) }

    mutating func add(_ kind: String, _ n: Int = 1) { counts[kind, default: 0] += n }

    mutating func merge(_ other: ErrorTally) {
        for (kind, n) in other.counts { add(kind, n) }
    }

    var summary: String {
        counts.isEmpty ? "none" : counts.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value)" }.joined(separator: ",")
    }
}

/// The byte the payload holds at `index`, so that echoed data can be checked cheaply.
@inline(__always)
func payloadByte(_ index: Int) -> UInt8 { UInt8(truncatingIfNeeded: index &* 31 &+ 7) }

func makePayload(_ size: Int) -> UnsafeMutableRawBufferPointer {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(size, 1), alignment: 16)
    for i in 0..<buffer.count { buffer[i] = payloadByte(i) }
    return buffer
}

/// Epoll token: a generation in the high half, a slot or descriptor in the low half.
@inline(__always)
func makeToken(index: Int, generation: UInt32) -> UInt64 {
    UInt64(generation) << 32 | UInt64(UInt32(truncatingIfNeeded: index))
}

/// A socket is closed and its slot left: the fd is removed from epoll by close(2).
@inline(__always)
func closeRaw(_ fd: Int32) { _ = Glibc.close(fd) }

/// Ignores SIGPIPE so that writing to a reset socket returns EPIPE.
func ignoreSigpipe() { _ = signal(SIGPIPE, SIG_IGN) }

/// Formats a double with `digits` decimals.
func fixed(_ value: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let rounded = (value * scale).rounded() / scale
    var text = String(rounded)
    if let dot = text.firstIndex(of: ".") {
        let decimals = text.distance(from: dot, to: text.endIndex) - 1
        if digits == 0 { text = String(text[..<dot]) } else if decimals < digits { text += String(repeating: "0", count: digits - decimals) }
    }
    return text
}
