import Foundation
import GatewayControl
import Logging
import Relay
import ServiceSupport
import SystemLayer

/// Hot upgrade (SIGUSR2), the wiring: the running gateway starts the binary
/// now at the path it was started from, with the same arguments and one
/// end of a socket pair as descriptor 3 (named by `descriptorVariable`),
/// and hands it every socket (`UpgradeHandoff`, `UpgradeTakeover`).
enum Upgrade {
    static let descriptorVariable = "LEOSTREAM_GATEWAY_UPGRADE_FD"
    /// The descriptor number the successor finds its end of the pair at.
    static let successorDescriptor: Int32 = 3

    /// The path this executable was started by, as it was at start: the
    /// file (or symlink) an operator replaces. argv[0] when it names a path
    /// (made absolute against the directory at start, symlinks kept, so a
    /// deployment that switches a symlink upgrades to its new target), else
    /// the first match on PATH, else /proc/self/exe (which names the old
    /// inode's path, "(deleted)" once replaced). Read once, at start
    /// (`Serve.run` touches it first thing).
    static let executablePath: String? = {
        let fm = FileManager.default
        if let first = CommandLine.arguments.first, !first.isEmpty {
            if first.hasPrefix("/") { return first }
            if first.contains("/") {
                let relative = first.hasPrefix("./") ? String(first.dropFirst(2)) : first
                return (fm.currentDirectoryPath as NSString).appendingPathComponent(relative)
            }
            for folder in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") where folder.hasPrefix("/") {
                let candidate = "\(folder)/\(first)"
                if fm.isExecutableFile(atPath: candidate) { return candidate }
            }
        }
        guard let path = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") else { return nil }
        return path.hasSuffix(" (deleted)") ? String(path.dropLast(" (deleted)".count)) : path
    }()

    /// The successor's end of the pair, when this process was started by a
    /// predecessor; the variable is removed so a later upgrade starts clean.
    static func successorChannel() -> UpgradeTakeover? {
        guard let text = getenv(descriptorVariable).map({ String(cString: $0) }) else { return nil }
        unsetenv(descriptorVariable)
        guard let raw = Int32(text), raw >= 0 else { return nil }
        let fd = FileDescriptor(rawValue: raw)
        // Ours alone from now on: not inherited by anything this process starts.
        _ = fcntl(raw, F_SETFD, FD_CLOEXEC)
        return UpgradeTakeover(channel: UpgradeChannel(socket: MessageSocket(fd: fd)))
    }

    /// Waits until `pid` (the predecessor) has exited (a zombie counts as
    /// exited), up to `seconds`: the service manager follows this process
    /// only from the predecessor's MAINPID= on, and drops notifications
    /// from another pid before that.
    /// - Returns: false when it was still running at the deadline.
    static func waitForExit(of pid: Int32, seconds: Int) -> Bool {
        BlockingWait.until(timeoutMilliseconds: seconds * 1000, everyMilliseconds: 20) {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
            // "pid (comm) S ...": the state follows the last ')'.
            guard let close = stat.lastIndex(of: ")") else { return false }
            return stat[stat.index(after: close)...].dropFirst().first == "Z"
        }
    }

    /// Starts the successor and hands everything to it.
    /// - Returns: the summary once the successor owns every socket (the
    ///   caller exits); throws with everything running as before otherwise.
    static func handOver(engine: RelayEngine, logger: Logger, stopControl: () -> Void,
                         restartControl: () -> Void) throws(UpgradeFailure) -> HandoverSummary {
        guard let path = executablePath else { throw UpgradeFailure("the path of this executable is unknown (/proc/self/exe)") }
        guard access(path, X_OK) == 0 else {
            throw UpgradeFailure("\(path) is not an executable file now: \(Errno.current)")
        }
        let ends: (MessageSocket, MessageSocket)
        do throws(Errno) { ends = try MessageSocket.pair() } catch {
            throw UpgradeFailure("cannot make the upgrade socket pair: \(error)")
        }
        var environment = ProcessInfo.processInfo.environment
        // Socket activation's descriptors are the relay's own by now; the
        // successor gets them through the handover, not again from systemd.
        for name in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] { environment[name] = nil }
        environment[descriptorVariable] = "\(successorDescriptor)"
        let pid: Int32
        do throws(Errno) {
            pid = try ChildProcessLauncher.spawn(path, arguments: CommandLine.arguments,
                                                 environment: environment.map { "\($0.key)=\($0.value)" },
                                                 passing: ends.1.fd, as: successorDescriptor)
        } catch {
            ends.0.close()
            ends.1.close()
            throw UpgradeFailure("cannot start \(path): \(error)")
        }
        ends.1.close()
        logger.notice("upgrade: started \(path) as pid \(pid)")
        let channel = UpgradeChannel(socket: ends.0) {
            ChildProcessLauncher.exitStatus(of: pid).map { "the new binary (pid \(pid)) exited with status \($0) before taking over" }
        }
        defer { ends.0.close() }
        do throws(UpgradeFailure) {
            return try UpgradeHandoff.run(channel, engine: engine, pid: SystemInfo.processID, version: gatewayVersion,
                                          stopControl: stopControl, restartControl: restartControl, logger: logger)
        } catch {
            // Nothing was handed: a successor still running must not serve too.
            var status: Int32?
            for attempt in 0..<150 {
                status = ChildProcessLauncher.exitStatus(of: pid)
                if status != nil { break }
                // It may be exiting on its own (it closed the socket): a moment, then kill.
                if attempt == 25 { kill(pid, SIGKILL) }
                BlockingWait.sleep(milliseconds: 20)
            }
            if let status, !error.message.contains("exited with status") {
                throw UpgradeFailure("\(error.message) (pid \(pid) \(status == 128 + SIGKILL ? "was killed" : "exited with status \(status)"))")
            }
            throw error
        }
    }
}
