// swift-tools-version: 6.1
// The remote-desktop access gateway: see docs/ARCHITECTURE.md for the map of
// targets. Dependencies point one way, from the executables at the top down
// to the C shims and system libraries at the bottom.
import PackageDescription

let package = Package(
    name: "RemoteDesktopGateway",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "leostream-gateway", targets: ["leostream-gateway"]),
        .executable(name: "relay-bench", targets: ["relay-bench"]),
        .executable(name: "leostream-broker", targets: ["leostream-broker"]),
        .executable(name: "pcoip-security-gateway", targets: ["pcoip-security-gateway"]),
        .executable(name: "pcoip-connection-manager", targets: ["pcoip-connection-manager"]),
        .executable(name: "pcoip-cmsg-setup", targets: ["pcoip-cmsg-setup"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // The broker core: HTTP server, bcrypt, embedded SQLite.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/hummingbird-project/hummingbird-auth", from: "2.5.0"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // Session grants (JWT): jwt-kit with swift-crypto and swift-certificates.
        .package(url: "https://github.com/vapor/jwt-kit", from: "5.8.0"),
        .package(url: "https://github.com/apple/swift-crypto", "4.0.0"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.1"),
        // The broker pushes rules to gateways' control endpoints.
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        // TLS for the Connection Manager's client listener and its broker client.
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    ],
    targets: [
        // C: Linux calls Swift's Glibc module does not expose (splice, accept4, ...).
        .target(name: "CSystemShim"),
        // System libraries through pkg-config. Only OpenSSL is used by the
        // first issues; libnftnl/libmnl serve the kernel path, libsystemd the
        // sd_notify readiness protocol.
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl",
                       providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CNftnl", pkgConfig: "libnftnl",
                       providers: [.apt(["libnftnl-dev"])]),
        .systemLibrary(name: "CMnl", pkgConfig: "libmnl",
                       providers: [.apt(["libmnl-dev"])]),
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd",
                       providers: [.apt(["libsystemd-dev"])]),

        // The kernel path's netlink layer on libnftnl and libmnl (C: message building).
        .target(name: "CNetfilter", dependencies: ["CNftnl", "CMnl"],
                linkerSettings: [.linkedLibrary("nftnl"), .linkedLibrary("mnl")]),
        // The product's nftables table and conntrack, as safe Swift (unsafe pointers stay here).
        .target(name: "NetfilterKernel", dependencies: ["CNetfilter", "SystemLayer"]),

        // The typed system layer: the only Swift code that imports Glibc for I/O.
        .target(name: "SystemLayer", dependencies: ["CSystemShim"]),
        // One epoll loop per thread, its command queue and timers.
        .target(name: "EventLoop", dependencies: ["SystemLayer"]),
        // The TCP data plane: rules, admission, pipe pool, splice relay.
        .target(name: "Relay", dependencies: [
            "SystemLayer", "EventLoop",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The gateway config file: parsing and validation with file:line errors.
        .target(name: "GatewayConfig", dependencies: ["Relay", "SystemLayer", "KeyValueConfig", "ControlProtocol"]),
        // The gateway's side of the control plane: pushed rules, ports,
        // persistence, expiry, the signed control endpoint (Hummingbird) and
        // registration with the broker.
        .target(name: "GatewayControl", dependencies: [
            "Relay", "SystemLayer", "ControlProtocol", "NetfilterKernel",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "leostream-gateway", dependencies: [
            "GatewayConfig", "GatewayControl", "ControlProtocol", "Relay", "SystemLayer", "NetfilterKernel",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Load generator and servers used by Bench/run (not part of the product).
        .executableTarget(name: "relay-bench", dependencies: ["SystemLayer", "EventLoop", "NetfilterKernel"],
                          path: "Bench/relay-bench"),

        // The gateway <-> broker control protocol: message types and request
        // signing (HMAC-SHA-256 from OpenSSL); used by both sides.
        .target(name: "ControlProtocol", dependencies: ["COpenSSL"]),

        // `Key = value` config files (SecurityGateway.conf, ConnectionManager.conf).
        .target(name: "KeyValueConfig"),
        // PEM certificates and keys through the system's OpenSSL: HP's checks, self-signed RSA 3072.
        .target(name: "CertificateFiles", dependencies: ["COpenSSL"]),
        // The PCoIP Connection Manager role: relays the broker protocol,
        // chooses a Security Gateway, signs and prepares the grant.
        .target(name: "ConnectionManager", dependencies: [
            "PCoIPBrokerProtocol", "PCoIPHTTP", "SessionGrants", "SystemLayer", "KeyValueConfig",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HummingbirdTLS", package: "hummingbird"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "HTTPTypes", package: "swift-http-types"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "pcoip-connection-manager", dependencies: [
            "ConnectionManager", "CertificateFiles", "KeyValueConfig", "SessionGrants", "SystemLayer",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            .product(name: "Logging", package: "swift-log"),
        ]),

        // pcoip-cmsg-setup: install, configure, status, uninstall (testable library + executable).
        .target(name: "CMSGSetup", dependencies: [
            "ConnectionManager", "SecurityGateway", "CertificateFiles", "KeyValueConfig", "SessionGrants", "SystemLayer",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        .executableTarget(name: "pcoip-cmsg-setup", dependencies: ["CMSGSetup", "SystemLayer"]),

        // The PCoIP broker protocol: a bounded XML reader and writer and the
        // messages (pure), and its HTTP side (cookie, chunked answers).
        .target(name: "PCoIPBrokerProtocol"),
        .target(name: "PCoIPHTTP", dependencies: [
            "PCoIPBrokerProtocol",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HTTPTypes", package: "swift-http-types"),
            .product(name: "NIOCore", package: "swift-nio"),
        ]),

        // Reads a TLS ClientHello without terminating TLS (the Security
        // Gateway's SNI routing). Pure code, no dependencies.
        .target(name: "TLSInspect"),
        // The PCoIP Security Gateway role: its config file, prepared grants,
        // the 4172 data path (an inspect-first relay rule) and its control endpoint.
        .target(name: "SecurityGateway", dependencies: [
            "SessionGrants", "TLSInspect", "SystemLayer", "Relay", "KeyValueConfig",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The Security Gateway process: serve, --check.
        .executableTarget(name: "pcoip-security-gateway", dependencies: [
            "SecurityGateway", "SessionGrants", "Relay", "SystemLayer",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Signed session grants (JWT, RS256 / ES256) for the Security Gateway.
        .target(name: "SessionGrants", dependencies: [
            .product(name: "JWTKit", package: "jwt-kit"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "_CryptoExtras", package: "swift-crypto"),
            .product(name: "X509", package: "swift-certificates"),
        ]),

        // The broker core: domain, validation, the BrokerStore interface and its
        // SQLite implementation (no HTTP here).
        .target(name: "BrokerCore", dependencies: [
            "SystemLayer", "ControlProtocol",
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "HummingbirdBcrypt", package: "hummingbird-auth"),
        ]),
        // The broker's REST API (Leostream-compatible gateway calls, our own
        // desktops and users) as a Hummingbird application.
        .target(name: "BrokerAPI", dependencies: [
            "BrokerCore", "ControlProtocol", "PCoIPBrokerProtocol", "PCoIPHTTP",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HummingbirdCore", package: "hummingbird"),
            .product(name: "HummingbirdTLS", package: "hummingbird"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "HTTPTypes", package: "swift-http-types"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "leostream-broker", dependencies: [
            "BrokerAPI", "BrokerCore", "SystemLayer", "CertificateFiles",
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "Logging", package: "swift-log"),
        ]),

        // Shared by the test targets only: the off-pool trait, polling waits.
        .target(name: "TestSupport", dependencies: ["SystemLayer"], path: "Tests/TestSupport"),

        .testTarget(name: "SystemLayerTests", dependencies: ["TestSupport", "SystemLayer"]),
        .testTarget(name: "NetfilterKernelTests", dependencies: ["TestSupport", "NetfilterKernel", "SystemLayer"]),
        .testTarget(name: "EventLoopTests", dependencies: ["TestSupport", "EventLoop", "SystemLayer"]),
        .testTarget(name: "RelayTests", dependencies: ["TestSupport", "Relay", "EventLoop", "SystemLayer"]),
        .testTarget(name: "GatewayConfigTests", dependencies: ["TestSupport", "GatewayConfig", "Relay"]),
        .testTarget(name: "GatewayE2ETests", dependencies: ["TestSupport", "SystemLayer"]),
        .testTarget(name: "ControlProtocolTests", dependencies: ["TestSupport", "ControlProtocol"]),
        .testTarget(name: "GatewayControlTests", dependencies: [
            "TestSupport", "GatewayControl", "ControlProtocol", "Relay", "SystemLayer", "NetfilterKernel",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        .testTarget(name: "PCoIPBrokerProtocolTests", dependencies: ["TestSupport", "PCoIPBrokerProtocol"]),
        .testTarget(name: "ConnectionManagerTests", dependencies: ["TestSupport", "ConnectionManager", "KeyValueConfig", "SystemLayer"]),
        .testTarget(name: "CMSGSetupTests", dependencies: [
            "TestSupport", "CMSGSetup", "CertificateFiles", "ConnectionManager", "SecurityGateway", "SessionGrants", "KeyValueConfig",
        ]),
        .testTarget(name: "TLSInspectTests", dependencies: ["TestSupport", "TLSInspect"]),
        .testTarget(name: "SessionGrantsTests", dependencies: ["TestSupport", "SessionGrants"]),
        .testTarget(name: "SecurityGatewayTests", dependencies: [
            "TestSupport", "SecurityGateway", "SessionGrants", "SystemLayer", "Relay",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "BrokerTests", dependencies: [
            "TestSupport", "BrokerAPI", "BrokerCore", "ControlProtocol", "PCoIPBrokerProtocol",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
    ]
)
