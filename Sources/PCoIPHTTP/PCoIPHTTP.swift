import HTTPTypes
import Hummingbird
import NIOCore
import PCoIPBrokerProtocol

/// The HTTP side of the PCoIP broker protocol, shared by the broker core and
/// the Connection Manager: reading a bounded body, the `JSESSIONID` cookie,
/// and answers as real PCoIP clients expect them (chunked transfer encoding,
/// `application/xml`, the cookie set with a header spelled `Set-Cookie`).
public enum PCoIPHTTP {
    /// The largest request body read (the messages are a few hundred bytes).
    public static let maxBodyBytes = 64 * 1024

    /// The body, at most `maxBodyBytes`; nil when it is larger or cannot be read.
    public static func body(_ request: inout Request) async -> [UInt8]? {
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > maxBodyBytes { return nil }
        guard let buffer = try? await request.collectBody(upTo: maxBodyBytes) else { return nil }
        return Array(buffer.readableBytesView)
    }

    /// The value of cookie `name` in the request's `Cookie` headers.
    public static func cookie(_ name: String, in headers: HTTPFields) -> String? {
        for field in headers[values: .cookie] {
            for pair in field.split(separator: ";") {
                let trimmed = pair.drop { $0 == " " }
                guard let equals = trimmed.firstIndex(of: "=") else { continue }
                if trimmed[..<equals] == name {
                    let value = trimmed[trimmed.index(after: equals)...]
                    return value.isEmpty ? nil : String(value)
                }
            }
        }
        return nil
    }

    /// A `Set-Cookie` value for the session cookie (`nil` value: clears it).
    public static func sessionCookie(_ value: String?, path: String = "/pcoip-broker", secure: Bool) -> String {
        var cookie = "\(PCoIPBroker.cookieName)=\(value ?? "")" + "; Path=\(path); HttpOnly"
        if secure { cookie += "; Secure" }
        if value == nil { cookie += "; Max-Age=0" }
        return cookie
    }

    /// An answer document as HTTP 200 with a chunked body.
    /// - Parameter setCookie: a full `Set-Cookie` value, or nil for none.
    public static func answer(_ document: BrokerXML.Element, setCookie: String?) -> Response {
        answer(bytes: BrokerXML.serialize(document), setCookie: setCookie)
    }

    public static func answer(bytes: [UInt8], setCookie: String?) -> Response {
        var headers: HTTPFields = [.contentType: PCoIPBroker.contentType, .cacheControl: "no-store"]
        if let setCookie { headers[.setCookie] = setCookie }
        // No Content-Length: HTTP/1.1 then sends the body in chunks, as PCoIP clients expect.
        let body = ResponseBody { writer in
            try await writer.write(ByteBuffer(bytes: bytes))
            try await writer.finish(nil)
        }
        return Response(status: .ok, headers: headers, body: body)
    }
}
