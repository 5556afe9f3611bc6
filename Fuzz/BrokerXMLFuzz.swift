// libFuzzer entry point for the PCoIP broker protocol's XML reader and its
// request messages (issue 11): bytes from clients on the internet and from
// third-party brokers. Built and run by scripts/fuzz.
//
// Invariants beyond "no crash": a document that parses writes back to bytes
// that parse to the same tree, and a request that parses survives its own
// document.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzBrokerXML(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    let limits = BrokerXML.Limits(maxBytes: 4096, maxDepth: 12, maxElements: 256)
    do throws(BrokerXML.ParseError) {
        let tree = try BrokerXML.parse(bytes, limits: limits)
        let written = BrokerXML.serialize(tree)
        guard let again = try? BrokerXML.parse(written, limits: BrokerXML.Limits(maxBytes: 1 << 20, maxDepth: 12, maxElements: 256)),
              again == tree else {
            fatalError("a parsed document does not survive writing and reading back")
        }
    } catch {
        if error.reason.isEmpty { fatalError("an error without a reason") }
    }
    if let request = try? BrokerRequest.parse(bytes, limits: limits) {
        guard let again = try? BrokerRequest.parse(BrokerXML.serialize(request.document)), again == request else {
            fatalError("a request does not survive its own document: \(request.kind)")
        }
    }
    return 0
}
