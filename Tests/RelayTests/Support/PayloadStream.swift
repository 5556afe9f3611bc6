/// A deterministic byte stream (xorshift64*), so either end can check every
/// byte it receives without the other sending a copy of what it sent.
struct PayloadStream {
    private var state: UInt64
    private var word: UInt64 = 0
    private var left = 0

    init(seed: UInt64) { state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed }

    mutating func next() -> UInt8 {
        if left == 0 {
            state ^= state >> 12
            state ^= state << 25
            state ^= state >> 27
            word = state &* 0x2545_F491_4F6C_DD1D
            left = 8
        }
        let byte = UInt8(truncatingIfNeeded: word)
        word >>= 8
        left -= 1
        return byte
    }

    mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        for i in 0..<buffer.count { buffer[i] = next() }
    }

    /// Checks `bytes` against the next bytes of the stream.
    mutating func matches(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var ok = true
        for byte in bytes where byte != next() { ok = false }
        return ok
    }
}

/// The 32-byte header a test client sends first.
struct PayloadHeader {
    static let size = 32
    var index: UInt64
    var seed: UInt64
    var upLength: UInt64
    var downLength: UInt64

    var upSeed: UInt64 { seed ^ 0xA5A5_A5A5_5A5A_5A5A }
    var downSeed: UInt64 { seed &* 31 &+ 7 }

    var bytes: [UInt8] {
        var out: [UInt8] = []
        for value in [index, seed, upLength, downLength] {
            for shift in stride(from: 0, to: 64, by: 8) { out.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
        }
        return out
    }

    init(index: UInt64, seed: UInt64, upLength: UInt64, downLength: UInt64) {
        self.index = index
        self.seed = seed
        self.upLength = upLength
        self.downLength = downLength
    }

    init(_ raw: [UInt8]) {
        func word(_ i: Int) -> UInt64 {
            var v: UInt64 = 0
            for j in 0..<8 { v |= UInt64(raw[i * 8 + j]) << UInt64(8 * j) }
            return v
        }
        self.init(index: word(0), seed: word(1), upLength: word(2), downLength: word(3))
    }
}
