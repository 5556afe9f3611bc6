import ArgumentParser
import CertificateFiles
import ConnectionManager
import Foundation
import Hummingbird
import KeyValueConfig
import Logging
import NIOSSL
import ServiceLifecycle
import ServiceSupport
import SessionGrants
import Synchronization
import SystemLayer
import UnixSignals

@main
struct ConnectionManagerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pcoip-connection-manager",
        abstract: "The PCoIP Connection Manager: relays PCoIP clients' broker protocol to a broker and puts their sessions behind Security Gateways.",
        discussion: """
            Clients POST the PCoIP broker protocol (hello, authenticate, get-resource-list,
            allocate-resource, bye) to https://ADDRESS/pcoip-broker/xml; GET /health answers
            200 {"code":200,"status":"success"} or 500 with a reason. ConnectionManager.conf
            (Key = value) is written by pcoip-cmsg-setup; see docs/ARCHITECTURE.md.
            SIGHUP re-reads the config without dropping a session; SIGTERM stops.
            """,
        version: ProductVersion.line,
        subcommands: [Serve.self])

    @Flag(name: .long, help: "Check ConnectionManager.conf, its certificate, key and signing key, and exit (2 with the reason).")
    var check = false

    @Option(name: .long, help: "ConnectionManager.conf to use (serve) or to check (--check).")
    var config: String?

    func run() async throws {
        guard check else { throw ValidationError("give serve, or --check --config FILE; see --help") }
        guard let config else { throw ValidationError("--check needs --config FILE") }
        let loaded = try await withTaskExecutorPreference(BlockingExecutor.shared) { try await Loader.load(config) }
        print("config \(config): valid")
        print("listen \(loaded.config.listen) (HTTPS), control \(loaded.config.controlListen), broker \(loaded.config.brokerURL)")
        print("grants signed with \(loaded.signer.algorithm.rawValue) for gateway group \(loaded.config.gatewayGroup)")
        print("Security Gateways: " + loaded.config.securityGateways.map(\.description).joined(separator: ", "))
        print("MaxSessionEstablishments \(loaded.config.maxSessionEstablishments), MaxClientCommunications \(loaded.config.maxClientCommunications)")
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the Connection Manager in the foreground.",
        usage: "pcoip-connection-manager serve --config <ConnectionManager.conf> [--pid-file <file>]",
        discussion: "--config FILE (required) may come before or after `serve`.")

    @ParentCommand var parent: ConnectionManagerCommand

    @Option(name: .long, help: "Write the process id here while serving (for pcoip-cmsg-setup configure and uninstall).")
    var pidFile: String?

    func run() async throws {
        guard let path = parent.config else { throw ValidationError("serve needs --config FILE") }
        let pidFile = self.pidFile
        let loaded = try await withTaskExecutorPreference(BlockingExecutor.shared) { try await Loader.load(path) }
        let level = Logger.Level(rawValue: loaded.config.logLevel) ?? .info
        ServiceLogHandler.bootstrap(level: level)
        ServiceMetrics.shared.bootstrap()
        var logger = Logger(label: "pcoip-connection-manager")
        logger.logLevel = level
        let manager = ConnectionManager(config: loaded.config, signer: loaded.signer, broker: loaded.broker,
                                        gatewayTLS: loaded.gatewayTLS, logger: logger)
        if loaded.gatewayTLS == nil {
            logger.warning("the Security Gateways' control endpoints are reached in plain HTTP (SecurityGatewayPlainHttp = true): grants cross the network in clear")
        }
        ServiceMetrics.shared.addCollector { text in manager.writeMetrics(into: &text) }
        let link = ServiceManagerLink(logger: logger, status: {
            let status = manager.status()
            return "\(status.clientSessions) client session(s), \(status.securityGateways.filter(\.healthy).count) healthy Security Gateway(s)"
        })
        // READY=1 once both listeners are bound.
        let bound = Mutex(0)
        let listening: @Sendable () -> Void = {
            if bound.withLock({ n -> Int in n += 1; return n }) == 2 { link.ready() }
        }
        let log = logger
        let client = try ConnectionManagerServer.application(
            manager: manager, address: .hostname("\(loaded.config.listen.ip)", port: Int(loaded.config.listen.port)),
            tls: loaded.tls, logger: logger,
            onServerRunning: { address in
                log.notice("listening for PCoIP clients on https://\(address)/pcoip-broker/xml, pid \(SystemInfo.processID)")
                listening()
            })
        let control = ConnectionManagerServer.controlApplication(
            manager: manager, address: .hostname("\(loaded.config.controlListen.ip)", port: Int(loaded.config.controlListen.port)),
            logger: logger, onServerRunning: { address in
                log.notice("control endpoint on http://\(address) (health, status, metrics)")
                listening()
            })
        let reloader = Reloader(manager: manager, path: path, logger: logger, link: link)
        defer { link.finish() }
        let group = ServiceGroup(configuration: .init(services: [client, control, UpstreamProber(manager: manager), reloader, link],
                                                      gracefulShutdownSignals: [.sigterm], cancellationSignals: [.sigint],
                                                      logger: logger))
        if let pidFile {
            try await BlockingExecutor.shared.run { () throws in
                do throws(Errno) { try StateFile.writeAtomically(pidFile, Array("\(SystemInfo.processID)\n".utf8), mode: 0o644) } catch {
                    throw Failure("--pid-file \(pidFile): \(error)")
                }
            }
        }
        defer { if let pidFile { StateFile.remove(pidFile) } }
        do {
            try await group.run()
        } catch {
            await manager.shutdown()
            throw Failure("\(error)")
        }
        await manager.shutdown()
        logger.notice("stopped")
    }
}

/// Re-reads the config on SIGHUP; a bad file is logged and changes nothing.
struct Reloader: Service {
    let manager: ConnectionManager
    let path: String
    let logger: Logger
    let link: ServiceManagerLink

    func run() async throws {
        for await _ in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            link.reloading()
            defer { link.reloaded() }
            do {
                let loaded = try await withTaskExecutorPreference(BlockingExecutor.shared) { try await Loader.load(path) }
                let old = manager.reload(config: loaded.config, signer: loaded.signer, broker: loaded.broker)
                logger.notice("config reloaded from \(path)")
                // Calls in flight on the old client finish first.
                Task { try? await Task.sleep(for: .seconds(30)); await old.shutdown() }
            } catch {
                logger.error("config not reloaded (the running one stays): \(error)")
            }
        }
    }
}

/// A failure the user sees on standard error, with exit code 1.
struct Failure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Reads the config and everything it names, checking each file.
enum Loader {
    struct Loaded {
        var config: ConnectionManagerConfig
        var signer: GrantSigner
        var broker: BrokerClient
        var tls: TLSConfiguration
        /// The Security Gateways' control endpoints; nil with SecurityGatewayPlainHttp = true.
        var gatewayTLS: TLSConfiguration?
    }

    static func load(_ path: String) async throws -> Loaded {
        let config: ConnectionManagerConfig
        do throws(ConfigFileError) {
            config = try ConnectionManagerConfig.load(path: path).resolvingPaths(relativeTo: path)
        } catch {
            throw Failure(error.description)
        }
        func read(_ file: String, key: String) throws -> [UInt8] {
            guard let data = FileManager.default.contents(atPath: file) else {
                throw Failure("\(path): \(key): cannot read \(file)")
            }
            return Array(data)
        }
        let certificate = try read(config.sslCertificate, key: "SSLCert")
        let key = try read(config.sslKey, key: "SSLKey")
        let ca = config.brokerCACertificate.isEmpty ? nil : try read(config.brokerCACertificate, key: "BrokerCaCert")
        do throws(CertificateFiles.Problem) {
            try CertificateFiles.checkServerPair(certificate: certificate, certificateFile: config.sslCertificate,
                                                 key: key, keyFile: config.sslKey)
            if let ca { try CertificateFiles.checkCACertificate(ca, file: config.brokerCACertificate) }
        } catch {
            throw Failure("\(path): \(error)")
        }
        let signingPEM = String(decoding: try read(config.jwtSigningKey, key: "JwtSigningKey"), as: UTF8.self)
            .replacingOccurrences(of: "\r\n", with: "\n")
        let signer: GrantSigner
        do throws(GrantError) {
            signer = try await GrantSigner.load(pem: signingPEM)
        } catch {
            throw Failure("\(path): JwtSigningKey \(config.jwtSigningKey): \(error)")
        }
        guard let url = BrokerURL(config.brokerURL) else { throw Failure("\(path): BrokerUrl \(config.brokerURL) is not usable") }
        let broker: BrokerClient
        do throws(UpstreamFailure) {
            broker = try BrokerClient(url: url, caFile: config.brokerCACertificate, allowSelfSigned: config.brokerAllowSelfSigned)
        } catch {
            throw Failure("\(path): \(error)")
        }
        let tls: TLSConfiguration
        do throws(UpstreamFailure) {
            tls = try ConnectionManagerServer.tlsConfiguration(certificate: config.sslCertificate, key: config.sslKey)
        } catch {
            throw Failure("\(path): \(error)")
        }
        var gatewayTLS: TLSConfiguration?
        if !config.securityGatewayPlainHTTP {
            let (file, key) = config.securityGatewayCACertificate.isEmpty ? (config.sslCertificate, "SSLCert")
                                                                           : (config.securityGatewayCACertificate, "SecurityGatewayCaCert")
            let pem = try read(file, key: key)
            do throws(CertificateFiles.Problem) { try CertificateFiles.checkCACertificate(pem, file: file) } catch {
                throw Failure("\(path): \(key): \(error)")
            }
            do {
                gatewayTLS = try ServerTLS.pinnedClient(trusting: file)
            } catch {
                throw Failure("\(path): \(key) \(file): \(error)")
            }
        }
        return Loaded(config: config, signer: signer, broker: broker, tls: tls, gatewayTLS: gatewayTLS)
    }
}
