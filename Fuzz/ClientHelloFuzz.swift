// libFuzzer entry point for the ClientHello reader (issue 5).
// Built and run by scripts/fuzz; a crash or a broken invariant is a failure.
#if canImport(TLSInspect)
import TLSInspect
#endif

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzClientHello(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let whole = ClientHelloReader.parse(bytes, maxBytes: 4096)
    // Fed in pieces, the reader must reach the same verdict as in one go.
    var reader = ClientHelloReader(maxBytes: 4096)
    var outcome = ClientHelloReader.Outcome.needMore
    var offset = 0
    var step = 1
    while offset < bytes.count {
        let end = min(bytes.count, offset + step)
        outcome = reader.feed(bytes[offset..<end])
        offset = end
        step = step % 7 + 1
    }
    if bytes.isEmpty { outcome = .needMore }
    if outcome != whole { fatalError("piecewise verdict \(outcome) differs from whole verdict \(whole)") }
    if case .complete(let hello) = whole {
        if hello.length > bytes.count { fatalError("length \(hello.length) beyond the input") }
        if let name = hello.serverName, name.isEmpty || name.utf8.count > 255 { fatalError("bad server name accepted") }
    }
    return 0
}
