import ArgumentParser
import CertificateFiles
import ControlProtocol
import Foundation
import GatewayControl
import SystemLayer

extension GatewayCommand {
    /// `--broker`, `--gateway-id`, `--control-key-file`, `--port-range`:
    /// checks every value first (exit 2 naming the flag, nothing written),
    /// then stores them and signals a running daemon.
    func configure() throws {
        let directory = StateDirectory(global.stateDir)
        func fail(_ message: String) -> ExitCode {
            printError("error: \(message)")
            return ExitCode(2)
        }
        var stored: StoredSettings
        do { stored = try directory.loadSettings() } catch { throw fail("--state-dir: \(error)") }
        var broker: BrokerAddress?
        if let text = self.broker {
            do throws(ControlError) { broker = try BrokerAddress(text) } catch { throw fail(error.message) }
        }
        var id: Int?
        if let text = gatewayId {
            guard let n = Int(text.trimmingCharacters(in: .whitespaces)), n > 0, n <= Int(Int32.max) else {
                throw fail("--gateway-id: \"\(text)\" is not a positive whole number")
            }
            id = n
        }
        var key: ControlKey?
        if let file = controlKeyFile {
            let bytes: [UInt8]?
            do throws(Errno) { bytes = try StateFile.read(file, limit: 4096) } catch {
                throw fail("--control-key-file: cannot read \(file): \(error)")
            }
            guard let bytes else { throw fail("--control-key-file: \(file) does not exist") }
            do throws(ControlKeyError) { key = try ControlKey(text: String(decoding: bytes, as: UTF8.self)) } catch {
                throw fail("--control-key-file: \(file): \(error)")
            }
        }
        var range: PortRange?
        if let text = portRange {
            let parts = text.split(separator: "-", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2, let first = Int(parts[0]), let last = Int(parts[1]), first >= 1, first <= last, last <= 65535 else {
                throw fail("--port-range: \"\(text)\" is not FIRST-LAST with 1 <= FIRST <= LAST <= 65535 (e.g. 20001-22000)")
            }
            range = PortRange(first: first, last: last)
        }
        let storedKey: ControlKey?
        do { storedKey = try directory.loadKey() } catch { storedKey = nil }
        if broker == nil && (brokerCa != nil || brokerFingerprint != nil) {
            throw fail("\(brokerCa != nil ? "--broker-ca" : "--broker-fingerprint") goes with an https --broker")
        }
        if brokerCa != nil && brokerFingerprint != nil {
            throw fail("--broker-ca and --broker-fingerprint: give one (a CA to verify the broker's chain, or the hash of its certificate)")
        }
        // How an https broker is trusted, settled now (enrollment): a CA, a given hash, or the hash it presents now.
        var pin: String?
        var caPEM: String?
        if let broker, broker.tls {
            if let file = brokerCa {
                let bytes: [UInt8]?
                do throws(Errno) { bytes = try StateFile.read(file, limit: 1 << 20) } catch {
                    throw fail("--broker-ca: cannot read \(file): \(error)")
                }
                guard let bytes else { throw fail("--broker-ca: \(file) does not exist") }
                do throws(CertificateFiles.Problem) { try CertificateFiles.checkCACertificate(bytes, file: file) } catch {
                    throw fail("--broker-ca: \(error)")
                }
                caPEM = String(decoding: bytes, as: UTF8.self)
            } else if let text = brokerFingerprint {
                guard let hash = TLSClientSession.parseFingerprint(text) else {
                    throw fail("--broker-fingerprint: \"\(text)\" is not a SHA-256 hash (SHA256:AB:CD:... or 64 hex digits)")
                }
                pin = TLSClientSession.fingerprint(hash)
            } else {
                do throws(BlockingHTTP.Failure) {
                    pin = TLSClientSession.fingerprint(try BlockingHTTP.certificateHash(host: broker.host, port: broker.port))
                } catch {
                    throw fail("--broker: cannot reach \(broker) to pin its certificate (\(error)); start the broker first, or give --broker-fingerprint or --broker-ca")
                }
            }
        } else if broker != nil && (brokerCa != nil || brokerFingerprint != nil) {
            throw fail("\(brokerCa != nil ? "--broker-ca" : "--broker-fingerprint"): the broker \(broker!) is plain HTTP; give https://")
        }
        if broker != nil {
            guard id != nil || stored.gatewayID != nil else {
                throw fail("--broker needs --gateway-id N (the id the broker gave this gateway)")
            }
            guard key != nil || storedKey != nil else {
                throw fail("--broker needs --control-key-file FILE (the key from the broker's enrollment call)")
            }
        }

        if let broker {
            stored.broker = broker.url
            stored.brokerPin = pin
            stored.brokerCA = caPEM
        }
        if let id { stored.gatewayID = id }
        if let range { stored.portRange = range }
        do {
            if let key { try directory.saveKey(key) }
            if let caPEM { try StateFile.writeAtomically(directory.brokerCAPath, Array(caPEM.utf8), mode: 0o644, directoryOwner: true) }
            try directory.saveSettings(stored)
        } catch {
            printError("error: \(error)")
            throw ExitCode(1)
        }
        if let pin { print("pinned the broker's certificate \(pin); compare it with `openssl x509 -noout -fingerprint -sha256 -in CERT` on the broker") }
        if caPEM != nil { print("the broker's certificate must verify against \(brokerCa!) (copied to \(directory.brokerCAPath)) and name \(broker!.host)") }
        if let broker, !broker.tls { print("warning: the broker \(broker) is plain HTTP: registration and heartbeats cross the network in clear (signed)") }
        print("stored in \(directory.path): broker \(stored.broker ?? "not set"), gateway id \(stored.gatewayID.map(String.init) ?? "not set"), control key \(key != nil ? "replaced" : (storedKey != nil ? "kept" : "not set")), port range \(stored.portRange.map { "\($0.first)-\($0.last)" } ?? "20001-22000 (default)")")
        if let pid = directory.runningPID() {
            if ProcessSignal.send(.hangUp, to: pid) {
                print("sent SIGHUP to the running gateway (pid \(pid)): it picks the change up without a restart")
            } else {
                printError("warning: could not signal the running gateway (pid \(pid)); restart it to apply the change")
            }
        } else {
            print("no running gateway found (\(directory.pidPath)); the next `serve` uses these settings")
        }
    }

    /// `--status`.
    func printStatus() throws {
        let directory = StateDirectory(global.stateDir)
        let stored: StoredSettings
        do { stored = try directory.loadSettings() } catch {
            printError("error: \(error)")
            throw ExitCode(1)
        }
        let keyState: String
        do {
            if try directory.loadKey() != nil {
                let mode = StateFile.mode(directory.keyPath).map { String($0, radix: 8) } ?? "?"
                keyState = "stored (\(directory.keyPath), mode \(mode))"
            } else {
                keyState = "not set"
            }
        } catch {
            keyState = "unreadable (\(error))"
        }
        let range = stored.portRange ?? PortRange(first: 20001, last: 22000)
        var lines: [String] = []
        lines.append("state directory: \(directory.path)")
        lines.append("broker:          \(stored.broker ?? "not set")")
        lines.append("gateway id:      \(stored.gatewayID.map(String.init) ?? "not set")")
        lines.append("control key:     \(keyState)")
        lines.append("port range:      \(range.first)-\(range.last)")
        let now = ControlClock.unixSeconds()
        func ago(_ t: Int64?) -> String { t.map { "\(Self.timestamp($0)) (\(max(0, now - $0)) s ago)" } ?? "never" }
        let rules: [RuleState]
        if let pid = directory.runningPID(), let report = StatusReport.read(from: directory), report.pid == pid {
            lines.append("daemon:          running (pid \(pid), status of \(ago(report.updated)))")
            lines.append("registration:    \(report.registration.state)")
            if let url = report.registration.controlURL { lines.append("control url:     \(url)") }
            lines.append("last registered: \(ago(report.registration.lastRegistered))")
            lines.append("last heartbeat:  \(ago(report.registration.lastHeartbeat))")
            lines.append("last error:      \(report.registration.lastError ?? "none")")
            lines.append("sessions:        \(report.sessions)")
            lines.append("ports in use:    \(report.portsInUse.isEmpty ? "none" : report.portsInUse.joined(separator: ", "))")
            rules = report.rules
        } else {
            lines.append("daemon:          not running")
            lines.append("registration:    not registered (the daemon is not running)")
            rules = RuleStore(directory: directory.path).load(now: now).rules
        }
        lines.append("rules:           \(rules.count)")
        if !rules.isEmpty {
            lines.append("  ID                    PORT   PROTOCOL  METHOD  PATH       CLIENT           TARGET                 SESSIONS  KERNEL FLOWS/PACKETS/BYTES  CREATED")
            for rule in rules {
                func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
                let kernel = rule.kernel.map { "\($0.flows)/\($0.packets)/\($0.bytes)" + ($0.offloadedClients > 0 ? " (\($0.offloadedClients) offloaded)" : "") } ?? "-"
                lines.append("  " + pad(rule.id, 22) + pad("\(rule.port)", 7) + pad(rule.push.protocol.rawValue, 10)
                             + pad("\(rule.push.method.rawValue)", 8) + pad(rule.forwardingPath.rawValue, 11)
                             + pad(rule.push.clientIP ?? "anyone", 17)
                             + pad(rule.push.target, 23) + pad("\(rule.sessions)", 10) + pad(kernel, 28) + Self.timestamp(rule.created))
            }
        }
        print(lines.joined(separator: "\n"))
    }

    static func timestamp(_ t: Int64) -> String {
        let formatter = ISO8601DateFormatter()
        return formatter.string(from: Date(timeIntervalSince1970: TimeInterval(t)))
    }
}
