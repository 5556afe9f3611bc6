import Foundation
import Glibc
import Synchronization
import SystemLayer

/// A program the tests run: the package's built binaries or a peer such as
/// `openssl`. Standard output and error are read to their end by threads of
/// their own (so a chatty child never blocks on a full pipe), and every wait
/// polls up to a deadline (`TestDeadline` by default) instead of sleeping.
public final class ChildProcess: @unchecked Sendable {
    public let process = Process()
    public let name: String
    private let input: Foundation.Pipe?
    private final class Captured: Sendable {
        let stdout = Mutex("")
        let stderr = Mutex("")
        let closedStreams = Atomic<Int>(0)
    }
    private let captured = Captured()

    /// The path of a product of this package: `$OVERRIDE` when set, else the
    /// file next to the test bundle (SwiftPM builds products and tests into
    /// one folder).
    public static func builtBinary(_ name: String, override: String? = nil) -> String {
        if let override, let path = ProcessInfo.processInfo.environment[override] { return path }
        let bundle = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [bundle, bundle.deletingLastPathComponent()] {
            let path = candidate.appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return bundle.appendingPathComponent(name).path
    }

    /// Starts `executable arguments`.
    /// - Parameters:
    ///   - environment: variables added to (or, with nil values, removed from) this process's.
    ///   - standardInput: give the child a pipe to write to (`write`, `closeInput`); else /dev/null.
    /// - Throws: when the program cannot be started.
    public init(_ executable: String, _ arguments: [String], environment: [String: String?] = [:],
                directory: String? = nil, standardInput: Bool = false) throws {
        name = URL(fileURLWithPath: executable).lastPathComponent
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if !environment.isEmpty {
            var env = ProcessInfo.processInfo.environment
            for (key, value) in environment { env[key] = value }
            process.environment = env
        }
        if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
        input = standardInput ? Foundation.Pipe() : nil
        process.standardInput = input ?? FileHandle.nullDevice
        let out = Foundation.Pipe(), err = Foundation.Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        // The child has its copies; ours must go, or the reader never sees the end.
        try? out.fileHandleForWriting.close()
        try? err.fileHandleForWriting.close()
        Self.drain(out.fileHandleForReading, into: captured, standardError: false)
        Self.drain(err.fileHandleForReading, into: captured, standardError: true)
    }

    /// Reads `handle` to its end on a thread of its own.
    private static func drain(_ handle: FileHandle, into captured: Captured, standardError: Bool) {
        let reader = Thread {
            while true {
                let data = handle.availableData
                if data.isEmpty { break }
                let text = String(decoding: data, as: UTF8.self)
                if standardError { captured.stderr.withLock { $0 += text } } else { captured.stdout.withLock { $0 += text } }
            }
            try? handle.close()
            captured.closedStreams.add(1, ordering: .releasing)
        }
        reader.name = "child-output"
        reader.start()
    }

    public var stdout: String { captured.stdout.withLock { $0 } }
    public var stderr: String { captured.stderr.withLock { $0 } }
    /// Both streams, standard output first.
    public var output: String { stdout + stderr }
    public var pid: Int32 { process.processIdentifier }
    public var isRunning: Bool { process.isRunning }

    /// Writes `text` to the child's standard input.
    public func write(_ text: String) {
        input?.fileHandleForWriting.write(Data(text.utf8))
    }

    /// Closes the child's standard input (end of file for it).
    public func closeInput() {
        try? input?.fileHandleForWriting.close()
    }

    /// Waits until `text` appears on standard error (or standard output, with
    /// `stdout: true`); gives up early when the child exits without it.
    /// - Returns: whether it appeared.
    @discardableResult
    public func waitForOutput(_ text: String, stdout onStdout: Bool = false, within seconds: Double = TestDeadline.seconds) -> Bool {
        let seen = { (onStdout ? self.stdout : self.stderr).contains(text) }
        _ = eventually(seconds) { seen() || !self.process.isRunning }
        if !seen() && !process.isRunning {
            // It exited: what it wrote last may still be in the pipe.
            _ = eventually(seconds) { self.captured.closedStreams.load(ordering: .acquiring) == 2 }
        }
        return seen()
    }

    /// Waits for the child to exit and for its output to be read to the end.
    /// - Returns: its exit status (128 + N for a signal), or nil when it is still running at the deadline.
    public func waitForExit(within seconds: Double = TestDeadline.seconds) -> Int32? {
        guard eventually(seconds, { !process.isRunning }) else { return nil }
        process.waitUntilExit()
        // A grandchild holding the pipes open would keep them from ending: bounded.
        _ = eventually(seconds) { self.captured.closedStreams.load(ordering: .acquiring) == 2 }
        return process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
    }

    /// Sends `signal` to the child.
    public func signal(_ signal: Int32) {
        if process.isRunning { kill(pid, signal) }
    }

    /// Kills the child (SIGKILL) if it still runs, and reaps it.
    public func stop() {
        closeInput()
        if process.isRunning {
            kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }

    /// CPU time (user + system) the child used so far, in clock ticks, from /proc/PID/stat.
    public var cpuTicks: Int {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return -1 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // Fields after the command: state is [0]; utime is field 14 overall -> [11], stime [12].
        return (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
    }

    /// What a program that ran to its end left.
    public struct Finished: Sendable, CustomStringConvertible {
        public let status: Int32
        public let stdout: String
        public let stderr: String
        public var description: String { "exit \(status)\nstdout: \(stdout)\nstderr: \(stderr)" }
    }

    /// Runs `executable arguments` to its end.
    /// - Throws: when it cannot start, or `TimedOut` when it is still running at the deadline (it is killed).
    public static func run(_ executable: String, _ arguments: [String], environment: [String: String?] = [:],
                           directory: String? = nil, within seconds: Double = TestDeadline.seconds) throws -> Finished {
        let child = try ChildProcess(executable, arguments, environment: environment, directory: directory)
        guard let status = child.waitForExit(within: seconds) else {
            child.stop()
            throw TimedOut("\(child.name) \(arguments.joined(separator: " ")) to exit", seconds: seconds)
        }
        return Finished(status: status, stdout: child.stdout, stderr: child.stderr)
    }
}
