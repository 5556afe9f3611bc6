import Testing
import GatewayConfig
import Relay
import SystemLayer
import TestSupport

@Suite("Config parser", .offPool)
struct ConfigParserTests {
    @Test("a full config parses into settings and forwards")
    func full() throws {
        let config = try ConfigParser.parse("""
            # comment
            loops = 3
            max_connections = 500   # trailing comment
            max_connections_per_listener = 50
            connect_timeout = 1500ms
            drain_timeout = 2m
            keepalive_idle = 30s
            keepalive_interval = 5s
            keepalive_count = 4
            user_timeout = off
            pipe_size = 64k
            max_pipes = 16
            log_level = DEBUG

            [forward rdp-1]
            listen = 0.0.0.0:20001
            target = 10.1.2.3:3389
            allow = 203.0.113.0/24, 198.51.100.7
            idle_timeout = 1h
            max_connections = 2

            [forward ssh]
            listen = [::1]:2222
            target = localhost:22
            """, file: "gw.conf")
        #expect(config.settings.loops == 3)
        #expect(config.settings.maxConnections == 500)
        #expect(config.settings.maxConnectionsPerListener == 50)
        #expect(config.settings.connectTimeoutNanoseconds == 1_500_000_000)
        #expect(config.drainTimeoutNanoseconds == 120_000_000_000)
        #expect(config.settings.liveness == Liveness(keepaliveIdle: 30, keepaliveInterval: 5, keepaliveCount: 4, userTimeoutMilliseconds: 0))
        #expect(config.settings.pipeSize == 65536 && config.settings.maxPipes == 16)
        #expect(config.logLevel == "debug")
        #expect(config.rules.count == 2)
        let rdp = config.rules[0]
        #expect(rdp.id == "rdp-1" && rdp.listen == SocketAddress("0.0.0.0:20001") && rdp.target == SocketAddress("10.1.2.3:3389"))
        #expect(rdp.allow == [CIDR("203.0.113.0/24")!, CIDR("198.51.100.7/32")!])
        #expect(rdp.idleTimeoutNanoseconds == 3_600_000_000_000 && rdp.maxConnections == 2)
        #expect(config.rules[1].listen.ip == IPAddress("::1"))
        #expect(config.rules[1].idleTimeoutNanoseconds == nil)
    }

    @Test("udp forwards: protocol, flow limits, idle time, source ports and buffers")
    func udp() throws {
        let config = try ConfigParser.parse("""
            max_flows = 2000
            max_flows_per_listener = 300
            udp_receive_buffer = 4m
            udp_send_buffer = 1m

            [forward pcoip-tcp]
            listen = 0.0.0.0:4172
            target = 10.0.0.5:4172

            [forward pcoip-udp]
            listen = 0.0.0.0:4172
            target = 10.0.0.5:4172
            protocol = udp
            udp_idle_timeout = 30s
            max_flows = 100
            source_ports = 55000-55009

            [forward nx]
            listen = 127.0.0.1:4000
            target = 10.0.0.6:4000
            protocol = tcp+udp
            source_ports = 55000
            """, file: "gw.conf")
        #expect(config.settings.maxFlows == 2000 && config.settings.maxFlowsPerListener == 300)
        #expect(config.settings.udpReceiveBuffer == 4 << 20 && config.settings.udpSendBuffer == 1 << 20)
        #expect(config.rules.map(\.transport) == [.tcp, .udp, .both])
        let udp = config.rules[1]
        #expect(udp.udpIdleTimeoutNanoseconds == 30_000_000_000 && udp.maxFlows == 100 && udp.sourcePorts == 55000...55009)
        #expect(config.rules[0].udpIdleTimeoutNanoseconds == 120_000_000_000 && config.rules[0].sourcePorts == nil)
        #expect(config.rules[2].sourcePorts == 55000...55000)
    }

    @Test("defaults: no idle timeout, keepalive on, 5 s connect timeout")
    func defaults() throws {
        let config = try ConfigParser.parse("[forward a]\nlisten = 127.0.0.1:1000\ntarget = 127.0.0.1:2000\n")
        #expect(config.rules[0].idleTimeoutNanoseconds == nil)
        #expect(config.settings.connectTimeoutNanoseconds == 5_000_000_000)
        #expect(config.settings.liveness.keepaliveIdle == 60)
        #expect(config.settings.liveness.userTimeoutMilliseconds == 120_000)
    }

    @Test("every error names the file, the line and the field",
          arguments: [
            ("loops = 0", 1, "loops"),
            ("loops = 2\nloops = 3", 2, "set twice"),
            ("connect_timeout = 5", 1, "connect_timeout"),
            ("connect_timeout = off", 1, "connect_timeout"),
            ("pipe_size = 2g", 1, "pipe_size"),
            ("log_level = loud", 1, "log_level"),
            ("just words", 1, "expected `key = value`"),
            ("= 4", 1, "missing key"),
            ("loops =", 1, "missing value"),
            ("[forward]", 1, "expected [forward NAME]"),
            ("[forward a b]", 1, "expected [forward NAME]"),
            ("[forward a/b]", 1, "may hold only"),
            ("[forward a", 1, "must end with"),
            ("[forward a]\ntarget = 127.0.0.1:1", 1, "needs `listen"),
            ("[forward a]\nlisten = 127.0.0.1:0\ntarget = 127.0.0.1:1", 2, "port must be 1-65535"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1", 3, "target"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = no-such-host.invalid:1", 3, "cannot resolve"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nidle_timeout = soon", 4, "idle_timeout"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nmax_connections = 0", 4, "max_connections"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nlisten = 127.0.0.1:3", 4, "set twice"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\n[forward b]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:3", 4, "both listen on"),
            ("[forward a]\nlisten = 0.0.0.0:1\ntarget = 127.0.0.1:2\n[forward b]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:3", 4, "both listen on"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nprotocol = sctp", 4, "protocol: \"sctp\" is not tcp, udp or tcp+udp"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nsource_ports = 55000", 4, "source_ports applies to udp forwards only"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nprotocol = udp\nsource_ports = 9-1", 5, "source_ports"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nprotocol = udp\nsource_ports = 0", 5, "source_ports"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nprotocol = udp\nsource_ports = 70000", 5, "source_ports"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nudp_idle_timeout = 10s", 4, "udp_idle_timeout applies to udp forwards only"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nprotocol = udp\nudp_idle_timeout = 0s", 5, "udp_idle_timeout"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nprotocol = udp\nmax_flows = 0", 5, "max_flows"),
            ("max_flows = -1", 1, "max_flows"),
            ("udp_receive_buffer = 1g", 1, "udp_receive_buffer"),
            ("[forward a]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:2\nprotocol = udp\n[forward b]\nlisten = 127.0.0.1:1\ntarget = 127.0.0.1:3\nprotocol = tcp+udp", 5, "both listen on"),
            ("forwarding = fast", 1, "forwarding: \"fast\" is not one of userspace, kernel, offload"),
            ("kernel_path = maybe", 1, "kernel_path"),
            ("loops = 2\nrules_sync = sometimes", 2, "rules_sync: \"sometimes\" is not one of each_change, background"),
            ("rules_sync = background\nrules_sync = each_change", 2, "rules_sync is set twice"),
            ("kernel_table = a.b", 1, "kernel_table"),
            ("forwarding = kernel\nkernel_path = off", 1, "kernel_path is off (line 2)"),
            ("kernel_path = on", 1, "sets no control_listen"),
            ("control_listen = 10.0.0.2:19010\nkernel_path = on", 2, "public_address: the kernel path needs"),
            ("control_listen = 10.0.0.2:19010\npublic_address = 0.0.0.0\nforwarding = offload", 2, "public_address: the kernel path needs"),
            ("control_listen = 10.0.0.2:19010\npublic_address = 2001:db8::1\nkernel_path = on", 2, "IPv4"),
          ])
    func errors(text: String, line: Int, fragment: String) {
        #expect {
            try ConfigParser.parse(text, file: "gw.conf")
        } throws: { error in
            guard let error = error as? ConfigError else { return false }
            return error.file == "gw.conf" && error.line == line && error.description.contains(fragment)
                && error.description.hasPrefix("gw.conf:\(line): ")
        }
    }

    @Test("rules_sync: each_change by default, background when asked (either case)")
    func rulesSync() throws {
        #expect(try ConfigParser.parse("loops = 1\n").rulesSync == .eachChange)
        #expect(try ConfigParser.parse("rules_sync = background\n").rulesSync == .background)
        #expect(try ConfigParser.parse("rules_sync = Each_Change\n").rulesSync == .eachChange)
    }

    @Test("the kernel path: forwarding turns it on, kernel_table names the table, userspace stays the default")
    func kernelPath() throws {
        let plain = try ConfigParser.parse("control_listen = 10.0.0.2:19010\npublic_address = 203.0.113.5\n")
        #expect(plain.forwarding == .userspace && !plain.kernelPath && plain.kernelTable == "leostream_gateway")
        let kernel = try ConfigParser.parse("control_listen = 10.0.0.2:19010\npublic_address = 203.0.113.5\nforwarding = offload\nkernel_table = gw_1\n")
        #expect(kernel.forwarding == .offload && kernel.kernelPath && kernel.kernelTable == "gw_1")
        let perRule = try ConfigParser.parse("control_listen = 10.0.0.2:19010\npublic_address = 203.0.113.5\nkernel_path = on\n")
        #expect(perRule.forwarding == .userspace && perRule.kernelPath, "kernel_path = on alone lets the broker ask per rule")
    }

    @Test("an unreadable file is named")
    func missingFile() {
        #expect {
            try ConfigParser.load(path: "/nonexistent/gw.conf")
        } throws: { error in
            "\(error)".hasPrefix("/nonexistent/gw.conf: cannot read the file")
        }
    }

    @Test("control-plane keys parse, and bad values name the key and line")
    func controlPlaneKeys() throws {
        let config = try ConfigParser.parse("""
            public_address = 203.0.113.5
            desktop_networks = 10.1.0.0/16, 10.2.3.4
            control_listen = 10.0.0.2:19010
            control_url = https://gw.internal:19010
            broker_forward_listen = 0.0.0.0:443
            gateway_signature = leo-gw-1
            metrics_listen = 127.0.0.1:9110
            """, file: "gw.conf")
        #expect(config.metricsListen == SocketAddress("127.0.0.1:9110"))
        #expect(config.publicAddress == IPAddress("203.0.113.5"))
        #expect(config.desktopNetworks == [CIDR("10.1.0.0/16")!, CIDR("10.2.3.4/32")!])
        #expect(config.controlListen == SocketAddress("10.0.0.2:19010"))
        #expect(config.controlURL == "https://gw.internal:19010")
        #expect(!config.controlPlainHTTP && config.controlTLSCertificate == nil)
        #expect(config.brokerForwardListen == SocketAddress("0.0.0.0:443"))
        #expect(config.gatewaySignature == "leo-gw-1")
        let defaults = try ConfigParser.parse("")
        #expect(defaults.publicAddress == IPAddress("0.0.0.0"))
        #expect(defaults.desktopNetworks.isEmpty)
        #expect(defaults.controlListen == nil)
        #expect(defaults.metricsListen == nil)

        for (text, message) in [
            ("public_address = gateway.example", "public_address:"),
            ("desktop_networks = 10.0.0.0/8, 10.300.0.0/16", "desktop_networks: \"10.300.0.0/16\""),
            ("control_listen = 10.0.0.2", "control_listen:"),
            ("control_url = ftp://x", "control_url:"),
            ("broker_forward_listen = 0.0.0.0:0", "broker_forward_listen:"),
            ("metrics_listen = localhost:9110", "metrics_listen:"),
            ("gateway_signature = " + String(repeating: "s", count: 101), "gateway_signature:"),
            ("control_plain_http = maybe", "control_plain_http:"),
            ("control_url = http://gw.internal:19010", "control_url: http://gw.internal:19010 is http:// but the control endpoint speaks TLS"),
            ("control_tls_cert = /etc/gw.crt", "control_tls_cert: needs control_tls_key"),
            ("control_tls_key = /etc/gw.key", "control_tls_key: needs control_tls_cert"),
        ] {
            do {
                _ = try ConfigParser.parse("loops = 1\n" + text, file: "gw.conf")
                Issue.record("\(text) was accepted")
            } catch {
                #expect(error.line == 2)
                #expect(error.message.hasPrefix(message), "\(error)")
            }
        }
    }

    @Test("control_plain_http = yes: plain HTTP, an http:// control_url, and no certificate beside it")
    func controlPlainHTTP() throws {
        let plain = try ConfigParser.parse("control_listen = 10.0.0.2:19010\ncontrol_plain_http = yes\ncontrol_url = http://gw:19010\n")
        #expect(plain.controlPlainHTTP && plain.controlURL == "http://gw:19010")
        #expect(throws: ConfigError.self) {
            _ = try ConfigParser.parse("control_plain_http = yes\ncontrol_url = https://gw:19010\n")
        }
        #expect(throws: ConfigError.self) {
            _ = try ConfigParser.parse("control_plain_http = yes\ncontrol_tls_cert = /a\ncontrol_tls_key = /b\n")
        }
        let tls = try ConfigParser.parse("control_tls_cert = /etc/gw.crt\ncontrol_tls_key = /etc/gw.key\n")
        #expect(tls.controlTLSCertificate == "/etc/gw.crt" && tls.controlTLSKey == "/etc/gw.key")
    }
}
