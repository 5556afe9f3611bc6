import Foundation
import Synchronization
import SystemLayer
import TestSupport

/// The built `leostream-gateway` (next to the test bundle, or $GATEWAY_BINARY),
/// run as a child process (`ChildProcess`: output read to its end, waits
/// that poll up to a generous deadline).
enum GatewayProcess {
    static var binary: String { ChildProcess.builtBinary("leostream-gateway", override: "GATEWAY_BINARY") }

    /// Starts `leostream-gateway ARGS`, optionally under `prefix` (e.g. `prlimit` and its arguments).
    static func start(_ arguments: [String], prefix: [String] = []) throws -> ChildProcess {
        if prefix.isEmpty { return try ChildProcess(binary, arguments) }
        return try ChildProcess(prefix[0], Array(prefix.dropFirst()) + [binary] + arguments)
    }

    /// Runs the binary to completion.
    static func run(_ arguments: [String]) throws -> ChildProcess.Finished {
        try ChildProcess.run(binary, arguments)
    }
}

extension ChildProcess {
    /// The gateway logs to standard error.
    var log: String { stderr }

    /// Waits until the log contains `text` (false when the process exits first).
    @discardableResult
    func waitForLog(_ text: String) -> Bool { waitForOutput(text) }
}

/// A temporary folder for config files, removed by `cleanup()`.
struct TempDir {
    let path: String

    init() {
        path = NSTemporaryDirectory() + "gw-e2e-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func write(_ name: String, _ text: String) -> String {
        let file = path + "/" + name
        try? text.write(toFile: file, atomically: true, encoding: .utf8)
        return file
    }

    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
}

