import Foundation
import Synchronization
import SystemLayer

/// The built `leostream-gateway`, run as a child process with its stderr captured.
final class GatewayProcess: @unchecked Sendable {
    let process = Process()
    private let stderrPipe = Foundation.Pipe()
    private let stdoutPipe = Foundation.Pipe()
    private final class Captured: Sendable {
        let text = Mutex<String>("")
    }
    private let captured = Captured()

    /// The binary next to the test bundle (SwiftPM builds products and tests
    /// into the same folder), or $GATEWAY_BINARY.
    static var binary: String {
        if let path = ProcessInfo.processInfo.environment["GATEWAY_BINARY"] { return path }
        let bundle = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [bundle, bundle.deletingLastPathComponent()] {
            let path = candidate.appendingPathComponent("leostream-gateway").path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return bundle.appendingPathComponent("leostream-gateway").path
    }

    /// Starts `leostream-gateway ARGS`, optionally under `prlimit` arguments.
    init(_ arguments: [String], prefix: [String] = []) throws {
        if prefix.isEmpty {
            process.executableURL = URL(fileURLWithPath: GatewayProcess.binary)
            process.arguments = arguments
        } else {
            process.executableURL = URL(fileURLWithPath: prefix[0])
            process.arguments = Array(prefix.dropFirst()) + [GatewayProcess.binary] + arguments
        }
        process.standardError = stderrPipe
        process.standardOutput = stdoutPipe
        let captured = self.captured
        stderrPipe.fileHandleForReading.readabilityHandler = { handle in
            let data = handle.availableData
            if !data.isEmpty { captured.text.withLock { $0 += String(decoding: data, as: UTF8.self) } }
        }
        try process.run()
    }

    var log: String { captured.text.withLock { $0 } }
    var pid: Int32 { process.processIdentifier }

    /// Waits until the log contains `text`.
    @discardableResult
    func waitForLog(_ text: String, seconds: Double = 20) -> Bool {
        poll(seconds) { log.contains(text) || !process.isRunning } && log.contains(text)
    }

    func signal(_ signal: Int32) { kill(pid, signal) }

    /// Waits for the process to exit; returns its status or nil on timeout.
    func waitForExit(seconds: Double = 30) -> Int32? {
        guard poll(seconds, { !process.isRunning }) else { return nil }
        process.waitUntilExit()
        // Let the reader drain what is left.
        _ = poll(1) { false }
        return process.terminationStatus
    }

    /// CPU time (user + system) used so far, in clock ticks, from /proc/PID/stat.
    var cpuTicks: Int {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return -1 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // Fields after the command: state is [0]; utime is field 14 overall -> [11], stime [12].
        return (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
    }

    func stop() {
        if process.isRunning {
            kill(pid, SIGKILL)
            process.waitUntilExit()
        }
        stderrPipe.fileHandleForReading.readabilityHandler = nil
    }

    /// Runs the binary to completion and returns (status, stdout, stderr).
    static func run(_ arguments: [String]) throws -> (status: Int32, out: String, err: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        let out = Foundation.Pipe(), err = Foundation.Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        let errData = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self))
    }
}

/// Polls `condition` every 10 ms for up to `seconds`.
func poll(_ seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
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

func freePort() -> UInt16 {
    let fd = try! Socket.listen(on: SocketAddress("127.0.0.1:0")!, reusePort: false, backlog: 1)
    defer { fd.close() }
    return Socket.localAddress(fd)!.port
}

/// A loopback port free for both TCP and UDP at this moment.
func freeDualPort() -> UInt16 {
    for _ in 0..<100 {
        let udp = try! Socket.bindUDP(SocketAddress("127.0.0.1:0")!, reusePort: false)
        let port = Socket.localAddress(udp)!.port
        if let tcp = try? Socket.listen(on: SocketAddress(ip: .v4(0x7f00_0001), port: port), reusePort: false, backlog: 1) {
            tcp.close()
            udp.close()
            return port
        }
        udp.close()
    }
    fatalError("no port free for both TCP and UDP in 100 tries")
}
