import ArgumentParser
import FoundationEssentials
import SessionGrants
import SystemLayer

/// `pcoip-security-gateway grant`: signs session grants as a Connection
/// Manager would (`GrantSigner`), one compact JWT per line on standard
/// output, so that operators and test scripts can prepare sessions on a
/// gateway's control endpoint without a CM.
struct Grant: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Sign session grants with the CM's key and print them, one JWT per line.",
        usage: """
            pcoip-security-gateway grant --jwt-signing-key <key.pem> --audience <group> --agent <host:port> --sni <name>
                                         [--client <ip>] [--session-id <id>] [--lifetime <seconds>] [--single-use]
                                         [--count <n>] [--sequential-agents]
            """,
        discussion: """
        The Connection Manager's side of a session, for operators and tests:
        each grant names the session id, the agent (numeric HOST:PORT), the SNI
        the client will present, the client's address when given, the gateway
        group (audience), issue and expiry times and a fresh unique id; it is
        signed with --jwt-signing-key (RS256 with RSA of 2,048 bits or more, or
        ES256). Prepare one on a gateway with
          curl -d '{"grant":"<JWT>"}' http://<ControlListen>/v1/sessions

        --count N prints N grants; `{n}` in --sni and --session-id becomes
        0, 1, ... N-1, and with --sequential-agents grant n goes to the
        --agent's IPv4 address plus n (same port), e.g. 10.0.0.1:4172,
        10.0.0.2:4172, ... Without --session-id each grant gets a random one.

        No secret is printed other than the grants themselves (which admit a
        session: treat them as credentials).
        """)

    @Option(name: .customLong("jwt-signing-key"), help: "The CM's PEM private key (RSA >= 2,048 bits or ECDSA P-256).")
    var jwtSigningKey: String

    @Option(help: "The Security Gateway group the grant is for (the gateways' GatewayGroup).")
    var audience: String

    @Option(help: "The agent's numeric HOST:PORT (e.g. 10.0.0.5:4172).")
    var agent: String

    @Option(help: "The SNI the client presents (the agent's name); `{n}` is replaced by the grant's index.")
    var sni: String

    @Option(help: "The client's IP address, when known (a grant naming a client is preferred for that client).")
    var client: String?

    @Option(name: .customLong("session-id"), help: "The session id (default: random per grant); `{n}` is replaced by the grant's index.")
    var sessionID: String?

    @Option(help: "Seconds the grant is valid from now (1-604800).")
    var lifetime: Int = 300

    @Flag(name: .customLong("single-use"), help: "The grant admits one connection only.")
    var singleUse = false

    @Option(help: "How many grants to sign (1-1000000).")
    var count: Int = 1

    @Flag(name: .customLong("sequential-agents"), help: "With --count: grant n goes to the --agent's IPv4 address plus n.")
    var sequentialAgents = false

    func validate() throws {
        guard let address = SocketAddress(agent), address.port != 0 else {
            throw ValidationError("--agent: \"\(agent)\" is not a numeric HOST:PORT with a port 1-65535")
        }
        guard Self.isHostName(sni.replacing("{n}", with: String(max(count - 1, 0)))) else {
            throw ValidationError("--sni: \"\(sni)\" is not a host name (1-255 bytes of letters, digits, '-', '.', '_', not starting with '.' or '-')")
        }
        guard !audience.isEmpty, audience.utf8.count <= 255, audience.allSatisfy({ !$0.isWhitespace }) else {
            throw ValidationError("--audience: must be one word of 1-255 bytes (the gateways' GatewayGroup)")
        }
        if let client, IPAddress(client) == nil {
            throw ValidationError("--client: \"\(client)\" is not a numeric IP address")
        }
        if let sessionID, sessionID.isEmpty || sessionID.utf8.count > 200 {
            throw ValidationError("--session-id: must be 1-200 bytes")
        }
        guard (1...604_800).contains(lifetime) else { throw ValidationError("--lifetime: \(lifetime) is not 1-604800 seconds") }
        guard (1...1_000_000).contains(count) else { throw ValidationError("--count: \(count) is not 1-1000000") }
        if sequentialAgents {
            guard case .v4(let first) = address.ip else {
                throw ValidationError("--sequential-agents: --agent must be an IPv4 address")
            }
            guard UInt64(first) + UInt64(count - 1) <= UInt64(UInt32.max) else {
                throw ValidationError("--sequential-agents: --agent plus --count runs past 255.255.255.255")
            }
        }
    }

    func run() async throws {
        guard let pem = try? String(contentsOfFile: jwtSigningKey, encoding: .utf8) else {
            throw Failure("--jwt-signing-key: cannot read \(jwtSigningKey)")
        }
        let signer: GrantSigner
        do throws(GrantError) {
            signer = try await GrantSigner.load(pem: pem)
        } catch {
            throw Failure("--jwt-signing-key \(jwtSigningKey): \(error)")
        }
        let base = SocketAddress(agent)!
        let now = Date()
        var out = ""
        out.reserveCapacity(min(count, 10_000) * 700)
        for n in 0..<count {
            var target = base
            if sequentialAgents, case .v4(let first) = base.ip {
                target = SocketAddress(ip: .v4(first + UInt32(n)), port: base.port)
            }
            let index = String(n)
            let grant = SessionGrant(
                sessionID: sessionID?.replacing("{n}", with: index) ?? UUID().uuidString.lowercased(),
                agent: "\(target)", serverName: sni.replacing("{n}", with: index).lowercased(),
                client: client, audience: audience, issuedAt: now, expires: now.addingTimeInterval(TimeInterval(lifetime)),
                singleUse: singleUse)
            do throws(GrantError) {
                out += try await signer.sign(grant)
                out += "\n"
            } catch {
                throw Failure("signing grant \(n): \(error)")
            }
            if out.utf8.count >= 1 << 20 {
                try Self.writeOut(out)
                out = ""
            }
        }
        try Self.writeOut(out)
    }

    /// The SNI rule of the gateway's ClientHello reader: 1-255 bytes of
    /// letters, digits, `-`, `.` and `_`, not starting with `.` or `-`.
    static func isHostName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...255).contains(bytes.count), bytes.first != UInt8(ascii: "."), bytes.first != UInt8(ascii: "-") else { return false }
        return bytes.allSatisfy { b in
            (b >= 0x61 && b <= 0x7A) || (b >= 0x41 && b <= 0x5A) || (b >= 0x30 && b <= 0x39)
                || b == UInt8(ascii: "-") || b == UInt8(ascii: ".") || b == UInt8(ascii: "_")
        }
    }

    /// Writes to standard output, all of it (a pipe may take it in parts).
    private static func writeOut(_ text: String) throws {
        do throws(Errno) {
            try FileDescriptor(rawValue: 1).writeAll(Array(text.utf8))
        } catch {
            throw Failure("standard output: \(error)")
        }
    }
}
