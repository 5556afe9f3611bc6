/// Why a control request or operation was refused, as the HTTP status the
/// broker gets, the field or flag it concerns and a message that names it.
/// Messages never hold the control key.
public struct ControlError: Error, Sendable, Equatable, CustomStringConvertible {
    public let status: Int
    public let field: String?
    public let message: String

    public init(_ status: Int, field: String? = nil, _ message: String) {
        self.status = status
        self.field = field
        self.message = message
    }

    public static func badField(_ field: String, _ why: String) -> ControlError {
        ControlError(400, field: field, "\(field): \(why)")
    }

    public var description: String { message }
}
