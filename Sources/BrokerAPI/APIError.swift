import BrokerCore
import Foundation
import HTTPTypes
import Hummingbird

/// An error answered as `{"error": "<what was wrong, naming the field>"}` (and
/// `"field"` when one field is to blame), with its status code.
public struct APIError: Error, HTTPResponseError, Sendable, CustomStringConvertible {
    public var status: HTTPResponse.Status
    public var message: String
    public var field: String?
    /// Extra headers (`WWW-Authenticate` on a 401).
    public var headers: HTTPFields

    public init(_ status: HTTPResponse.Status, _ message: String, field: String? = nil, headers: HTTPFields = [:]) {
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers
    }

    /// 400 for a field: the message starts with the field's name.
    static func badField(_ field: String, _ message: String) -> APIError {
        APIError(.badRequest, "\(field): \(message)", field: field)
    }

    static func invalid(_ error: FieldError) -> APIError {
        APIError(.badRequest, error.description, field: error.field)
    }

    /// 401 with the challenge header RFC 6750 asks for.
    static func unauthorized(_ message: String) -> APIError {
        var headers = HTTPFields()
        headers[.wwwAuthenticate] = "Bearer realm=\"leostream-broker\""
        return APIError(.unauthorized, message, headers: headers)
    }

    /// The status code and message for a store failure.
    static func from(_ error: StoreError) -> APIError {
        switch error {
        case .invalid(let fieldError): invalid(fieldError)
        case .notFound(let message): APIError(.notFound, message)
        case .conflict(let field, let message): APIError(.conflict, "\(field): \(message)", field: field)
        case .inUse(let message): APIError(.conflict, message)
        case .unavailable(let message): APIError(.serviceUnavailable, message)
        }
    }

    public var description: String { "\(status.code) \(message)" }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var body: [String: JSONValue] = ["error": .string(message)]
        if let field { body["field"] = .string(field) }
        var response = Response.json(.object(body), status: status)
        response.headers.append(contentsOf: headers)
        return response
    }
}

extension Response {
    /// A JSON response with `value` as its body.
    static func json(_ value: JSONValue, status: HTTPResponse.Status = .ok) -> Response {
        var buffer = ByteBuffer()
        buffer.writeBytes(value.encoded())
        buffer.writeString("\n")
        return Response(status: status, headers: [.contentType: "application/json; charset=utf-8"],
                        body: .init(byteBuffer: buffer))
    }
}
