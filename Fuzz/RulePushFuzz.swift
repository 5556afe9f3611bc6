// libFuzzer entry point for a rule push's body (issue 15): the hand reader
// (`RulePushReader`) against the strict decoder. Whatever the reader reads,
// the strict decoder must read the same; what it leaves, the strict decoder
// judges. A difference is a crash.
// Built and run by scripts/fuzz.
import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzRulePush(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    guard let read = RulePushReader.read(bytes) else { return 0 }
    let strict = try? ControlJSON.decodeStrict(RulePush.self, from: bytes, allowed: RulePush.fields)
    if strict != read {
        fatalError("the hand reader read \(read), the strict decoder \(strict.map { "\($0)" } ?? "a refusal")")
    }
    return 0
}
