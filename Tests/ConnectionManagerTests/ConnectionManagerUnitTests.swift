import ConnectionManager
import KeyValueConfig
import Synchronization
import SystemLayer
import Testing
import TestSupport

@Suite("ConnectionManager.conf, addresses and URLs", .offPool)
struct ConnectionManagerConfigTests {
    static let minimal = """
        BrokerUrl = https://broker.example:8443
        SSLCert = cm.crt
        SSLKey = cm.key
        JwtSigningKey = grant.key
        GatewayGroup = group-1
        SecurityGatewayEnabled = true
        ExternalPcoipIp = 203.0.113.5
        """

    @Test("a minimal file takes HP's defaults; relative paths resolve beside the file")
    func minimal() throws {
        let config = try ConnectionManagerConfig.parse(Self.minimal).resolvingPaths(relativeTo: "/etc/cmsg/ConnectionManager.conf")
        #expect(config.maxSessionEstablishments == 40 && config.maxClientCommunications == 400)
        #expect(config.listen == SocketAddress("0.0.0.0:443")!)
        #expect(config.sslCertificate == "/etc/cmsg/cm.crt" && config.jwtSigningKey == "/etc/cmsg/grant.key")
        #expect(config.securityGateways.count == 1 && config.securityGateways[0].local)
        #expect(config.securityGateways[0].publicAddress == "203.0.113.5" && config.securityGateways[0].publicPort == 4172)
    }

    @Test("every key, and the gateways in failover order: this host's first")
    func full() throws {
        let config = try ConnectionManagerConfig.parse(Self.minimal + """

            ListenAddress = 10.0.0.1:8443
            ControlListen = 127.0.0.1:9999
            BrokerCaCert = /ca.pem
            BrokerAllowSelfSigned = yes
            SecurityGatewayControl = 10.1.0.1:4173
            ExternalSecurityGateways = 198.51.100.7, 198.51.100.8:4200@10.1.0.8:5000
            MaxSessionEstablishments = 2
            MaxClientCommunications = 4
            GrantLifetime = 3600s
            SessionIdleTimeout = 60
            HealthCheckInterval = 0.5
            EnableIPv6 = false
            LogLevel = DEBUG
            """)
        #expect(config.brokerAllowSelfSigned && config.maxSessionEstablishments == 2 && config.maxClientCommunications == 4)
        #expect(config.grantLifetimeSeconds == 3600 && config.healthCheckSeconds == 0.5 && config.logLevel == "debug")
        let gateways = config.securityGateways
        #expect(gateways.map(\.publicAddress) == ["203.0.113.5", "198.51.100.7", "198.51.100.8"])
        #expect(gateways[0].control == SocketAddress("10.1.0.1:4173")!)
        #expect(gateways[1].control == SocketAddress("198.51.100.7:4173")! && gateways[1].publicPort == 4172)
        #expect(gateways[2].control == SocketAddress("10.1.0.8:5000")! && gateways[2].publicPort == 4200)
    }

    @Test("errors name the file, the line and the key")
    func errors() {
        func why(_ text: String) -> String {
            do throws(ConfigFileError) {
                _ = try ConnectionManagerConfig.parse(text, file: "cm.conf")
                return "accepted"
            } catch {
                return error.description
            }
        }
        #expect(why(Self.minimal + "\nMaxSessionEstablishments = lots") == "cm.conf:8: MaxSessionEstablishments: \"lots\" is not a number 1-100000")
        #expect(why(Self.minimal + "\nBrokerUrl = https://other") .contains("cm.conf:8: BrokerUrl is set twice (first on line 1)"))
        #expect(why(Self.minimal.replacingOccurrences(of: "https://broker.example:8443", with: "http://broker.example")).contains("cm.conf:1: BrokerUrl"))
        #expect(why(Self.minimal + "\nColour = blue").contains("cm.conf:8: unknown key \"Colour\""))
        #expect(why(Self.minimal + "\nExternalSecurityGateways = gw.example").contains("is not PUBLIC_IP"))
        #expect(why(Self.minimal.replacingOccurrences(of: "JwtSigningKey = grant.key\n", with: "")).contains("JwtSigningKey is required"))
        #expect(why(Self.minimal.replacingOccurrences(of: "ExternalPcoipIp = 203.0.113.5", with: "")).contains("ExternalPcoipIp is required"))
        #expect(why(Self.minimal.replacingOccurrences(of: "SecurityGatewayEnabled = true", with: "SecurityGatewayEnabled = false")).contains("no Security Gateway"))
        #expect(why("BrokerUrl https://x").contains("cm.conf:1: expected `Key = value`"))
    }

    @Test("broker URLs: https anywhere, http only to loopback")
    func brokerURLs() {
        #expect(BrokerURL("https://broker.example")?.endpoint == "https://broker.example:443/pcoip-broker/xml")
        #expect(BrokerURL("https://[2001:db8::1]:8443")?.endpoint == "https://[2001:db8::1]:8443/pcoip-broker/xml")
        #expect(BrokerURL("http://127.0.0.1:8080")?.port == 8080)
        #expect(BrokerURL("http://10.0.0.1") == nil)
        #expect(BrokerURL("ftp://broker") == nil)
        #expect(BrokerURL("broker.example") == nil)
    }
}

@Suite("Client sessions, limits and the gateway choice", .offPool)
struct ConnectionManagerStateTests {
    func sessions(idle: Double = 100, capacity: Int = 100) -> ClientSessions {
        let counter = Counter()
        return ClientSessions(idleSeconds: idle, capacity: capacity, makeToken: { "t\(counter.next())" })
    }

    @Test("a session by cookie, then by Client-Log-Id when the cookie is dropped (same address only); idle ones go")
    func sessionLookup() {
        let table = sessions()
        let (first, isNew) = table.resolve(cookie: nil, clientLogID: "log-1", clientAddress: "198.51.100.1", now: 0)
        #expect(isNew && first.token == "t1")
        table.update(first.token, brokerCookie: "broker-A", username: "alice")
        #expect(table.resolve(cookie: "t1", clientLogID: nil, clientAddress: "198.51.100.1", now: 1).session.brokerCookie == "broker-A")
        // The client dropped the cookie: its log id finds the session.
        let (again, againNew) = table.resolve(cookie: nil, clientLogID: "log-1", clientAddress: "198.51.100.1", now: 2)
        #expect(!againNew && again.token == "t1" && again.username == "alice")
        // Another address with the same log id gets its own session (never shared).
        let (other, otherNew) = table.resolve(cookie: nil, clientLogID: "log-1", clientAddress: "198.51.100.2", now: 3)
        #expect(otherNew && other.token != "t1" && other.brokerCookie == nil)
        // Unknown cookies make new sessions; idle ones are not found and are swept.
        #expect(table.resolve(cookie: "forged", clientLogID: nil, clientAddress: "198.51.100.1", now: 4).isNew)
        #expect(table.resolve(cookie: "t1", clientLogID: nil, clientAddress: "198.51.100.1", now: 200).isNew)
        let before = table.count
        #expect(table.sweep(now: 1000) == before && table.count == 0)
        table.remove("nothing")
    }

    @Test("the table is bounded: the longest idle session goes first")
    func capacity() {
        let table = sessions(capacity: 3)
        for i in 0..<3 { _ = table.resolve(cookie: nil, clientLogID: nil, clientAddress: "a", now: Double(i)) }
        _ = table.resolve(cookie: "t1", clientLogID: nil, clientAddress: "a", now: 10)
        _ = table.resolve(cookie: nil, clientLogID: nil, clientAddress: "a", now: 11)
        #expect(table.count == 3 && table.session("t2") == nil && table.session("t1") != nil)
    }

    @Test("a limit answers at once: full means refused and counted, never a wait")
    func limits() {
        let limit = ConcurrencyLimit(limit: 2)
        #expect(limit.enter() && limit.enter())
        #expect(!limit.enter() && limit.refusals == 1 && limit.inProgress == 2)
        limit.leave()
        #expect(limit.enter() && limit.inProgress == 2)
    }

    @Test("healthy gateways only, fewest sessions first, the configured order breaking ties")
    func choice() {
        func gateway(_ n: Int) -> SecurityGatewayAddress {
            SecurityGatewayAddress(publicAddress: "203.0.113.\(n)", publicPort: 4172, control: SocketAddress("10.0.0.\(n):4173")!)
        }
        let pool = GatewayPool([gateway(1), gateway(2), gateway(3)])
        #expect(pool.choose().isEmpty, "unchecked gateways are not used")
        pool.record("10.0.0.1:4173", .init(healthy: true, activeSessions: 5, problem: nil, checkedAt: 1))
        pool.record("10.0.0.2:4173", .init(healthy: true, activeSessions: 1, problem: nil, checkedAt: 1))
        pool.record("10.0.0.3:4173", .init(healthy: true, activeSessions: 1, problem: nil, checkedAt: 1))
        #expect(pool.choose().map(\.publicAddress) == ["203.0.113.2", "203.0.113.3", "203.0.113.1"])
        pool.countSession("10.0.0.2:4173")
        #expect(pool.choose().first?.publicAddress == "203.0.113.3")
        pool.markFailed("10.0.0.3:4173", "prepare failed", now: 2)
        #expect(pool.choose().map(\.publicAddress) == ["203.0.113.2", "203.0.113.1"])
        pool.replace(with: [gateway(2), gateway(4)])
        #expect(pool.members.map(\.health.healthy) == [true, false], "a reload keeps what is known of gateways that stay")
    }
}

final class Counter: Sendable {
    private let value = Mutex(0)
    func next() -> Int { value.withLock { $0 += 1; return $0 } }
}
