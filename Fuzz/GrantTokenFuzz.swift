// libFuzzer entry point for the outside of a session grant (issue 5): the
// compact-JWT split, base64url, header JSON and the signed input, read before
// any cryptography.
// Built and run by scripts/fuzz.
import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzGrantToken(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    do {
        let token = try GrantToken(parsing: text)
        if token.algorithm.isEmpty || token.payload.isEmpty { fatalError("accepted an empty alg or payload") }
        // The signed input is the text up to the second dot, exactly.
        let bytes = Array(text.utf8)
        let input = token.signingInput
        if input.count >= bytes.count || bytes[input.count] != UInt8(ascii: ".") || Array(bytes[..<input.count]) != input
            || input.filter({ $0 == UInt8(ascii: ".") }).count != 1 {
            fatalError("the signed input is not the header and payload as sent")
        }
    } catch {
        if "\(error)".isEmpty { fatalError("an error without a reason") }
    }
    return 0
}
