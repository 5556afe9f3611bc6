import ServiceSupport
import BrokerCore
import BrokerPostgres
import Foundation
import SystemLayer

/// `--info` and `--health`: what an operator needs, read without changing anything.
enum Report {
    /// Prints the version, database, listener, gateways and host figures to standard output.
    static func info(_ options: BrokerOptions) async {
        let path = options.databasePath
        var lines = ["leostream-broker \(ProductVersion.line)"]

        let postgres = PostgresSettings.isURL(options.database ?? "")
        if postgres {
            lines.append("database:  \((try? options.databaseChoice()).flatMap { if case .postgres(let settings) = $0 { settings.location } else { nil } } ?? options.database ?? "") (PostgreSQL)")
        } else if !FileManager.default.fileExists(atPath: path) {
            lines.append("database:  \(path) (SQLite): not created yet (the first start creates it)")
        } else {
            lines.append("database:  \(path) (SQLite, WAL), \(Format.bytes(databaseSize(path)))")
        }
        var gateways: [Gateway]?
        do {
            if let (store, close) = try await OpenedStore.openForReport(options) {
                do {
                    let schema = try await store.schema()
                    var text = "schema:    \(schema.version)"
                    if !schema.pending.isEmpty { text += " (pending: \(schema.pending.joined(separator: ", ")); applied at the next start)" }
                    if !schema.unknown.isEmpty { text += " (from a newer broker: \(schema.unknown.joined(separator: ", ")))" }
                    if schema.pending.isEmpty && schema.unknown.isEmpty { text += " (current)" }
                    lines.append(text)
                    if schema.applied.isEmpty {
                        gateways = []
                    } else {
                        gateways = try await store.gateways()
                        lines.append("users:     \(try await store.userCount())")
                    }
                } catch {
                    lines.append("database problem: \(error)")
                }
                await close()
            }
        } catch {
            lines.append("database problem: \(error)")
        }

        lines.append("listener:  \(options.listen) (\(probe(options.listen) == nil ? "accepting connections" : "not accepting connections"))")

        if let gateways {
            // Online only when heard from within --offline-after: the flag in
            // the file may be stale when the broker is not running.
            let now = Date()
            let online = gateways.filter { $0.isLive(now: now, offlineAfter: TimeInterval(options.offlineAfter)) }
            lines.append("gateways:  \(gateways.count) registered, \(online.count) online, \(gateways.count - online.count) offline")
            for gateway in gateways {
                let live = gateway.isLive(now: now, offlineAfter: TimeInterval(options.offlineAfter))
                var entry = "  \(gateway.id)  \(gateway.name)  \(gateway.address)  \(live ? "online" : "offline")"
                if !gateway.version.isEmpty { entry += "  version \(gateway.version)" }
                if !gateway.controlURL.isEmpty { entry += "  control \(gateway.controlURL)" }
                if let range = gateway.portRange { entry += "  ports \(range.first)-\(range.last)" }
                if let load = gateway.load { entry += "  load \(String(format: "%.2f", load))" }
                if let heartbeat = gateway.lastHeartbeat { entry += "  last heartbeat \(heartbeat.formatted(.iso8601))" }
                entry += gateway.keyFingerprint.map { "  enrolled (key \($0))" } ?? "  not enrolled"
                lines.append(entry)
            }
        } else {
            lines.append("gateways:  unknown (no readable database)")
        }

        let host = HostStatus.current(diskPath: URL(fileURLWithPath: path).deletingLastPathComponent().path)
        var hostLine = "host:      \(host.cpus) CPU(s); memory \(Format.bytes(host.memoryTotalBytes))"
        if let available = host.memoryAvailableBytes { hostLine += ", \(Format.bytes(available)) available" }
        if let load = host.loadAverage { hostLine += "; load \(load.map { String(format: "%.2f", $0) }.joined(separator: " "))" }
        lines.append(hostLine)
        if let disk = host.disk {
            let percent = disk.totalBytes == 0 ? 0 : Double(disk.freeBytes) * 100 / Double(disk.totalBytes)
            lines.append("disk:      \(Format.bytes(disk.freeBytes)) free of \(Format.bytes(disk.totalBytes)) (\(String(format: "%.0f", percent))%) on the filesystem of \(disk.path)")
        } else {
            lines.append("disk:      cannot be measured for \(path)")
        }
        StandardStreams.writeOutput(lines.joined(separator: "\n") + "\n")
    }

    /// Runs the checks; prints each result on standard output and each problem on
    /// standard error.
    /// - Returns: true when every check passed.
    static func health(_ options: BrokerOptions) async -> Bool {
        let path = options.databasePath
        var problems: [String] = []
        var passed: [String] = []

        do {
            if let (store, close) = try await OpenedStore.openForReport(options) {
                let health = await store.health()
                if let problem = health.problem {
                    problems.append(problem)
                } else {
                    passed.append("database \(store.location): readable, schema \(health.schema?.version ?? "?")")
                }
                await close()
            } else {
                problems.append("database \(path): no such file (has the broker ever started with this --database / --data-dir?)")
            }
        } catch {
            problems.append("database: \(error)")
        }

        let host = HostStatus.current(diskPath: URL(fileURLWithPath: path).deletingLastPathComponent().path)
        problems += host.problems
        if let disk = host.disk, !HostStatus.diskNearlyFull(disk) {
            passed.append("disk: \(Format.bytes(disk.freeBytes)) free on the filesystem of \(disk.path)")
        }

        if let failure = probe(options.listen) {
            problems.append("listener \(options.listen): \(failure) (is the broker running?)")
        } else {
            passed.append("listener \(options.listen): accepting connections")
        }

        for line in passed { StandardStreams.writeOutput("ok: \(line)\n") }
        for problem in problems { StandardStreams.writeError("error: \(problem)\n") }
        StandardStreams.writeOutput(problems.isEmpty ? "healthy\n" : "unhealthy: \(problems.count) problem(s)\n")
        return problems.isEmpty
    }

    /// Tries a TCP connection to `listen` for up to two seconds.
    /// - Returns: nil when something accepted it, otherwise why not.
    static func probe(_ listen: String) -> String? {
        guard let (host, port) = SocketAddress.splitHostPort(listen) else { return "not HOST:PORT" }
        do {
            let address = try SocketAddress.resolve(host: host, port: port)
            let fd = try Socket.makeTCP(family: address.family)
            defer { fd.close() }
            if try Socket.connect(fd, to: address) == .inProgress {
                guard BlockingWait.writable(fd, timeoutMilliseconds: 2000) else { return "no answer within 2 s" }
                if let error = Socket.pendingError(fd) { return "\(error)" }
            }
            return nil
        } catch {
            return "\(error)"
        }
    }

    /// The size of the database and its WAL.
    private static func databaseSize(_ path: String) -> UInt64 {
        [path, path + "-wal"].reduce(0) { total, file in
            let size = (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? NSNumber)?.uint64Value ?? 0
            return total + size
        }
    }
}
