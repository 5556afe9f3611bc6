import CertificateFiles
import ConnectionManager
import Foundation
import SystemLayer

/// The smaller steps of `CMSGSetup`: questions, file checks, services.
extension CMSGSetup {
    // MARK: Questions

    /// A yes/no question on the terminal. - Throws: `.usage` naming `flag` when there is no terminal.
    static func confirm(_ env: SetupEnvironment, _ question: String, flag: String) throws(SetupError) -> Bool {
        guard let answer = env.ask("\(question) [y/N] ") else {
            throw .usage("\(flag) is required (no terminal to ask on); nothing was changed")
        }
        return ["y", "yes"].contains(answer.trimmingSpaces().lowercased())
    }

    /// A required value asked on the terminal. - Throws: `.usage` naming `flag` when there is none.
    static func required(_ env: SetupEnvironment, _ question: String, flag: String) throws(SetupError) -> String {
        guard let answer = env.ask("\(question) (\(flag)): ")?.trimmingSpaces(), !answer.isEmpty else {
            throw .usage("\(flag) is required; nothing was changed")
        }
        return answer
    }

    static func number(_ flags: SetupFlags, _ name: String, _ range: ClosedRange<Int>) throws(SetupError) -> Int? {
        guard let text = flags.string(name) else { return nil }
        guard let value = Int(text), range.contains(value) else {
            throw .usage("--\(name): \"\(text)\" is not a number \(range.lowerBound)-\(range.upperBound)")
        }
        return value
    }

    static func externalGateways(_ flags: SetupFlags) throws(SetupError) -> [String] {
        let given = flags.list("external-sg-ip")
        for item in given where SecurityGatewayAddress(item) == nil {
            throw .usage("--external-sg-ip: \"\(item)\" is not PUBLIC_IP[:PORT][@CONTROL_HOST:PORT]")
        }
        return given
    }

    /// The names and addresses the client listener's certificate is for.
    static func hostAddresses(_ flags: SetupFlags, _ env: SetupEnvironment) -> [String] {
        var names: [String] = []
        if let host = flags.string("host-address") { names.append(host) }
        names += flags.list("external-pcoip-ip")
        names.append(env.hostName)
        var seen = Set<String>()
        return names.filter { seen.insert($0).inserted }
    }

    // MARK: Files

    static func readFile(_ path: String, flag: String) throws(SetupError) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw .usage("\(flag) \(path): cannot be read; nothing was changed")
        }
        return Array(data)
    }

    static func readCA(_ path: String) throws(SetupError) -> [UInt8] {
        let pem = try readFile(path, flag: "--ca-cert")
        do throws(CertificateFiles.Problem) { try CertificateFiles.checkCACertificate(pem, file: path) } catch {
            throw .usage("--ca-cert \(error); nothing was changed")
        }
        return pem
    }

    /// The client listener's certificate: the given pair (checked as HP
    /// requires), or a new self-signed RSA 3072 one.
    static func serverCertificate(_ flags: SetupFlags, _ env: SetupEnvironment, hostAddresses: [String],
                                  interactive: Bool = true) throws(SetupError) -> (certificate: [UInt8], key: [UInt8], generated: Bool) {
        let certPath = flags.string("ssl-cert"), keyPath = flags.string("ssl-key")
        switch (certPath, keyPath) {
        case (let cert?, let key?):
            if flags.flag("self-signed") == true { throw .usage("--self-signed and --ssl-cert: give one or the other") }
            let certPEM = try readFile(cert, flag: "--ssl-cert"), keyPEM = try readFile(key, flag: "--ssl-key")
            do throws(CertificateFiles.Problem) {
                try CertificateFiles.checkServerPair(certificate: certPEM, certificateFile: cert, key: keyPEM, keyFile: key)
            } catch {
                let flag = error.file == key ? "--ssl-key" : "--ssl-cert"
                throw .usage("\(flag) \(error); nothing was changed")
            }
            return (certPEM, keyPEM, false)
        case (_?, nil): throw .usage("--ssl-cert needs --ssl-key (the certificate's private key)")
        case (nil, _?): throw .usage("--ssl-key needs --ssl-cert")
        case (nil, nil):
            var selfSigned = flags.flag("self-signed")
            if selfSigned == nil && interactive {
                selfSigned = try confirm(env, "No --ssl-cert/--ssl-key given: make a self-signed certificate?", flag: "--self-signed or --ssl-cert with --ssl-key")
            }
            guard selfSigned == true else {
                throw .usage("--self-signed=true, or --ssl-cert with --ssl-key, is required for the Connection Manager; nothing was changed")
            }
            do throws(CertificateFiles.Problem) {
                // Its own trust anchor (CA:TRUE): the Connection Manager trusts it
                // for the Security Gateway's control endpoint too (issue 14).
                let made = try CertificateFiles.makeSelfSigned(commonName: hostAddresses.first ?? env.hostName,
                                                               subjectAltNames: hostAddresses, bits: 3072, ownTrustAnchor: true)
                env.print("made a self-signed RSA 3072 certificate for \(hostAddresses.joined(separator: ", "))")
                return (Array(made.certificate.utf8), Array(made.key.utf8), true)
            } catch {
                throw .failed("\(error)")
            }
        }
    }

    /// At least 100 MiB free where the data goes (HP's tool checks the disk
    /// too; `--ignore-disk-req` skips it).
    static func checkDisk(_ root: String) throws(SetupError) {
        var folder = URL(fileURLWithPath: root)
        while !FileManager.default.fileExists(atPath: folder.path) && folder.path != "/" { folder.deleteLastPathComponent() }
        guard let attributes = try? FileManager.default.attributesOfFileSystem(forPath: folder.path),
              let free = (attributes[.systemFreeSize] as? NSNumber)?.int64Value else { return }
        if free < 100 << 20 {
            throw .failed("\(folder.path): only \(free >> 20) MiB free, at least 100 MiB are required (--ignore-disk-req skips this check); nothing was changed")
        }
    }

    // MARK: Services

    /// The command lines of the two daemons.
    static func commandLines(_ plan: Plan, _ env: SetupEnvironment) -> [(service: String, arguments: [String])] {
        var lines: [(String, [String])] = []
        if plan.sgEnabled {
            lines.append((sgService, [env.binDirectory + "/pcoip-security-gateway", "serve", "--config", plan.layout.sgConfig,
                                      "--data-dir", plan.layout.sgData, "--pid-file", plan.layout.sgPID]))
        }
        if plan.cmEnabled {
            lines.append((cmService, [env.binDirectory + "/pcoip-connection-manager", "serve", "--config", plan.layout.cmConfig,
                                      "--pid-file", plan.layout.cmPID]))
        }
        return lines
    }

    /// A systemd unit for one daemon: READY=1 and watchdog pings through
    /// sd_notify (Type=notify, WatchdogSec), reload by SIGHUP, hardened.
    static func unit(_ service: String, _ arguments: [String], _ plan: Plan) -> String {
        let description = service == cmService ? "PCoIP Connection Manager" : "PCoIP Security Gateway"
        let capabilities = service == cmService ? "CAP_NET_BIND_SERVICE" : "CAP_NET_BIND_SERVICE"
        return """
            [Unit]
            Description=\(description) (remote-desktop gateway)
            After=network-online.target
            Wants=network-online.target

            [Service]
            Type=notify
            NotifyAccess=main
            WatchdogSec=30s
            ExecStart=\(arguments.joined(separator: " "))
            ExecReload=/bin/kill -HUP $MAINPID
            Restart=on-failure
            LimitNOFILE=1048576
            AmbientCapabilities=\(capabilities)
            CapabilityBoundingSet=\(capabilities)
            NoNewPrivileges=true
            ProtectSystem=strict
            ProtectHome=true
            PrivateTmp=true
            ReadWritePaths=\(plan.layout.root)

            [Install]
            WantedBy=multi-user.target

            """
    }

    /// Installs and starts the services under systemd, or says how to start them.
    static func services(_ plan: Plan, _ env: SetupEnvironment, start: Bool) throws(SetupError) {
        let lines = commandLines(plan, env)
        guard env.systemdRunning else {
            env.print("systemd is not running here: start the services with")
            for (_, arguments) in lines { env.print("  " + arguments.joined(separator: " ")) }
            env.print("(send SIGHUP to reload after `pcoip-cmsg-setup configure`; SIGTERM to stop)")
            return
        }
        for (service, arguments) in lines {
            let path = env.systemdDirectory + "/\(service).service"
            do throws(Errno) { try StateFile.writeAtomically(path, Array(unit(service, arguments, plan).utf8), mode: 0o644) } catch {
                throw .failed("cannot write \(path): \(error)")
            }
            env.print("  wrote \(path)")
        }
        _ = runTool("/bin/systemctl", ["daemon-reload"])
        guard start else { return }
        for (service, _) in lines {
            let result = runTool("/bin/systemctl", ["enable", "--now", service])
            guard result.status == 0 else { throw .failed("systemctl enable --now \(service) failed: \(result.output)") }
            env.print("started the \(service) service")
        }
    }

    /// Asks the running daemons to re-read their configs (SIGHUP: no session is dropped).
    static func reload(_ layout: Layout, _ env: SetupEnvironment, cm: Bool, sg: Bool) throws(SetupError) {
        for (changed, service, pidFile) in [(sg, sgService, layout.sgPID), (cm, cmService, layout.cmPID)] where changed {
            if env.systemdRunning, FileManager.default.fileExists(atPath: env.systemdDirectory + "/\(service).service") {
                let result = runTool("/bin/systemctl", ["reload", service])
                env.print(result.status == 0 ? "reloaded the \(service) service" : "warning: systemctl reload \(service): \(result.output)")
            } else if let pid = runningPID(pidFile) {
                _ = ProcessSignal.send(.hangUp, to: pid)
                env.print("sent SIGHUP to \(service) (pid \(pid)): it re-reads its config without dropping a session")
            } else {
                env.print("\(service) is not running: the change applies when it starts")
            }
        }
    }

    static func serviceState(_ service: String, pidFile: String, _ env: SetupEnvironment) -> String {
        if env.systemdRunning, FileManager.default.fileExists(atPath: env.systemdDirectory + "/\(service).service") {
            return "systemd service \(runTool("/bin/systemctl", ["is-active", service]).output.trimmingSpaces())"
        }
        if let pid = runningPID(pidFile) { return "running (pid \(pid))" }
        return "not running"
    }

    /// The pid in `pidFile` when that process is alive.
    static func runningPID(_ pidFile: String) -> Int32? {
        guard let data = FileManager.default.contents(atPath: pidFile),
              let pid = Int32(String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)),
              ProcessSignal.processExists(pid) else { return nil }
        return pid
    }

    static func waitGone(_ pid: Int32, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if !ProcessSignal.processExists(pid) { return true }
            BlockingWait.sleep(milliseconds: 50)
        }
        return !ProcessSignal.processExists(pid)
    }

    /// Runs a system tool to its end: its exit status and output.
    static func runTool(_ path: String, _ arguments: [String]) -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        do { try process.run() } catch { return (127, "\(error)") }
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: output, as: UTF8.self))
    }
}
