import EventLoop
import Foundation
import Logging
@testable import ServiceSupport
import Synchronization
import SystemLayer
import Testing
import TestSupport

/// Messages a heartbeat sent, as the service manager would receive them.
final class NotifyRecorder: Sendable {
    let messages = Mutex<[String]>([])
    var notifier: ServiceNotifier { ServiceNotifier { message in self.messages.withLock { $0.append(message) } } }
    var pings: Int { messages.withLock { $0.filter { $0 == "WATCHDOG=1" }.count } }
}

@Suite("Service support: watchdog, notify, log and metrics formats", .offPool)
struct ServiceSupportTests {
    @Test("WATCHDOG=1 goes out while every loop answers, stops while one is blocked, and resumes after")
    func watchdogFollowsTheLoops() throws {
        let group = try EventLoopGroup(count: 2, name: "wd-test")
        defer { group.shutdown() }
        let recorder = NotifyRecorder()
        let stalls = Mutex<[[String]]>([])
        let loops = group.loops.map { loop in
            ServiceHeartbeat.Loop(name: "loop \(loop.id)") { answer in loop.execute { _ in answer() } }
        }
        // 100 ms watchdog: a ping every 50 ms while all loops answer.
        let heartbeat = ServiceHeartbeat(loops: loops, watchdogMicroseconds: 100_000, notifier: recorder.notifier,
                                         status: { "2 loops" }, onStall: { late in stalls.withLock { $0.append(late) } })
        try heartbeat.start()
        defer { heartbeat.stop() }
        #expect(eventually { recorder.pings >= 3 }, "pings while the loops run")
        #expect(recorder.messages.withLock { $0.contains("STATUS=2 loops") })

        // Block loop 1 until released: the pings must stop and the stall be named.
        let release = Atomic<Bool>(false)
        let blocked = Atomic<Bool>(false)
        group.loops[1].execute { _ in
            blocked.store(true, ordering: .releasing)
            while !release.load(ordering: .acquiring) { BlockingWait.sleep(milliseconds: 1) }
        }
        #expect(eventually { blocked.load(ordering: .acquiring) })
        #expect(eventually { stalls.withLock { $0.contains(["loop 1"]) } }, "the stalled loop is named")
        // Once the stall is seen, no ping may go out for as long as the loop stays blocked.
        let before = recorder.pings
        var rounds = 0
        // Several watchdog periods (each round is 50 ms); counted by status lines, not by a sleep.
        let statusesAtStall = recorder.messages.withLock { $0.filter { $0.hasPrefix("STATUS=") }.count }
        #expect(eventually { recorder.messages.withLock { $0.filter { $0.hasPrefix("STATUS=") }.count } >= statusesAtStall + 5 })
        rounds = recorder.messages.withLock { $0.filter { $0.hasPrefix("STATUS=") }.count } - statusesAtStall
        #expect(rounds >= 5)
        #expect(recorder.pings == before, "no WATCHDOG=1 while loop 1 is blocked")

        release.store(true, ordering: .releasing)
        #expect(eventually { recorder.pings >= before + 2 }, "pings resume once the loop runs again")
    }

    @Test("notify messages: READY with STATUS, RELOADING with MONOTONIC_USEC, STOPPING; a status stays one line")
    func notifyMessages() {
        let recorder = NotifyRecorder()
        let notifier = recorder.notifier
        notifier.ready(status: "3 session(s)\nand more")
        notifier.reloading()
        notifier.reloaded(status: "ok")
        notifier.stopping(status: "draining")
        let sent = recorder.messages.withLock { $0 }
        #expect(sent[0] == "READY=1\nSTATUS=3 session(s) and more")
        #expect(sent[1].hasPrefix("RELOADING=1\nMONOTONIC_USEC="))
        #expect(UInt64(sent[1].split(separator: "=").last!) ?? 0 > 0)
        #expect(sent[2] == "READY=1\nSTATUS=ok")
        #expect(sent[3] == "STOPPING=1\nSTATUS=draining")
    }

    @Test("secret keys: the daemons' own fields are none; names holding a secret word are, in any case")
    func secretKeys() {
        for key in ServiceLogHandler.journalNames.keys {
            #expect(!ServiceLogHandler.isSecret(key), "\(key)")
        }
        for key in ["password", "control_key", "API_Token", "Authorization", "session_cookie", "db.secret"] {
            #expect(ServiceLogHandler.isSecret(key), "\(key)")
        }
    }

    @Test("journal fields: priority, identifier, the named fields, and no secret")
    func journalFields() {
        let fields = ServiceLogHandler.journalFields(
            label: "leostream-gateway", level: .warning, message: "refused",
            metadata: ["session": "s-1", "client": "203.0.113.9:5000", "target": "10.0.0.5:3389", "rule": "r7",
                       "reason": "not_allowed", "control_key": "SECRET", "password": "hunter2", "other.thing": "x"])
        let map = Dictionary(fields, uniquingKeysWith: { a, _ in a })
        #expect(map["MESSAGE"] == "refused")
        #expect(map["PRIORITY"] == "4")
        #expect(map["SYSLOG_IDENTIFIER"] == "leostream-gateway")
        #expect(map["SESSION_ID"] == "s-1")
        #expect(map["CLIENT"] == "203.0.113.9:5000")
        #expect(map["TARGET"] == "10.0.0.5:3389")
        #expect(map["RULE_ID"] == "r7")
        #expect(map["REASON"] == "not_allowed")
        #expect(map["OTHER_THING"] == "x")
        #expect(!fields.contains { $0.1.contains("SECRET") || $0.1.contains("hunter2") })
    }

    @Test("stderr line: one line per event, key=value quoted when needed, secrets left out")
    func stderrLine() {
        let line = ServiceLogHandler.line(label: "gw", level: .info, message: "two\nlines",
                                          metadata: ["rule": "a b", "token": "t0k3n", "client": "1.2.3.4:5"],
                                          now: Date(timeIntervalSince1970: 0))
        #expect(line == "1970-01-01T00:00:00.000Z info gw: two\\nlines client=1.2.3.4:5 rule=\"a b\"\n")
        #expect(line.filter { $0 == "\n" }.count == 1)
    }

    @Test("exposition text: HELP, TYPE, escaped labels, sanitized names")
    func expositionText() {
        var text = PrometheusText()
        text.family("relay_rule_bytes_total", .counter, help: "bytes\nper rule")
        text.sample("relay_rule_bytes_total", [("rule", "a\"b\\c"), ("direction", "to_target")], 42)
        text.single("relay_connections_active", .gauge, help: "open", 3)
        let rendered = String(decoding: text.bytes, as: UTF8.self)
        #expect(rendered == """
            # HELP relay_rule_bytes_total bytes\\nper rule
            # TYPE relay_rule_bytes_total counter
            relay_rule_bytes_total{rule="a\\"b\\\\c",direction="to_target"} 42
            # HELP relay_connections_active open
            # TYPE relay_connections_active gauge
            relay_connections_active 3

            """)
        #expect(PrometheusText.sanitize("hb.request.errors") == "hb_request_errors")
        #expect(PrometheusText.sanitize("9lives") == "_9lives")
    }

    @Test("the version line names the git commit")
    func version() {
        #expect(ProductVersion.line.hasPrefix(BuildInfo.version + " (commit "))
        #expect(!BuildInfo.commit.isEmpty)
    }
}
