import ControlProtocol
import Foundation
import GRDB
import Synchronization
import SystemLayer

/// The embedded store: one SQLite file in WAL mode through GRDB.
///
/// Writes go through GRDB's single writer, each call in one transaction that
/// validates, checks references and uniqueness, and writes, so a call that
/// throws changed nothing. Reads run concurrently beside the writer (WAL).
public final class SQLiteBrokerStore: BrokerStore {
    /// How to open the file.
    public enum Mode: Sendable {
        /// Create the file if missing and apply pending migrations (`serve`).
        case readWrite
        /// Open an existing file without changing it (`--info`, `--health`).
        case readOnly
    }

    public let path: String
    public let mode: Mode
    public var location: String { "sqlite:\(path)" }

    private let database: any DatabaseWriter
    /// Rules being pushed (`reserveRules`): rule id → gateway and when. An
    /// SQLite file serves one broker process, so the reservations live here.
    /// `registerGateway` reads them and `createRules` ends them inside writer
    /// transactions, which the single writer runs one at a time, so a
    /// registration sees each rule stored or still reserved;
    /// `connectReading` counts them from a reader, where a count may be off
    /// by one while a rule moves from one to the other.
    private let pending = Mutex<[String: (gatewayID: Int64, since: Date)]>([:])
    /// The file's (device, inode) when opened, to notice it being removed or replaced.
    private let identity: FileIdentity?
    /// Sessions found, and desktops' connect readings, each kept until a
    /// commit changes what they come from (`ReadCache`); nil for a store
    /// opened read-only, which another process may be writing.
    private let sessions: ReadCache<String, AuthenticatedSession>?
    private let readings: ReadCache<Int64, ConnectReading>?
    /// `PATH.lock`, held while a store has the file open read-write: the
    /// caches and the reservations above see only this process's writes,
    /// so a second broker (or a second read-write store) is refused.
    private let writerLock: ExclusiveFileLock?

    /// Opens the database at `path`.
    /// - Throws: `StoreError.unavailable` naming the file when it cannot be opened,
    ///   is not a database, or holds a schema from a newer broker.
    public init(path: String, mode: Mode = .readWrite) throws(StoreError) {
        self.path = path
        self.mode = mode
        var configuration = Configuration()
        configuration.foreignKeysEnabled = true
        configuration.busyMode = .timeout(5)
        configuration.label = "broker"
        do {
            switch mode {
            case .readWrite:
                writerLock = try Self.lockForWriting(path)
                configuration.journalMode = .wal
                let pool = try DatabasePool(path: path, configuration: configuration)
                let migrator = Migrations.migrator
                let superseded = try pool.read { db in try migrator.hasBeenSuperseded(db) }
                if superseded {
                    let applied = try pool.read { db in try Self.appliedIdentifiers(db) }
                    throw StoreError.unavailable("\(path): the schema (\(applied.joined(separator: ", "))) is from a newer broker than this one (knows \(migrator.migrations.joined(separator: ", "))); refusing to use it")
                }
                try migrator.migrate(pool)
                // GRDB sets WAL's usual synchronous = NORMAL, under which a
                // commit is safe from the broker crashing but not from the
                // machine losing power: the last acknowledged connects, users
                // or desktops could be gone after the reboot while the
                // gateways (which fdatasync each change) still hold the
                // rules. FULL syncs the WAL at every commit, as PostgreSQL's
                // default does.
                try pool.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA synchronous = FULL") }
                let sessions = ReadCache<String, AuthenticatedSession>(), readings = ReadCache<Int64, ConnectReading>()
                pool.add(transactionObserver: ReadCacheInvalidator(tables: ReadCacheInvalidator.sessionTables, invalidate: sessions.invalidate),
                         extent: .databaseLifetime)
                pool.add(transactionObserver: ReadCacheInvalidator(tables: ReadCacheInvalidator.readingTables, invalidate: readings.invalidate),
                         extent: .databaseLifetime)
                self.sessions = sessions
                self.readings = readings
                database = pool
            case .readOnly:
                guard FileManager.default.fileExists(atPath: path) else {
                    throw StoreError.unavailable("\(path): no such database file")
                }
                configuration.readonly = true
                let queue = try DatabaseQueue(path: path, configuration: configuration)
                // Touch the file now so that garbage is reported at open.
                _ = try queue.read { db in try Int.fetchOne(db.cachedStatement(sql: "SELECT count(*) FROM sqlite_master")) }
                sessions = nil
                readings = nil
                writerLock = nil
                database = queue
            }
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError.unavailable("\(path): \(Self.describe(error))")
        }
        identity = FileIdentity(path: path)
    }

    /// Takes `PATH.lock`, or names who holds it.
    private static func lockForWriting(_ path: String) throws(StoreError) -> ExclusiveFileLock {
        let lockPath = path + ".lock"
        let outcome: ExclusiveFileLock.Outcome
        do {
            outcome = try ExclusiveFileLock.acquire(lockPath)
        } catch {
            throw StoreError.unavailable("\(path): cannot take its lock file \(lockPath): \(error)")
        }
        switch outcome {
        case .acquired(let lock):
            return lock
        case .held(let pid):
            let holder = pid.map { pid in pid == getpid() ? "this process" : "process \(pid)" } ?? "another process"
            throw StoreError.unavailable("\(path) is in use by \(holder) (it holds \(lockPath)): an SQLite database serves one broker; stop that one first, or use PostgreSQL for several brokers")
        }
    }

    /// Closes the database at shutdown: SQLite folds the WAL back into the
    /// file, so the file alone holds everything once the broker stopped.
    /// Calls after this fail with `.unavailable`.
    public func close() {
        if let pool = database as? DatabasePool {
            try? pool.writeWithoutTransaction { db in _ = try db.checkpoint(.truncate) }
            try? pool.close()
        } else if let queue = database as? DatabaseQueue {
            try? queue.close()
        }
    }

    /// How the writer's connection syncs at commit (`PRAGMA synchronous`:
    /// 2, FULL, for a store opened read-write: every commit is on the disk
    /// before it is acknowledged).
    func synchronousSetting() async throws(StoreError) -> Int {
        guard mode == .readWrite else { throw StoreError.unavailable("\(path) is open read-only") }
        do {
            return try await database.writeWithoutTransaction { db in try Int.fetchOne(db, sql: "PRAGMA synchronous") ?? -1 }
        } catch {
            throw Self.storeError(error, path: path)
        }
    }

    // MARK: Schema and health

    public func schema() async throws(StoreError) -> SchemaStatus {
        try await read { db in
            SchemaStatus(applied: try Self.appliedIdentifiers(db), known: Migrations.migrator.migrations)
        }
    }

    /// Checks that the file is still the one opened, can be opened afresh and read,
    /// and that the open connection answers.
    public func health() async -> StoreHealth {
        // Opening a file and a connection blocks: not on Swift's cooperative threads.
        let probed: Result<[String], StoreHealthProblem> = await BlockingExecutor.shared.run { [path, identity] in
            if !FileManager.default.fileExists(atPath: path) {
                return .failure(StoreHealthProblem(text: "database file \(path) is missing (removed while the broker runs?)"))
            }
            if let identity, let now = FileIdentity(path: path), now != identity {
                return .failure(StoreHealthProblem(text: "database file \(path) was replaced since the broker opened it; restart the broker"))
            }
            do {
                // A fresh read-only connection sees what a restart would see: a file that
                // became unreadable or corrupt fails here even though open handles still work.
                var configuration = Configuration()
                configuration.readonly = true
                configuration.busyMode = .timeout(2)
                let probe = try DatabaseQueue(path: path, configuration: configuration)
                defer { try? probe.close() }
                return .success(try probe.read { db in try Self.appliedIdentifiers(db) })
            } catch {
                return .failure(StoreHealthProblem(text: "database \(path) cannot be read: \(Self.describe(error))"))
            }
        }
        let applied: [String]
        switch probed {
        case .failure(let problem): return StoreHealth(location: location, problem: problem.text, schema: nil)
        case .success(let found): applied = found
        }
        do {
            _ = try await database.read { db in try Int.fetchOne(db.cachedStatement(sql: "SELECT 1")) }
            let schema = SchemaStatus(applied: applied, known: Migrations.migrator.migrations)
            return StoreHealth.judging(schema, location: location)
        } catch {
            return StoreHealth(location: location, problem: "database \(path) cannot be read: \(Self.describe(error))", schema: nil)
        }
    }

    private struct StoreHealthProblem: Error {
        let text: String
    }

    /// Every migration recorded in the file, known to this build or not, in the order applied.
    private static func appliedIdentifiers(_ db: Database) throws -> [String] {
        guard try db.tableExists("grdb_migrations") else { return [] }
        return try String.fetchAll(db.cachedStatement(sql: "SELECT identifier FROM grdb_migrations ORDER BY rowid"))
    }

    // MARK: Gateways

    private static let gatewayColumns = StoreRecords.gatewayColumns

    public func gateways() async throws(StoreError) -> [Gateway] {
        try await read { db in
            try Row.fetchAll(db.cachedStatement(sql: "SELECT \(Self.gatewayColumns) FROM gateway ORDER BY id")).map(StoreRecords.gateway)
        }
    }

    public func gateway(id: Int64) async throws(StoreError) -> Gateway {
        try await read { db in try Self.fetchGateway(db, id: id) }
    }

    public func createGateway(_ changes: GatewayChanges, now: Date) async throws(StoreError) -> Gateway {
        try await write { db in
            try StoreMessages.check { () throws(FieldError) in try changes.requireForCreate() }
            let gateway = changes.applied(to: .blank(now: now))
            try Self.checkGateway(db, gateway)
            try db.execute(sql: """
                INSERT INTO gateway (name, address, address_private, load_balancer_id, use_src_ip, forward_to,
                                     signature, notes, forwarding_path, created, updated)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [gateway.name, gateway.address, gateway.addressPrivate, gateway.loadBalancerID,
                                 gateway.useSourceIP.rawValue, gateway.forwardTo, gateway.signature, gateway.notes,
                                 gateway.forwardingPath.rawValue, now, now])
            return try Self.fetchGateway(db, id: db.lastInsertedRowID)
        }
    }

    public func updateGateway(id: Int64, _ changes: GatewayChanges, now: Date) async throws(StoreError) -> Gateway {
        try await write { db in
            let before = try Self.fetchGateway(db, id: id)
            var gateway = changes.applied(to: before)
            // Nothing to change (only unknown or read-only fields were sent): no write, `updated` stays.
            if gateway == before { return before }
            gateway.updated = now
            try Self.checkGateway(db, gateway)
            try db.execute(sql: """
                UPDATE gateway SET name = ?, address = ?, address_private = ?, load_balancer_id = ?, use_src_ip = ?,
                                   forward_to = ?, signature = ?, notes = ?, forwarding_path = ?, updated = ?
                WHERE id = ?
                """, arguments: [gateway.name, gateway.address, gateway.addressPrivate, gateway.loadBalancerID,
                                 gateway.useSourceIP.rawValue, gateway.forwardTo, gateway.signature, gateway.notes,
                                 gateway.forwardingPath.rawValue, now, id])
            return try Self.fetchGateway(db, id: id)
        }
    }

    public func deleteGateway(id: Int64) async throws(StoreError) {
        try await write { db in
            _ = try Self.fetchGateway(db, id: id)
            let desktops = try Int.fetchOne(db.cachedStatement(sql: "SELECT count(*) FROM desktop WHERE gateway_id = ?"), arguments: [id]) ?? 0
            let rules = try Int.fetchOne(db.cachedStatement(sql: "SELECT count(*) FROM gateway_rule WHERE gateway_id = ?"), arguments: [id]) ?? 0
            if let refusal = StoreMessages.gatewayInUse(id, desktops: desktops, rules: rules) { throw refusal }
            try db.cachedStatement(sql: "DELETE FROM gateway WHERE id = ?").execute(arguments: [id])
        }
    }

    public func recordGatewayState(id: Int64, online: Bool, version: String?, heartbeat: Date?) async throws(StoreError) {
        try await write { db in
            _ = try Self.fetchGateway(db, id: id)
            try db.execute(sql: """
                UPDATE gateway SET online = ?, version = coalesce(?, version),
                                   last_heartbeat = coalesce(?, last_heartbeat)
                WHERE id = ?
                """, arguments: [online, version, heartbeat, id])
        }
    }

    public func enrollGateway(id: Int64, key: ControlKey, now: Date) async throws(StoreError) {
        try await write { db in
            _ = try Self.fetchGateway(db, id: id)
            try db.execute(sql: "UPDATE gateway SET control_key = ?, key_fingerprint = ?, updated = ? WHERE id = ?",
                           arguments: [key.text, Secrets.fingerprint(key), now, id])
        }
    }

    public func controlKey(gatewayID: Int64) async throws(StoreError) -> ControlKey? {
        let text = try await read { db in
            try String.fetchOne(db.cachedStatement(sql: "SELECT control_key FROM gateway WHERE id = ?"), arguments: [gatewayID])
        }
        return try StoreMessages.controlKey(text, gatewayID: gatewayID, location: path)
    }

    public func registerGateway(id: Int64, _ registration: GatewayRegistration, now: Date) async throws(StoreError) -> [String] {
        try await write { db in
            _ = try Self.fetchGateway(db, id: id)
            try StoreMessages.check { () throws(FieldError) in try registration.validate() }
            try db.execute(sql: """
                UPDATE gateway SET online = 1, version = ?, control_url = ?, port_first = ?, port_last = ?,
                                   last_heartbeat = ?, control_certificate = ?
                WHERE id = ?
                """, arguments: [registration.version, registration.controlURL, registration.portRange.first,
                                 registration.portRange.last, now, registration.controlCertificate, id])
            var known = Set(try String.fetchAll(db.cachedStatement(sql: "SELECT id FROM gateway_rule WHERE gateway_id = ?"), arguments: [id]))
            // Rules a connect is pushing: the gateway may already hold them (issue 15's race).
            let cutoff = now.addingTimeInterval(-PendingRule.lifetime)
            self.pending.withLock { pending in
                pending = pending.filter { $0.value.since > cutoff }
                for (ruleID, entry) in pending where entry.gatewayID == id { known.insert(ruleID) }
            }
            return StoreMessages.keptRules(reported: registration.ruleIDs, known: known)
        }
    }

    public func recordHeartbeat(id: Int64, load: Double, sessions: Int, now: Date) async throws(StoreError) {
        try await write { db in
            _ = try Self.fetchGateway(db, id: id)
            try db.execute(sql: "UPDATE gateway SET online = 1, last_heartbeat = ?, load = ?, active_sessions = ? WHERE id = ?",
                           arguments: [StoredDate.text(now), load, sessions, id])
        }
    }

    @discardableResult
    public func markGatewaysOffline(heartbeatBefore cutoff: Date) async throws(StoreError) -> [Int64] {
        try await write { db in
            let stale = try Int64.fetchAll(db, sql: """
                SELECT id FROM gateway WHERE online AND (last_heartbeat IS NULL OR last_heartbeat < ?) ORDER BY id
                """, arguments: [cutoff])
            for id in stale {
                try db.cachedStatement(sql: "UPDATE gateway SET online = 0 WHERE id = ?").execute(arguments: [id])
            }
            return stale
        }
    }

    private static func fetchGateway(_ db: Database, id: Int64) throws -> Gateway {
        guard let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT \(gatewayColumns) FROM gateway WHERE id = ?"), arguments: [id]) else {
            throw StoreMessages.noGateway(id)
        }
        return try StoreRecords.gateway(row)
    }

    private static func checkGateway(_ db: Database, _ gateway: Gateway) throws {
        try StoreMessages.check { () throws(FieldError) in try gateway.validate() }
        if let clusterID = gateway.loadBalancerID {
            try requireRow(db, table: "gateway_cluster", id: clusterID, field: "load_balancer_id", what: "gateway cluster")
        }
        try requireUnique(db, table: "gateway", column: "name", value: gateway.name, except: gateway.id, what: "a gateway named")
        try requireUnique(db, table: "gateway", column: "address", value: gateway.address, except: gateway.id, what: "a gateway with address")
    }


    // MARK: Rules

    public func rules(gatewayID: Int64?) async throws(StoreError) -> [GatewayRule] {
        try await read { db in
            let rows: [Row]
            if let gatewayID {
                rows = try Row.fetchAll(db.cachedStatement(sql: "SELECT * FROM gateway_rule WHERE gateway_id = ? ORDER BY created, id"), arguments: [gatewayID])
            } else {
                rows = try Row.fetchAll(db.cachedStatement(sql: "SELECT * FROM gateway_rule ORDER BY created, id"))
            }
            return try rows.map(StoreRecords.rule)
        }
    }

    public func rule(id: String) async throws(StoreError) -> GatewayRule {
        try await read { db in
            guard let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT * FROM gateway_rule WHERE id = ?"), arguments: [id]) else {
                throw StoreMessages.noRule(id)
            }
            return try StoreRecords.rule(row)
        }
    }

    public func rules(connectionID: String) async throws(StoreError) -> [GatewayRule] {
        try await read { db in
            try Row.fetchAll(db.cachedStatement(sql: "SELECT * FROM gateway_rule WHERE connection_id = ? ORDER BY id = connection_id DESC, gateway_id, id"),
                             arguments: [connectionID]).map(StoreRecords.rule)
        }
    }

    public func ruleCounts() async throws(StoreError) -> [Int64: Int] {
        try await read { db in
            var counts: [Int64: Int] = [:]
            for row in try Row.fetchAll(db.cachedStatement(sql: "SELECT gateway_id, count(*) AS n FROM gateway_rule GROUP BY gateway_id")) {
                counts[row["gateway_id"]] = row["n"]
            }
            return counts
        }
    }

    public func connectReading(desktopID: Int64) async throws(StoreError) -> ConnectReading {
        // A reading with rule counts is never cached: the counts change with every connect.
        guard let readings else { return try await readConnect(desktopID: desktopID) }
        let (cached, generation) = readings.lookup(desktopID)
        if let cached { return cached }
        let reading = try await readConnect(desktopID: desktopID)
        if !ConnectReading.countsRules(desktop: reading.desktop, cluster: reading.cluster) {
            readings.insert(desktopID, reading, ifGeneration: generation)
        }
        return reading
    }

    private func readConnect(desktopID: Int64) async throws(StoreError) -> ConnectReading {
        let path = self.path
        return try await read { db in
            let desktop = try Self.fetchDesktop(db, id: desktopID)
            // A cluster that is gone is the chooser's to report (no route), as with a gateway.
            let cluster = try desktop.loadBalancerID.flatMap { id in
                try Row.fetchOne(db.cachedStatement(sql: "SELECT \(Self.clusterColumns) FROM gateway_cluster WHERE id = ?"), arguments: [id])
            }.map(StoreRecords.cluster)
            let candidates = ConnectReading.candidates(of: desktop)
            var gateways: [Gateway] = []
            var controlKeys: [Int64: ControlKey] = [:]
            for row in try Row.fetchAll(db.cachedStatement(sql: """
                SELECT \(Self.gatewayWithKeyColumns) FROM gateway WHERE id = ? OR load_balancer_id = ? ORDER BY id
                """), arguments: [candidates.gatewayID, candidates.clusterID]) {
                let (gateway, key) = try Self.gatewayAndKey(row, path: path)
                gateways.append(gateway)
                controlKeys[gateway.id] = key
            }
            var ruleCounts: [Int64: Int] = [:]
            if let cluster, ConnectReading.countsRules(desktop: desktop, cluster: cluster) {
                for row in try Row.fetchAll(db.cachedStatement(sql: """
                    SELECT r.gateway_id, count(*) AS n FROM gateway_rule r JOIN gateway g ON g.id = r.gateway_id
                    WHERE g.load_balancer_id = ? GROUP BY r.gateway_id
                    """), arguments: [cluster.id]) {
                    ruleCounts[row["gateway_id"]] = row["n"]
                }
                // Rules being pushed count too: connects that arrive together
                // spread over the cluster instead of all taking the gateway
                // that had the fewest before any of them was stored.
                let members = Set(gateways.map(\.id))
                self.pending.withLock { pending in
                    for entry in pending.values where members.contains(entry.gatewayID) { ruleCounts[entry.gatewayID, default: 0] += 1 }
                }
            }
            return ConnectReading(desktop: desktop, gateways: gateways, cluster: cluster, ruleCounts: ruleCounts, controlKeys: controlKeys)
        }
    }

    public func disconnectReading(ruleID: String) async throws(StoreError) -> DisconnectReading {
        let path = self.path
        return try await read { db in
            // The rule itself is one of its connection's: read and decoded once, there.
            guard let connectionID = try String.fetchOne(db.cachedStatement(sql: "SELECT connection_id FROM gateway_rule WHERE id = ?"),
                                                         arguments: [ruleID]) else {
                throw StoreMessages.noRule(ruleID)
            }
            var placed: [DisconnectReading.Placed] = []
            for row in try Row.fetchAll(db.cachedStatement(sql: "SELECT * FROM gateway_rule WHERE connection_id = ? ORDER BY id = connection_id DESC, gateway_id, id"),
                                        arguments: [connectionID]) {
                let rule = try StoreRecords.rule(row)
                guard let gatewayRow = try Row.fetchOne(db.cachedStatement(sql: "SELECT \(Self.gatewayWithKeyColumns) FROM gateway WHERE id = ?"),
                                                        arguments: [rule.gatewayID]) else {
                    throw StoreMessages.noGateway(rule.gatewayID)
                }
                let (gateway, key) = try Self.gatewayAndKey(gatewayRow, path: path)
                placed.append(.init(rule: rule, gateway: gateway, controlKey: key))
            }
            guard let rule = placed.first(where: { $0.rule.id == ruleID })?.rule else { throw StoreMessages.noRule(ruleID) }
            return DisconnectReading(rule: rule, rules: placed)
        }
    }

    /// A gateway's columns and then its control key.
    private static let gatewayWithKeyColumns = "\(gatewayColumns), control_key"

    /// A row of `gatewayWithKeyColumns`: the gateway, and its key when it is enrolled.
    private static func gatewayAndKey(_ row: Row, path: String) throws -> (Gateway, ControlKey?) {
        let gateway = try StoreRecords.gateway(row)
        return (gateway, try StoreMessages.controlKey(row["control_key"], gatewayID: gateway.id, location: path))
    }

    public func createRules(_ rules: [GatewayRule]) async throws(StoreError) {
        try await write { db in
            for rule in rules {
                // Only whether it exists: decoding the whole row was 2 % of a connect.
                guard try Int.fetchOne(db.cachedStatement(sql: "SELECT 1 FROM gateway WHERE id = ?"), arguments: [rule.gatewayID]) != nil else {
                    throw StoreMessages.noGateway(rule.gatewayID)
                }
                let push = StoreRecords.pushText(rule)
                try db.cachedStatement(sql: """
                    INSERT INTO gateway_rule (id, gateway_id, desktop_id, user_id, protocol_name, push, port, created, connection_id)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """).execute(arguments: [rule.id, rule.gatewayID, rule.desktopID, rule.userID, rule.protocolName, push,
                                     rule.port, StoredDate.text(rule.created), rule.connectionID])
            }
            // Inside the writer's transaction: a registration sees the rule stored or still reserved.
            self.pending.withLock { pending in
                for rule in rules { pending.removeValue(forKey: rule.id) }
            }
        }
    }

    public func reserveRules(_ rules: [PendingRule], now: Date) async throws(StoreError) {
        guard mode == .readWrite else { throw StoreError.unavailable("\(path) is open read-only") }
        pending.withLock { pending in
            for rule in rules { pending[rule.id] = (rule.gatewayID, now) }
        }
    }

    public func releaseRules(ids: [String]) async throws(StoreError) {
        pending.withLock { pending in
            for id in ids { pending.removeValue(forKey: id) }
        }
    }

    public func updateRulePort(id: String, port: Int) async throws(StoreError) {
        try await write { db in
            try db.cachedStatement(sql: "UPDATE gateway_rule SET port = ? WHERE id = ?").execute(arguments: [port, id])
            if db.changesCount == 0 {
                throw StoreMessages.noRule(id)
            }
        }
    }

    public func deleteRule(id: String) async throws(StoreError) {
        try await write { db in
            try db.cachedStatement(sql: "DELETE FROM gateway_rule WHERE id = ?").execute(arguments: [id])
            if db.changesCount == 0 {
                throw StoreMessages.noRule(id)
            }
        }
    }

    public func deleteRules(connectionID: String) async throws(StoreError) {
        try await write { db in
            try db.cachedStatement(sql: "DELETE FROM gateway_rule WHERE connection_id = ?").execute(arguments: [connectionID])
            if db.changesCount == 0 {
                throw StoreMessages.noConnection(connectionID)
            }
        }
    }


    // MARK: Gateway clusters

    private static let clusterColumns = StoreRecords.clusterColumns

    public func gatewayClusters() async throws(StoreError) -> [GatewayCluster] {
        try await read { db in
            try Row.fetchAll(db.cachedStatement(sql: "SELECT \(Self.clusterColumns) FROM gateway_cluster ORDER BY id")).map(StoreRecords.cluster)
        }
    }

    public func gatewayCluster(id: Int64) async throws(StoreError) -> GatewayCluster {
        try await read { db in try Self.fetchCluster(db, id: id) }
    }

    public func createGatewayCluster(_ changes: GatewayClusterChanges, now: Date) async throws(StoreError) -> GatewayCluster {
        try await write { db in
            try StoreMessages.check { () throws(FieldError) in try changes.requireForCreate() }
            let cluster = changes.applied(to: .blank(now: now))
            try Self.checkCluster(db, cluster)
            try db.execute(sql: """
                INSERT INTO gateway_cluster (name, address, load_balance_via, use_src_ip, notes, created, updated)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                """, arguments: [cluster.name, cluster.address, cluster.loadBalanceVia.rawValue,
                                 cluster.useSourceIP.rawValue, cluster.notes, now, now])
            return try Self.fetchCluster(db, id: db.lastInsertedRowID)
        }
    }

    public func updateGatewayCluster(id: Int64, _ changes: GatewayClusterChanges, now: Date) async throws(StoreError) -> GatewayCluster {
        try await write { db in
            let before = try Self.fetchCluster(db, id: id)
            var cluster = changes.applied(to: before)
            // Nothing to change (only unknown or read-only fields were sent): no write, `updated` stays.
            if cluster == before { return before }
            cluster.updated = now
            try Self.checkCluster(db, cluster)
            try db.execute(sql: """
                UPDATE gateway_cluster SET name = ?, address = ?, load_balance_via = ?, use_src_ip = ?, notes = ?, updated = ?
                WHERE id = ?
                """, arguments: [cluster.name, cluster.address, cluster.loadBalanceVia.rawValue,
                                 cluster.useSourceIP.rawValue, cluster.notes, now, id])
            return try Self.fetchCluster(db, id: id)
        }
    }

    public func deleteGatewayCluster(id: Int64) async throws(StoreError) {
        try await write { db in
            _ = try Self.fetchCluster(db, id: id)
            let gateways = try Int.fetchOne(db.cachedStatement(sql: "SELECT count(*) FROM gateway WHERE load_balancer_id = ?"), arguments: [id]) ?? 0
            let desktops = try Int.fetchOne(db.cachedStatement(sql: "SELECT count(*) FROM desktop WHERE load_balancer_id = ?"), arguments: [id]) ?? 0
            if let refusal = StoreMessages.clusterInUse(id, gateways: gateways, desktops: desktops) { throw refusal }
            try db.cachedStatement(sql: "DELETE FROM gateway_cluster WHERE id = ?").execute(arguments: [id])
        }
    }

    private static func fetchCluster(_ db: Database, id: Int64) throws -> GatewayCluster {
        guard let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT \(clusterColumns) FROM gateway_cluster WHERE id = ?"), arguments: [id]) else {
            throw StoreMessages.noCluster(id)
        }
        return try StoreRecords.cluster(row)
    }

    private static func checkCluster(_ db: Database, _ cluster: GatewayCluster) throws {
        try StoreMessages.check { () throws(FieldError) in try cluster.validate() }
        try requireUnique(db, table: "gateway_cluster", column: "name", value: cluster.name, except: cluster.id, what: "a gateway cluster named")
    }


    // MARK: Desktops

    private static let desktopColumns = StoreRecords.desktopColumns

    public func desktops() async throws(StoreError) -> [Desktop] {
        try await read { db in
            var protocols: [Int64: [DesktopProtocol]] = [:]
            for row in try Row.fetchAll(db.cachedStatement(sql: "SELECT desktop_id, name, port, transport FROM desktop_protocol ORDER BY desktop_id, position")) {
                protocols[row["desktop_id"], default: []].append(try StoreRecords.desktopProtocol(row))
            }
            var users: [Int64: [Int64]] = [:]
            for row in try Row.fetchAll(db.cachedStatement(sql: "SELECT desktop_id, user_id FROM desktop_user ORDER BY desktop_id, user_id")) {
                users[row["desktop_id"], default: []].append(row["user_id"])
            }
            return try Row.fetchAll(db.cachedStatement(sql: "SELECT \(Self.desktopColumns) FROM desktop ORDER BY id")).map { row in
                try StoreRecords.desktop(row, protocols: protocols[row["id"]] ?? [], users: users[row["id"]] ?? [])
            }
        }
    }

    public func desktop(id: Int64) async throws(StoreError) -> Desktop {
        try await read { db in try Self.fetchDesktop(db, id: id) }
    }

    public func createDesktop(_ changes: DesktopChanges, now: Date) async throws(StoreError) -> Desktop {
        try await write { db in
            try StoreMessages.check { () throws(FieldError) in try changes.requireForCreate() }
            let desktop = changes.applied(to: .blank(now: now))
            try Self.checkDesktop(db, desktop)
            try db.execute(sql: """
                INSERT INTO desktop (name, address, gateway_id, load_balancer_id, notes, created, updated)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                """, arguments: [desktop.name, desktop.address, desktop.gatewayID, desktop.loadBalancerID,
                                 desktop.notes, now, now])
            let id = db.lastInsertedRowID
            try Self.storeProtocols(db, desktopID: id, desktop.protocols)
            try Self.storeEntitlements(db, desktopID: id, desktop.users)
            return try Self.fetchDesktop(db, id: id)
        }
    }

    public func updateDesktop(id: Int64, _ changes: DesktopChanges, now: Date) async throws(StoreError) -> Desktop {
        try await write { db in
            let before = try Self.fetchDesktop(db, id: id)
            var desktop = changes.applied(to: before)
            // Nothing to change (only unknown or read-only fields were sent): no write, `updated` stays.
            if desktop == before { return before }
            desktop.updated = now
            try Self.checkDesktop(db, desktop)
            try db.execute(sql: """
                UPDATE desktop SET name = ?, address = ?, gateway_id = ?, load_balancer_id = ?, notes = ?, updated = ?
                WHERE id = ?
                """, arguments: [desktop.name, desktop.address, desktop.gatewayID, desktop.loadBalancerID,
                                 desktop.notes, now, id])
            if changes.protocols != nil {
                try db.cachedStatement(sql: "DELETE FROM desktop_protocol WHERE desktop_id = ?").execute(arguments: [id])
                try Self.storeProtocols(db, desktopID: id, desktop.protocols)
            }
            if changes.users != nil {
                try db.cachedStatement(sql: "DELETE FROM desktop_user WHERE desktop_id = ?").execute(arguments: [id])
                try ReadCacheInvalidator.notify(db, table: "desktop_user")
                try Self.storeEntitlements(db, desktopID: id, desktop.users)
            }
            return try Self.fetchDesktop(db, id: id)
        }
    }

    public func deleteDesktop(id: Int64) async throws(StoreError) {
        try await write { db in
            _ = try Self.fetchDesktop(db, id: id)
            let rules = try Int.fetchOne(db.cachedStatement(sql: "SELECT count(*) FROM gateway_rule WHERE desktop_id = ?"), arguments: [id]) ?? 0
            if let refusal = StoreMessages.desktopInUse(id, rules: rules) { throw refusal }
            try db.cachedStatement(sql: "DELETE FROM desktop WHERE id = ?").execute(arguments: [id])
        }
    }

    private static func fetchDesktop(_ db: Database, id: Int64) throws -> Desktop {
        guard let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT \(desktopColumns) FROM desktop WHERE id = ?"), arguments: [id]) else {
            throw StoreMessages.noDesktop(id)
        }
        let protocols = try Row.fetchAll(db.cachedStatement(sql: "SELECT name, port, transport FROM desktop_protocol WHERE desktop_id = ? ORDER BY position"),
                                         arguments: [id]).map(StoreRecords.desktopProtocol)
        let users = try Int64.fetchAll(db.cachedStatement(sql: "SELECT user_id FROM desktop_user WHERE desktop_id = ? ORDER BY user_id"), arguments: [id])
        return try StoreRecords.desktop(row, protocols: protocols, users: users)
    }

    private static func checkDesktop(_ db: Database, _ desktop: Desktop) throws {
        try StoreMessages.check { () throws(FieldError) in try desktop.validate() }
        if let gatewayID = desktop.gatewayID {
            try requireRow(db, table: "gateway", id: gatewayID, field: "gateway_id", what: "gateway")
        }
        if let clusterID = desktop.loadBalancerID {
            try requireRow(db, table: "gateway_cluster", id: clusterID, field: "load_balancer_id", what: "gateway cluster")
        }
        try requireUnique(db, table: "desktop", column: "name", value: desktop.name, except: desktop.id, what: "a desktop named")
        for user in desktop.users {
            try requireRow(db, table: "user_account", id: user, field: "users", what: "user")
        }
    }

    private static func storeEntitlements(_ db: Database, desktopID: Int64, _ users: [Int64]) throws {
        for user in users {
            try db.cachedStatement(sql: "INSERT INTO desktop_user (desktop_id, user_id) VALUES (?, ?)").execute(arguments: [desktopID, user])
        }
        if !users.isEmpty { try ReadCacheInvalidator.notify(db, table: "desktop_user") }
    }

    private static func storeProtocols(_ db: Database, desktopID: Int64, _ protocols: [DesktopProtocol]) throws {
        for (position, entry) in protocols.enumerated() {
            try db.execute(sql: "INSERT INTO desktop_protocol (desktop_id, position, name, port, transport) VALUES (?, ?, ?, ?, ?)",
                           arguments: [desktopID, position, entry.name, entry.port, entry.transport.rawValue])
        }
    }



    // MARK: Users

    private static let userColumns = StoreRecords.userColumns

    public func users() async throws(StoreError) -> [User] {
        try await read { db in
            try Row.fetchAll(db.cachedStatement(sql: "SELECT \(Self.userColumns) FROM user_account ORDER BY id")).map(StoreRecords.user)
        }
    }

    public func user(id: Int64) async throws(StoreError) -> User {
        try await read { db in try Self.fetchUser(db, id: id) }
    }

    public func userCount() async throws(StoreError) -> Int {
        try await read { db in try Int.fetchOne(db.cachedStatement(sql: "SELECT count(*) FROM user_account")) ?? 0 }
    }

    public func createUser(_ changes: UserChanges, now: Date) async throws(StoreError) -> User {
        try await write { db in
            try StoreMessages.check { () throws(FieldError) in try changes.requireForCreate() }
            let user = changes.applied(to: .blank(now: now))
            try Self.checkUser(db, user)
            try db.execute(sql: """
                INSERT INTO user_account (login, password_hash, display_name, role, enabled, created, updated)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                """, arguments: [user.login, changes.passwordHash, user.displayName, user.role.rawValue,
                                 user.enabled, now, now])
            return try Self.fetchUser(db, id: db.lastInsertedRowID)
        }
    }

    public func updateUser(id: Int64, _ changes: UserChanges, now: Date) async throws(StoreError) -> User {
        try await write { db in
            let before = try Self.fetchUser(db, id: id)
            var user = changes.applied(to: before)
            if user == before && changes.passwordHash == nil { return before }
            user.updated = now
            try Self.checkUser(db, user)
            if try StoreMessages.removesAdmin(before: before, after: user) && Self.activeAdminCount(db) <= 1 {
                throw StoreMessages.lastAdminChange(id)
            }
            try db.execute(sql: """
                UPDATE user_account SET login = ?, display_name = ?, role = ?, enabled = ?, updated = ?,
                                        password_hash = coalesce(?, password_hash)
                WHERE id = ?
                """, arguments: [user.login, user.displayName, user.role.rawValue, user.enabled, now,
                                 changes.passwordHash, id])
            if changes.passwordHash != nil || !user.enabled {
                try db.cachedStatement(sql: "DELETE FROM user_session WHERE user_id = ?").execute(arguments: [id])
                try ReadCacheInvalidator.notify(db, table: "user_session")
            }
            return try Self.fetchUser(db, id: id)
        }
    }

    public func deleteUser(id: Int64) async throws(StoreError) {
        try await write { db in
            let user = try Self.fetchUser(db, id: id)
            if try StoreMessages.removesAdmin(before: user, after: nil) && Self.activeAdminCount(db) <= 1 {
                throw StoreMessages.lastAdminDelete(id)
            }
            try db.cachedStatement(sql: "DELETE FROM user_account WHERE id = ?").execute(arguments: [id])
        }
    }

    public func credentials(login: String) async throws(StoreError) -> Credentials? {
        try await read { db in
            guard let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT \(Self.userColumns), password_hash FROM user_account WHERE login = ? COLLATE NOCASE"),
                                             arguments: [login]) else { return nil }
            return Credentials(user: try StoreRecords.user(row), passwordHash: row["password_hash"])
        }
    }

    private static func fetchUser(_ db: Database, id: Int64) throws -> User {
        guard let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT \(userColumns) FROM user_account WHERE id = ?"), arguments: [id]) else {
            throw StoreMessages.noUser(id)
        }
        return try StoreRecords.user(row)
    }

    private static func checkUser(_ db: Database, _ user: User) throws {
        try StoreMessages.check { () throws(FieldError) in try user.validate() }
        try requireUnique(db, table: "user_account", column: "login", value: user.login, except: user.id, what: "a user with login")
    }

    private static func activeAdminCount(_ db: Database) throws -> Int {
        try Int.fetchOne(db.cachedStatement(sql: "SELECT count(*) FROM user_account WHERE role = 'admin' AND enabled")) ?? 0
    }


    // MARK: Sessions

    public func createSession(_ session: Session) async throws(StoreError) {
        try await write { db in
            try db.execute(sql: """
                INSERT INTO user_session (token_hash, user_id, created, expires, client_address, login_gateway_id)
                VALUES (?, ?, ?, ?, ?, ?)
                """, arguments: [session.tokenHash, session.userID, session.created, session.expires, session.clientAddress,
                                 session.loginGatewayID])
            // No `ReadCacheInvalidator.notify`: a new session changes none
            // cached (only sessions found are), so logins keep the cache.
        }
    }

    public func session(tokenHash: String, now: Date) async throws(StoreError) -> AuthenticatedSession? {
        guard let sessions else { return try await readSession(tokenHash: tokenHash, now: now) }
        let (cached, generation) = sessions.session(tokenHash, now: now)
        if let cached { return cached }
        let found = try await readSession(tokenHash: tokenHash, now: now)
        if let found { sessions.insert(tokenHash, found, ifGeneration: generation) }
        return found
    }

    /// How many sessions and connect readings the caches hold (tests).
    var cachedSessions: Int { sessions?.count ?? 0 }
    var cachedReadings: Int { readings?.count ?? 0 }

    private func readSession(tokenHash: String, now: Date) async throws(StoreError) -> AuthenticatedSession? {
        try await read { db in
            guard let row = try Row.fetchOne(db.cachedStatement(sql: """
                SELECT s.token_hash, s.user_id, s.created AS session_created, s.expires, s.client_address, s.login_gateway_id,
                       u.id, u.login, u.display_name, u.role, u.enabled, u.created, u.updated
                FROM user_session s JOIN user_account u ON u.id = s.user_id
                WHERE s.token_hash = ? AND s.expires > ? AND u.enabled
                """), arguments: [tokenHash, StoredDate.text(now)]) else { return nil }
            return try StoreRecords.authenticatedSession(row)
        }
    }

    public func deleteSession(tokenHash: String) async throws(StoreError) {
        let sessions = self.sessions
        try await write { db in
            try db.cachedStatement(sql: "DELETE FROM user_session WHERE token_hash = ?").execute(arguments: [tokenHash])
            // A logout changes that one session: its entry alone goes, after
            // the commit (a read that starts then sees the row gone), so the
            // other users' sessions stay cached.
            db.afterNextTransaction(onCommit: { _ in sessions?.remove(tokenHash) })
        }
    }

    @discardableResult
    public func deleteExpiredSessions(now: Date) async throws(StoreError) -> Int {
        try await write { db in
            try db.cachedStatement(sql: "DELETE FROM user_session WHERE expires <= ?").execute(arguments: [now])
            if db.changesCount > 0 { try ReadCacheInvalidator.notify(db, table: "user_session") }
            return db.changesCount
        }
    }

    // MARK: Helpers

    private func read<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws(StoreError) -> T {
        do {
            return try await database.read(body)
        } catch {
            throw Self.storeError(error, path: path)
        }
    }

    private func write<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws(StoreError) -> T {
        guard mode == .readWrite else {
            throw StoreError.unavailable("\(path) is open read-only")
        }
        do {
            return try await database.write(body)
        } catch {
            throw Self.storeError(error, path: path)
        }
    }

    private static func storeError(_ error: any Error, path: String) -> StoreError {
        if let error = error as? StoreError { return error }
        if let error = error as? FieldError { return .invalid(error) }
        if let error = error as? DatabaseError, error.resultCode == .SQLITE_CONSTRAINT {
            // The explicit checks come first; this is the safety net under them.
            return .conflict(field: constraintField(error.message ?? ""), message: "conflicts with a stored row (\(error.message ?? "constraint failed"))")
        }
        return .unavailable("database \(path): \(describe(error))")
    }

    /// "UNIQUE constraint failed: gateway.name" → "name".
    private static func constraintField(_ message: String) -> String {
        guard let dot = message.lastIndex(of: ".") else { return "id" }
        return String(message[message.index(after: dot)...])
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? DatabaseError {
            return "\(error.message ?? "SQLite error") (SQLite code \(error.extendedResultCode.rawValue))"
        }
        return "\(error)"
    }


    private static func requireRow(_ db: Database, table: String, id: Int64, field: String, what: String) throws {
        if try Int.fetchOne(db.cachedStatement(sql: "SELECT 1 FROM \(table) WHERE id = ?"), arguments: [id]) == nil {
            throw StoreMessages.missingReference(field: field, what: what, id: id)
        }
    }

    private static func requireUnique(_ db: Database, table: String, column: String, value: String, except id: Int64, what: String) throws {
        if let other = try Int64.fetchOne(db.cachedStatement(sql: "SELECT id FROM \(table) WHERE \(column) = ? COLLATE NOCASE AND id != ?"),
                                          arguments: [value, id]) {
            throw StoreMessages.duplicate(column: column, what: what, value: value, existing: other)
        }
    }
}

/// A file's device and inode numbers.
struct FileIdentity: Equatable {
    let device: UInt64
    let inode: UInt64

    init?(path: String) {
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: path),
              let device = (attributes[.systemNumber] as? NSNumber)?.uint64Value,
              let inode = (attributes[.systemFileNumber] as? NSNumber)?.uint64Value else { return nil }
        self.device = device
        self.inode = inode
    }
}

/// GRDB's rows as the shared row mapping reads them.
extension Row: StoreRecord {
    public func int64(_ column: String) throws -> Int64 { value(column) }
    public func optionalInt64(_ column: String) throws -> Int64? { optionalValue(column) }
    public func int(_ column: String) throws -> Int { value(column) }
    public func optionalInt(_ column: String) throws -> Int? { optionalValue(column) }
    public func string(_ column: String) throws -> String { value(column) }
    public func optionalString(_ column: String) throws -> String? { optionalValue(column) }
    public func bool(_ column: String) throws -> Bool { value(column) }
    public func date(_ column: String) throws -> Date { value(column) }
    public func optionalDate(_ column: String) throws -> Date? { optionalValue(column) }
    public func optionalDouble(_ column: String) throws -> Double? { optionalValue(column) }

    /// The position of a column named exactly `column` (the store's SQL names
    /// its columns in lower case). GRDB's lookup by name lowercases every
    /// column name it passes: for a gateway's 22 columns that was 2 % of a
    /// connect call (issue 15). Any other spelling goes to GRDB's lookup.
    private func exactPosition(_ column: String) -> Int? {
        var position = 0
        for name in columnNames {
            if name == column { return position }
            position += 1
        }
        return nil
    }

    private func value<Value: DatabaseValueConvertible>(_ column: String) -> Value {
        if let position = exactPosition(column) { return self[position] }
        return self[column]
    }

    private func optionalValue<Value: DatabaseValueConvertible>(_ column: String) -> Value? {
        if let position = exactPosition(column) { return self[position] }
        return self[column]
    }
}

/// A date as GRDB stores it (`yyyy-MM-dd HH:mm:ss.SSS`, UTC, rounded to the
/// nearest millisecond as its DateFormatter does), written by
/// `UTCTimestamp` without GRDB's DateFormatter: binding a date went through
/// ICU, 2 % of the broker's CPU per connect call (issue 15). The same text,
/// so stored dates compare and read back as before (tested against GRDB's own).
enum StoredDate {
    static func text(_ date: Date) -> String {
        let milliseconds = milliseconds(date)
        // 1970-01-01 to 9999-12-31: outside that (never in practice), GRDB's own.
        guard milliseconds >= 0, milliseconds < 253_402_300_800_000 else {
            return String.fromDatabaseValue(date.databaseValue) ?? ""
        }
        return UTCTimestamp.sqliteText(millisecondsSince1970: milliseconds)
    }

    /// The stored precision: whole milliseconds, rounded (what the text
    /// holds, so comparing these compares as the SQL compares the texts).
    static func milliseconds(_ date: Date) -> Int64 {
        Int64((date.timeIntervalSince1970 * 1000).rounded())
    }
}
