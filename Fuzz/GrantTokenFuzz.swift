// libFuzzer entry point for the outside of a session grant (issue 5): the
// compact-JWT split, base64url and header JSON read before any cryptography.
// Built and run by scripts/fuzz.
import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzGrantToken(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    do {
        let token = try GrantToken(parsing: text)
        if token.algorithm.isEmpty || token.payload.isEmpty { fatalError("accepted an empty alg or payload") }
    } catch {
        if "\(error)".isEmpty { fatalError("an error without a reason") }
    }
    return 0
}
