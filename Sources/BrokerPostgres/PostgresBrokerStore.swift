import BrokerCore
import ControlProtocol
import Foundation
import Logging
import NIOSSL
import PostgresNIO

/// The external store: one PostgreSQL database that several brokers share
/// (`leostream-broker --database postgres://...`), through postgres-nio's
/// connection pool.
///
/// Every write is one SERIALIZABLE transaction that validates, checks
/// references and uniqueness, and writes; a transaction that PostgreSQL
/// aborts because another broker's transaction raced it is run again from the
/// start, so two brokers behave as if their calls ran one after the other. A
/// call that throws changed nothing. Unique indexes on `lower(...)` keep
/// names and logins unique without regard to case under the explicit checks.
public final class PostgresBrokerStore: BrokerStore {
    public let settings: PostgresSettings
    public var location: String { settings.location }

    private let client: PostgresClient
    private let runner: Task<Void, Never>
    /// Gives up on a call after `callTimeout`, one timer for every call.
    private let watchdog = CallWatchdog(limit: PostgresBrokerStore.callTimeout)
    private let logger: Logger
    private let password: String?

    /// Creates the pool (no connection yet); `open()` connects and migrates.
    public init(settings: PostgresSettings, password: String?, logger: Logger, maximumConnections: Int = 16) throws(StoreError) {
        self.settings = settings
        self.logger = logger
        self.password = password
        var configuration: PostgresClient.Configuration
        let tls: PostgresClient.Configuration.TLS
        do {
            tls = try Self.tls(settings)
        } catch {
            throw StoreError.unavailable("database \(settings.location): \(error)")
        }
        if let folder = settings.socketDirectory {
            configuration = PostgresClient.Configuration(unixSocketPath: "\(folder)/.s.PGSQL.\(settings.port)", username: settings.user,
                                                         password: password, database: settings.database)
        } else {
            configuration = PostgresClient.Configuration(host: settings.host, port: settings.port, username: settings.user,
                                                         password: password, database: settings.database, tls: tls)
        }
        configuration.options.connectTimeout = .seconds(5)
        configuration.options.maximumConnections = maximumConnections
        configuration.options.minimumConnections = 0
        let client = PostgresClient(configuration: configuration, backgroundLogger: logger)
        self.client = client
        runner = Task { await client.run() }
    }

    private static func tls(_ settings: PostgresSettings) throws -> PostgresClient.Configuration.TLS {
        switch settings.tlsMode {
        case .disable: return .disable
        case .prefer: return .prefer(try tlsConfiguration(settings))
        case .require, .verifyFull: return .require(try tlsConfiguration(settings))
        }
    }

    /// TLS 1.2 or later; the certificate checked only with verify-full (as libpq does).
    private static func tlsConfiguration(_ settings: PostgresSettings) throws -> TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        if settings.tlsMode == .verifyFull {
            configuration.certificateVerification = .fullVerification
            if let file = settings.rootCertificate {
                configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(file))
            }
        } else {
            configuration.certificateVerification = .none
        }
        return configuration
    }

    /// Connects, and applies pending migrations under an advisory lock (two
    /// brokers starting at once migrate once). Refuses a database whose
    /// schema is from a newer broker, naming its migrations.
    /// - Parameter migrate: false opens without changing anything (`--info`, `--health`).
    public func open(migrate: Bool = true) async throws(StoreError) {
        if let problem = await probe() { throw StoreError.unavailable(problem) }
        if !migrate {
            _ = try await schema()
            return
        }
        let known = PostgresMigrations.all.map(\.identifier)
        try await transaction(isolation: "READ COMMITTED") { db in
            try await db.run("SELECT pg_advisory_xact_lock(\(PostgresMigrations.lockKey))")
            try await db.run(PostgresQuery(unsafeSQL: PostgresMigrations.ledger))
            let applied = try await db.rows("SELECT identifier FROM broker_migrations ORDER BY position").map { try $0.string("identifier") }
            let unknown = applied.filter { !known.contains($0) }
            if !unknown.isEmpty {
                throw StoreError.unavailable("database \(self.location): the schema (\(applied.joined(separator: ", "))) is from a newer broker than this one (knows \(known.joined(separator: ", "))); refusing to use it")
            }
            for migration in PostgresMigrations.all where !applied.contains(migration.identifier) {
                for statement in migration.statements {
                    try await db.run(PostgresQuery(unsafeSQL: statement))
                }
                try await db.run("INSERT INTO broker_migrations (identifier) VALUES (\(migration.identifier))")
            }
        }
    }

    /// Closes the pool's connections and stops its background task.
    public func close() async {
        watchdog.stop()
        runner.cancel()
        await runner.value
    }

    // MARK: Schema and health

    public func schema() async throws(StoreError) -> SchemaStatus {
        try await read { db in
            let exists = try await db.rows("SELECT to_regclass('broker_migrations') IS NOT NULL AS present")
            guard try exists.first?.bool("present") == true else {
                return SchemaStatus(applied: [], known: PostgresMigrations.all.map(\.identifier))
            }
            let applied = try await db.rows("SELECT identifier FROM broker_migrations ORDER BY position").map { try $0.string("identifier") }
            return SchemaStatus(applied: applied, known: PostgresMigrations.all.map(\.identifier))
        }
    }

    public func health() async -> StoreHealth {
        if let problem = await probe() {
            return StoreHealth(location: location, problem: problem, schema: nil)
        }
        do {
            let schema = try await schema()
            return StoreHealth.judging(schema, location: location)
        } catch {
            return StoreHealth(location: location, problem: error.description, schema: nil)
        }
    }

    // MARK: Gateways

    public func gateways() async throws(StoreError) -> [Gateway] {
        try await read { db in
            try await db.rows("SELECT \(unescaped: StoreRecords.gatewayColumns) FROM gateway ORDER BY id").map(StoreRecords.gateway)
        }
    }

    public func gateway(id: Int64) async throws(StoreError) -> Gateway {
        try await read { db in try await Self.fetchGateway(db, id: id) }
    }

    public func createGateway(_ changes: GatewayChanges, now: Date) async throws(StoreError) -> Gateway {
        try await write { db in
            try StoreMessages.check { () throws(FieldError) in try changes.requireForCreate() }
            let gateway = changes.applied(to: .blank(now: now))
            try await Self.checkGateway(db, gateway)
            let id = try await db.insertedID("""
                INSERT INTO gateway (name, address, address_private, load_balancer_id, use_src_ip, forward_to,
                                     signature, notes, forwarding_path, created, updated)
                VALUES (\(gateway.name), \(gateway.address), \(gateway.addressPrivate), \(gateway.loadBalancerID),
                        \(gateway.useSourceIP.rawValue), \(gateway.forwardTo), \(gateway.signature), \(gateway.notes),
                        \(gateway.forwardingPath.rawValue), \(now), \(now))
                RETURNING id
                """)
            return try await Self.fetchGateway(db, id: id)
        }
    }

    public func updateGateway(id: Int64, _ changes: GatewayChanges, now: Date) async throws(StoreError) -> Gateway {
        try await write { db in
            let before = try await Self.fetchGateway(db, id: id, lock: true)
            var gateway = changes.applied(to: before)
            if gateway == before { return before }
            gateway.updated = now
            try await Self.checkGateway(db, gateway)
            try await db.run("""
                UPDATE gateway SET name = \(gateway.name), address = \(gateway.address), address_private = \(gateway.addressPrivate),
                                   load_balancer_id = \(gateway.loadBalancerID), use_src_ip = \(gateway.useSourceIP.rawValue),
                                   forward_to = \(gateway.forwardTo), signature = \(gateway.signature), notes = \(gateway.notes),
                                   forwarding_path = \(gateway.forwardingPath.rawValue), updated = \(now)
                WHERE id = \(id)
                """)
            return try await Self.fetchGateway(db, id: id)
        }
    }

    public func deleteGateway(id: Int64) async throws(StoreError) {
        try await write { db in
            _ = try await Self.fetchGateway(db, id: id, lock: true)
            let desktops = try await db.count("SELECT count(*) AS n FROM desktop WHERE gateway_id = \(id)")
            let rules = try await db.count("SELECT count(*) AS n FROM gateway_rule WHERE gateway_id = \(id)")
            if let refusal = StoreMessages.gatewayInUse(id, desktops: desktops, rules: rules) { throw refusal }
            try await db.run("DELETE FROM gateway WHERE id = \(id)")
        }
    }

    public func recordGatewayState(id: Int64, online: Bool, version: String?, heartbeat: Date?) async throws(StoreError) {
        try await write { db in
            let changed = try await db.rows("""
                UPDATE gateway SET online = \(online), version = coalesce(\(version), version),
                                   last_heartbeat = coalesce(\(heartbeat), last_heartbeat)
                WHERE id = \(id) RETURNING id
                """)
            if changed.isEmpty { throw StoreMessages.noGateway(id) }
        }
    }

    public func enrollGateway(id: Int64, key: ControlKey, now: Date) async throws(StoreError) {
        try await write { db in
            let changed = try await db.rows("""
                UPDATE gateway SET control_key = \(key.text), key_fingerprint = \(Secrets.fingerprint(key)), updated = \(now)
                WHERE id = \(id) RETURNING id
                """)
            if changed.isEmpty { throw StoreMessages.noGateway(id) }
        }
    }

    public func controlKey(gatewayID: Int64) async throws(StoreError) -> ControlKey? {
        let text = try await read { db in
            try await db.rows("SELECT control_key FROM gateway WHERE id = \(gatewayID)").first?.optionalString("control_key")
        }
        return try StoreMessages.controlKey(text, gatewayID: gatewayID, location: location)
    }

    public func registerGateway(id: Int64, _ registration: GatewayRegistration, now: Date) async throws(StoreError) -> [String] {
        try await write { db in
            _ = try await Self.fetchGateway(db, id: id, lock: true)
            try StoreMessages.check { () throws(FieldError) in try registration.validate() }
            try await db.run("""
                UPDATE gateway SET online = true, version = \(registration.version), control_url = \(registration.controlURL),
                                   port_first = \(registration.portRange.first), port_last = \(registration.portRange.last),
                                   last_heartbeat = \(now), control_certificate = \(registration.controlCertificate)
                WHERE id = \(id)
                """)
            // Stored rules and the ones a connect is pushing (the gateway may
            // already hold them: issue 15's race), in one statement's snapshot.
            let cutoff = now.addingTimeInterval(-PendingRule.lifetime)
            try await db.run("DELETE FROM gateway_rule_pending WHERE since <= \(cutoff)")
            let known = Set(try await db.rows("""
                SELECT id FROM gateway_rule WHERE gateway_id = \(id)
                UNION ALL SELECT id FROM gateway_rule_pending WHERE gateway_id = \(id)
                """).map { try $0.string("id") })
            return StoreMessages.keptRules(reported: registration.ruleIDs, known: known)
        }
    }

    public func recordHeartbeat(id: Int64, load: Double, sessions: Int, now: Date) async throws(StoreError) {
        try await write { db in
            let changed = try await db.rows("""
                UPDATE gateway SET online = true, last_heartbeat = \(now), load = \(load), active_sessions = \(sessions)
                WHERE id = \(id) RETURNING id
                """)
            if changed.isEmpty { throw StoreMessages.noGateway(id) }
        }
    }

    /// One broker of a cluster sweeps at a time (a transaction-scoped advisory
    /// lock; the others skip this round), and the UPDATE ... RETURNING gives
    /// each gateway that goes offline to exactly one broker: it is marked and
    /// logged once, not once per broker.
    @discardableResult
    public func markGatewaysOffline(heartbeatBefore cutoff: Date) async throws(StoreError) -> [Int64] {
        try await write { db in
            let locked = try await db.rows("SELECT pg_try_advisory_xact_lock(\(PostgresMigrations.sweepLockKey)) AS locked")
            guard try locked.first?.bool("locked") == true else { return [] }
            return try await db.rows("""
                UPDATE gateway SET online = false
                WHERE online AND (last_heartbeat IS NULL OR last_heartbeat < \(cutoff))
                RETURNING id
                """).map { try $0.int64("id") }.sorted()
        }
    }

    private static func fetchGateway(_ db: PostgresSession, id: Int64, lock: Bool = false) async throws -> Gateway {
        let rows = lock
            ? try await db.rows("SELECT \(unescaped: StoreRecords.gatewayColumns) FROM gateway WHERE id = \(id) FOR UPDATE")
            : try await db.rows("SELECT \(unescaped: StoreRecords.gatewayColumns) FROM gateway WHERE id = \(id)")
        guard let row = rows.first else { throw StoreMessages.noGateway(id) }
        return try StoreRecords.gateway(row)
    }

    private static func checkGateway(_ db: PostgresSession, _ gateway: Gateway) async throws {
        try StoreMessages.check { () throws(FieldError) in try gateway.validate() }
        if let clusterID = gateway.loadBalancerID {
            try await db.requireRow(table: "gateway_cluster", id: clusterID, field: "load_balancer_id", what: "gateway cluster")
        }
        try await db.requireUnique(table: "gateway", column: "name", value: gateway.name, except: gateway.id, what: "a gateway named")
        try await db.requireUnique(table: "gateway", column: "address", value: gateway.address, except: gateway.id, what: "a gateway with address")
    }

    // MARK: Rules

    public func rules(gatewayID: Int64?) async throws(StoreError) -> [GatewayRule] {
        try await read { db in
            if let gatewayID {
                return try await db.rows("SELECT \(unescaped: StoreRecords.ruleColumns) FROM gateway_rule WHERE gateway_id = \(gatewayID) ORDER BY created, id")
                    .map(StoreRecords.rule)
            }
            return try await db.rows("SELECT \(unescaped: StoreRecords.ruleColumns) FROM gateway_rule ORDER BY created, id").map(StoreRecords.rule)
        }
    }

    public func rule(id: String) async throws(StoreError) -> GatewayRule {
        try await read { db in
            guard let row = try await db.rows("SELECT \(unescaped: StoreRecords.ruleColumns) FROM gateway_rule WHERE id = \(id)").first else {
                throw StoreMessages.noRule(id)
            }
            return try StoreRecords.rule(row)
        }
    }

    public func rules(connectionID: String) async throws(StoreError) -> [GatewayRule] {
        try await read { db in
            try await db.rows("""
                SELECT \(unescaped: StoreRecords.ruleColumns) FROM gateway_rule WHERE connection_id = \(connectionID)
                ORDER BY id = connection_id DESC, gateway_id, id
                """).map(StoreRecords.rule)
        }
    }

    public func ruleCounts() async throws(StoreError) -> [Int64: Int] {
        try await read { db in
            var counts: [Int64: Int] = [:]
            for row in try await db.rows("SELECT gateway_id, count(*) AS n FROM gateway_rule GROUP BY gateway_id") {
                counts[try row.int64("gateway_id")] = try row.int("n")
            }
            return counts
        }
    }

    public func connectReading(desktopID: Int64) async throws(StoreError) -> ConnectReading {
        let location = self.location
        // One statement, so one snapshot without BEGIN and COMMIT: a row per
        // candidate gateway (or one row with no gateway), each carrying the
        // desktop, its protocols and users as arrays, and its cluster. It was
        // up to eight round trips to the server, each a hop of its own (issue 15).
        let rows = try await read { db in
            try await db.rows(HotStatements.ConnectReading.self) { $0.append(desktopID) }
        }
        guard let first = rows.first else { throw StoreMessages.noDesktop(desktopID) }
        do {
            let names = try first.row["protocol_names"].decode([String].self, context: .default)
            let ports = try first.row["protocol_ports"].decode([Int64].self, context: .default)
            let transports = try first.row["protocol_transports"].decode([String].self, context: .default)
            guard names.count == ports.count, names.count == transports.count else {
                throw StoreError.unavailable("\(location): desktop \(desktopID)'s protocols were read incompletely")
            }
            let protocols = (0..<names.count).map { index in
                DesktopProtocol(name: names[index], port: Int(ports[index]), transport: Transport(rawValue: transports[index]) ?? .tcp)
            }
            let users = try first.row["user_ids"].decode([Int64].self, context: .default)
            let desktop = try StoreRecords.desktop(first, protocols: protocols, users: users)
            // A cluster that is gone is the chooser's to report (no route), as with a gateway.
            let cluster = try first.optionalInt64("c_id") == nil ? nil : try StoreRecords.cluster(first.prefixed("c_"))
            let counted = ConnectReading.countsRules(desktop: desktop, cluster: cluster)
            var gateways: [Gateway] = []
            var controlKeys: [Int64: ControlKey] = [:]
            var ruleCounts: [Int64: Int] = [:]
            for row in rows where try row.optionalInt64("g_id") != nil {
                let (gateway, key) = try Self.gatewayAndKey(row.prefixed("g_"), location: location)
                gateways.append(gateway)
                controlKeys[gateway.id] = key
                if counted, let rules = try row.optionalInt("g_rules"), rules > 0 { ruleCounts[gateway.id] = rules }
            }
            return ConnectReading(desktop: desktop, gateways: gateways, cluster: cluster, ruleCounts: ruleCounts, controlKeys: controlKeys)
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError.unavailable("\(location): reading desktop \(desktopID) for a connect: \(error)")
        }
    }

    /// The columns of `connectReading`'s one statement: the desktop's own, its
    /// protocols and users as arrays, the cluster's as `c_*`, the candidate
    /// gateway's with its key as `g_*`, and that gateway's rule count where
    /// the choice uses counts (`ConnectReading.countsRules`).
    static let connectReadingSQL = """
        SELECT \(connectReadingColumns)
        FROM desktop d
        LEFT JOIN gateway_cluster c ON c.id = d.load_balancer_id
        LEFT JOIN gateway g ON \(ConnectReading.candidateCondition(desktop: "d", gateway: "g"))
        WHERE d.id = $1
        ORDER BY g.id
        """

    private static let connectReadingColumns: String = {
        """
            \(qualified(StoreRecords.desktopColumns, "d")),
            ARRAY(SELECT p.name FROM desktop_protocol p WHERE p.desktop_id = d.id ORDER BY p.position) AS protocol_names,
            ARRAY(SELECT p.port::bigint FROM desktop_protocol p WHERE p.desktop_id = d.id ORDER BY p.position) AS protocol_ports,
            ARRAY(SELECT p.transport FROM desktop_protocol p WHERE p.desktop_id = d.id ORDER BY p.position) AS protocol_transports,
            ARRAY(SELECT u.user_id FROM desktop_user u WHERE u.desktop_id = d.id ORDER BY u.user_id) AS user_ids,
            \(qualified(StoreRecords.clusterColumns, "c", aliased: true)),
            \(qualified(gatewayWithKeyColumns, "g", aliased: true)),
            CASE WHEN \(ConnectReading.countsRulesCondition(desktop: "d", cluster: "c"))
                 THEN (SELECT count(*) FROM gateway_rule r WHERE r.gateway_id = g.id)
                      + (SELECT count(*) FROM gateway_rule_pending p
                         WHERE p.gateway_id = g.id AND p.since > now() - interval '\(Int(PendingRule.lifetime)) seconds') END AS g_rules
            """
    }()

    public func disconnectReading(ruleID: String) async throws(StoreError) -> DisconnectReading {
        let location = self.location
        // One statement (one snapshot, no BEGIN and COMMIT): every rule of the
        // connection the rule belongs to, each with its gateway and key as
        // `g_*`. It was two statements and one per gateway in a transaction.
        let rows = try await read { db in
            try await db.rows(HotStatements.DisconnectReading.self) { $0.append(ruleID) }
        }
        var placed: [DisconnectReading.Placed] = []
        do {
            for row in rows {
                let rule = try StoreRecords.rule(row)
                guard try row.optionalInt64("g_id") != nil else { throw StoreMessages.noGateway(rule.gatewayID) }
                let (gateway, key) = try Self.gatewayAndKey(row.prefixed("g_"), location: location)
                placed.append(.init(rule: rule, gateway: gateway, controlKey: key))
            }
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError.unavailable("\(location): reading rule \(ruleID) for a disconnect: \(error)")
        }
        guard let rule = placed.first(where: { $0.rule.id == ruleID })?.rule else { throw StoreMessages.noRule(ruleID) }
        return DisconnectReading(rule: rule, rules: placed)
    }

    static let disconnectReadingSQL = """
        SELECT \(disconnectReadingColumns)
        FROM gateway_rule r LEFT JOIN gateway g ON g.id = r.gateway_id
        WHERE r.connection_id = (SELECT connection_id FROM gateway_rule WHERE id = $1)
        ORDER BY r.id = r.connection_id DESC, r.gateway_id, r.id
        """

    /// The columns of `disconnectReading`'s one statement: the rule's, and its gateway's with its key as `g_*`.
    private static let disconnectReadingColumns =
        "\(qualified(StoreRecords.ruleColumns, "r")), \(qualified(gatewayWithKeyColumns, "g", aliased: true))"

    /// `a, b` of `table` t as `t.a, t.b`, or `aliased` as `t.a AS t_a, t.b AS t_b`
    /// (one table's columns among a join's, read back with `PostgresRecord.prefixed`).
    private static func qualified(_ columns: String, _ table: String, aliased: Bool = false) -> String {
        columns.split(separator: ",").map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
            .map { aliased ? "\(table).\($0) AS \(table)_\($0)" : "\(table).\($0)" }.joined(separator: ", ")
    }

    /// A gateway's columns and then its control key.
    private static let gatewayWithKeyColumns = "\(StoreRecords.gatewayColumns), control_key"

    /// A row of `gatewayWithKeyColumns`: the gateway, and its key when it is enrolled.
    private static func gatewayAndKey(_ row: PostgresRecord, location: String) throws -> (Gateway, ControlKey?) {
        let gateway = try StoreRecords.gateway(row)
        return (gateway, try StoreMessages.controlKey(try row.optionalString("control_key"), gatewayID: gateway.id, location: location))
    }

    public func createRules(_ rules: [GatewayRule]) async throws(StoreError) {
        let ids = rules.map(\.id)
        try await write { db in
            for (index, rule) in rules.enumerated() {
                // One statement per rule: the gateway's existence checked by the
                // insert itself, and (with the first) the reservations ended in
                // the same transaction, so a registration sees each rule stored
                // or still reserved. Three round trips for one rule, not five.
                let inserted = try await db.rows(HotStatements.CreateRule.self) {
                    $0.append(index == 0)
                    $0.append(ids)
                    $0.append(rule.id)
                    $0.append(rule.gatewayID)
                    $0.append(rule.desktopID)
                    $0.append(rule.userID)
                    $0.append(rule.protocolName)
                    $0.append(StoreRecords.pushText(rule))
                    $0.append(Int64(rule.port))
                    $0.append(rule.created)
                    $0.append(rule.connectionID)
                }
                guard !inserted.isEmpty else { throw StoreMessages.noGateway(rule.gatewayID) }
            }
        }
    }

    public func reserveRules(_ rules: [PendingRule], now: Date) async throws(StoreError) {
        guard !rules.isEmpty else { return }
        // One statement, outside a transaction: nothing to check, and a
        // reservation that a registration misses was not yet needed (the
        // gateway cannot hold a rule whose push has not been sent).
        try await statement { db in
            _ = try await db.rows(HotStatements.Reserve.self) {
                $0.append(rules.map(\.id))
                $0.append(rules.map(\.gatewayID))
                $0.append(now)
            }
        }
    }

    public func releaseRules(ids: [String]) async throws(StoreError) {
        guard !ids.isEmpty else { return }
        try await statement { db in
            try await db.run("DELETE FROM gateway_rule_pending WHERE id = ANY(\(ids))")
        }
    }

    public func updateRulePort(id: String, port: Int) async throws(StoreError) {
        try await write { db in
            if try await db.rows("UPDATE gateway_rule SET port = \(port) WHERE id = \(id) RETURNING id").isEmpty {
                throw StoreMessages.noRule(id)
            }
        }
    }

    public func deleteRule(id: String) async throws(StoreError) {
        try await write { db in
            if try await db.rows("DELETE FROM gateway_rule WHERE id = \(id) RETURNING id").isEmpty {
                throw StoreMessages.noRule(id)
            }
        }
    }

    public func deleteRules(connectionID: String) async throws(StoreError) {
        try await write { db in
            if try await db.rows(HotStatements.DeleteConnection.self, { $0.append(connectionID) }).isEmpty {
                throw StoreMessages.noConnection(connectionID)
            }
        }
    }

    // MARK: Gateway clusters

    public func gatewayClusters() async throws(StoreError) -> [GatewayCluster] {
        try await read { db in
            try await db.rows("SELECT \(unescaped: StoreRecords.clusterColumns) FROM gateway_cluster ORDER BY id").map(StoreRecords.cluster)
        }
    }

    public func gatewayCluster(id: Int64) async throws(StoreError) -> GatewayCluster {
        try await read { db in try await Self.fetchCluster(db, id: id) }
    }

    public func createGatewayCluster(_ changes: GatewayClusterChanges, now: Date) async throws(StoreError) -> GatewayCluster {
        try await write { db in
            try StoreMessages.check { () throws(FieldError) in try changes.requireForCreate() }
            let cluster = changes.applied(to: .blank(now: now))
            try await Self.checkCluster(db, cluster)
            let id = try await db.insertedID("""
                INSERT INTO gateway_cluster (name, address, load_balance_via, use_src_ip, notes, created, updated)
                VALUES (\(cluster.name), \(cluster.address), \(cluster.loadBalanceVia.rawValue), \(cluster.useSourceIP.rawValue),
                        \(cluster.notes), \(now), \(now))
                RETURNING id
                """)
            return try await Self.fetchCluster(db, id: id)
        }
    }

    public func updateGatewayCluster(id: Int64, _ changes: GatewayClusterChanges, now: Date) async throws(StoreError) -> GatewayCluster {
        try await write { db in
            let before = try await Self.fetchCluster(db, id: id, lock: true)
            var cluster = changes.applied(to: before)
            if cluster == before { return before }
            cluster.updated = now
            try await Self.checkCluster(db, cluster)
            try await db.run("""
                UPDATE gateway_cluster SET name = \(cluster.name), address = \(cluster.address),
                                           load_balance_via = \(cluster.loadBalanceVia.rawValue),
                                           use_src_ip = \(cluster.useSourceIP.rawValue), notes = \(cluster.notes), updated = \(now)
                WHERE id = \(id)
                """)
            return try await Self.fetchCluster(db, id: id)
        }
    }

    public func deleteGatewayCluster(id: Int64) async throws(StoreError) {
        try await write { db in
            _ = try await Self.fetchCluster(db, id: id, lock: true)
            let gateways = try await db.count("SELECT count(*) AS n FROM gateway WHERE load_balancer_id = \(id)")
            let desktops = try await db.count("SELECT count(*) AS n FROM desktop WHERE load_balancer_id = \(id)")
            if let refusal = StoreMessages.clusterInUse(id, gateways: gateways, desktops: desktops) { throw refusal }
            try await db.run("DELETE FROM gateway_cluster WHERE id = \(id)")
        }
    }

    private static func fetchCluster(_ db: PostgresSession, id: Int64, lock: Bool = false) async throws -> GatewayCluster {
        let rows = lock
            ? try await db.rows("SELECT \(unescaped: StoreRecords.clusterColumns) FROM gateway_cluster WHERE id = \(id) FOR UPDATE")
            : try await db.rows("SELECT \(unescaped: StoreRecords.clusterColumns) FROM gateway_cluster WHERE id = \(id)")
        guard let row = rows.first else { throw StoreMessages.noCluster(id) }
        return try StoreRecords.cluster(row)
    }

    private static func checkCluster(_ db: PostgresSession, _ cluster: GatewayCluster) async throws {
        try StoreMessages.check { () throws(FieldError) in try cluster.validate() }
        try await db.requireUnique(table: "gateway_cluster", column: "name", value: cluster.name, except: cluster.id, what: "a gateway cluster named")
    }

    // MARK: Desktops

    public func desktops() async throws(StoreError) -> [Desktop] {
        try await read(consistent: true) { db in
            var protocols: [Int64: [DesktopProtocol]] = [:]
            for row in try await db.rows("SELECT desktop_id, name, port, transport FROM desktop_protocol ORDER BY desktop_id, position") {
                protocols[try row.int64("desktop_id"), default: []].append(try StoreRecords.desktopProtocol(row))
            }
            var users: [Int64: [Int64]] = [:]
            for row in try await db.rows("SELECT desktop_id, user_id FROM desktop_user ORDER BY desktop_id, user_id") {
                users[try row.int64("desktop_id"), default: []].append(try row.int64("user_id"))
            }
            return try await db.rows("SELECT \(unescaped: StoreRecords.desktopColumns) FROM desktop ORDER BY id").map { row in
                let id = try row.int64("id")
                return try StoreRecords.desktop(row, protocols: protocols[id] ?? [], users: users[id] ?? [])
            }
        }
    }

    public func desktop(id: Int64) async throws(StoreError) -> Desktop {
        try await read(consistent: true) { db in try await Self.fetchDesktop(db, id: id) }
    }

    public func createDesktop(_ changes: DesktopChanges, now: Date) async throws(StoreError) -> Desktop {
        try await write { db in
            try StoreMessages.check { () throws(FieldError) in try changes.requireForCreate() }
            let desktop = changes.applied(to: .blank(now: now))
            try await Self.checkDesktop(db, desktop)
            let id = try await db.insertedID("""
                INSERT INTO desktop (name, address, gateway_id, load_balancer_id, notes, created, updated)
                VALUES (\(desktop.name), \(desktop.address), \(desktop.gatewayID), \(desktop.loadBalancerID), \(desktop.notes), \(now), \(now))
                RETURNING id
                """)
            try await Self.storeProtocols(db, desktopID: id, desktop.protocols)
            try await Self.storeEntitlements(db, desktopID: id, desktop.users)
            return try await Self.fetchDesktop(db, id: id)
        }
    }

    public func updateDesktop(id: Int64, _ changes: DesktopChanges, now: Date) async throws(StoreError) -> Desktop {
        try await write { db in
            let before = try await Self.fetchDesktop(db, id: id, lock: true)
            var desktop = changes.applied(to: before)
            if desktop == before { return before }
            desktop.updated = now
            try await Self.checkDesktop(db, desktop)
            try await db.run("""
                UPDATE desktop SET name = \(desktop.name), address = \(desktop.address), gateway_id = \(desktop.gatewayID),
                                   load_balancer_id = \(desktop.loadBalancerID), notes = \(desktop.notes), updated = \(now)
                WHERE id = \(id)
                """)
            if changes.protocols != nil {
                try await db.run("DELETE FROM desktop_protocol WHERE desktop_id = \(id)")
                try await Self.storeProtocols(db, desktopID: id, desktop.protocols)
            }
            if changes.users != nil {
                try await db.run("DELETE FROM desktop_user WHERE desktop_id = \(id)")
                try await Self.storeEntitlements(db, desktopID: id, desktop.users)
            }
            return try await Self.fetchDesktop(db, id: id)
        }
    }

    public func deleteDesktop(id: Int64) async throws(StoreError) {
        try await write { db in
            _ = try await Self.fetchDesktop(db, id: id, lock: true)
            let rules = try await db.count("SELECT count(*) AS n FROM gateway_rule WHERE desktop_id = \(id)")
            if let refusal = StoreMessages.desktopInUse(id, rules: rules) { throw refusal }
            try await db.run("DELETE FROM desktop WHERE id = \(id)")
        }
    }

    private static func fetchDesktop(_ db: PostgresSession, id: Int64, lock: Bool = false) async throws -> Desktop {
        let rows = lock
            ? try await db.rows("SELECT \(unescaped: StoreRecords.desktopColumns) FROM desktop WHERE id = \(id) FOR UPDATE")
            : try await db.rows("SELECT \(unescaped: StoreRecords.desktopColumns) FROM desktop WHERE id = \(id)")
        guard let row = rows.first else { throw StoreMessages.noDesktop(id) }
        let protocols = try await db.rows("SELECT name, port, transport FROM desktop_protocol WHERE desktop_id = \(id) ORDER BY position")
            .map(StoreRecords.desktopProtocol)
        let users = try await db.rows("SELECT user_id FROM desktop_user WHERE desktop_id = \(id) ORDER BY user_id").map { try $0.int64("user_id") }
        return try StoreRecords.desktop(row, protocols: protocols, users: users)
    }

    private static func checkDesktop(_ db: PostgresSession, _ desktop: Desktop) async throws {
        try StoreMessages.check { () throws(FieldError) in try desktop.validate() }
        if let gatewayID = desktop.gatewayID {
            try await db.requireRow(table: "gateway", id: gatewayID, field: "gateway_id", what: "gateway")
        }
        if let clusterID = desktop.loadBalancerID {
            try await db.requireRow(table: "gateway_cluster", id: clusterID, field: "load_balancer_id", what: "gateway cluster")
        }
        try await db.requireUnique(table: "desktop", column: "name", value: desktop.name, except: desktop.id, what: "a desktop named")
        for user in desktop.users {
            try await db.requireRow(table: "user_account", id: user, field: "users", what: "user")
        }
    }

    private static func storeEntitlements(_ db: PostgresSession, desktopID: Int64, _ users: [Int64]) async throws {
        for user in users {
            try await db.run("INSERT INTO desktop_user (desktop_id, user_id) VALUES (\(desktopID), \(user))")
        }
    }

    private static func storeProtocols(_ db: PostgresSession, desktopID: Int64, _ protocols: [DesktopProtocol]) async throws {
        for (position, entry) in protocols.enumerated() {
            try await db.run("""
                INSERT INTO desktop_protocol (desktop_id, position, name, port, transport)
                VALUES (\(desktopID), \(position), \(entry.name), \(entry.port), \(entry.transport.rawValue))
                """)
        }
    }

    // MARK: Users

    public func users() async throws(StoreError) -> [User] {
        try await read { db in
            try await db.rows("SELECT \(unescaped: StoreRecords.userColumns) FROM user_account ORDER BY id").map(StoreRecords.user)
        }
    }

    public func user(id: Int64) async throws(StoreError) -> User {
        try await read { db in try await Self.fetchUser(db, id: id) }
    }

    public func userCount() async throws(StoreError) -> Int {
        try await read { db in try await db.count("SELECT count(*) AS n FROM user_account") }
    }

    public func createUser(_ changes: UserChanges, now: Date) async throws(StoreError) -> User {
        try await write { db in
            try StoreMessages.check { () throws(FieldError) in try changes.requireForCreate() }
            let user = changes.applied(to: .blank(now: now))
            try await Self.checkUser(db, user)
            let id = try await db.insertedID("""
                INSERT INTO user_account (login, password_hash, display_name, role, enabled, created, updated)
                VALUES (\(user.login), \(changes.passwordHash), \(user.displayName), \(user.role.rawValue), \(user.enabled), \(now), \(now))
                RETURNING id
                """)
            return try await Self.fetchUser(db, id: id)
        }
    }

    public func updateUser(id: Int64, _ changes: UserChanges, now: Date) async throws(StoreError) -> User {
        try await write { db in
            let before = try await Self.fetchUser(db, id: id, lock: true)
            var user = changes.applied(to: before)
            if user == before && changes.passwordHash == nil { return before }
            user.updated = now
            try await Self.checkUser(db, user)
            if StoreMessages.removesAdmin(before: before, after: user), try await Self.activeAdminCount(db) <= 1 {
                throw StoreMessages.lastAdminChange(id)
            }
            try await db.run("""
                UPDATE user_account SET login = \(user.login), display_name = \(user.displayName), role = \(user.role.rawValue),
                                        enabled = \(user.enabled), updated = \(now),
                                        password_hash = coalesce(\(changes.passwordHash), password_hash)
                WHERE id = \(id)
                """)
            if changes.passwordHash != nil || !user.enabled {
                try await db.run("DELETE FROM user_session WHERE user_id = \(id)")
            }
            return try await Self.fetchUser(db, id: id)
        }
    }

    public func deleteUser(id: Int64) async throws(StoreError) {
        try await write { db in
            let user = try await Self.fetchUser(db, id: id, lock: true)
            if StoreMessages.removesAdmin(before: user, after: nil), try await Self.activeAdminCount(db) <= 1 {
                throw StoreMessages.lastAdminDelete(id)
            }
            try await db.run("DELETE FROM user_account WHERE id = \(id)")
        }
    }

    public func credentials(login: String) async throws(StoreError) -> Credentials? {
        try await read { db in
            guard let row = try await db.rows("""
                SELECT \(unescaped: StoreRecords.userColumns), password_hash FROM user_account WHERE lower(login) = lower(\(login))
                """).first else { return nil }
            return Credentials(user: try StoreRecords.user(row), passwordHash: try row.string("password_hash"))
        }
    }

    private static func fetchUser(_ db: PostgresSession, id: Int64, lock: Bool = false) async throws -> User {
        let rows = lock
            ? try await db.rows("SELECT \(unescaped: StoreRecords.userColumns) FROM user_account WHERE id = \(id) FOR UPDATE")
            : try await db.rows("SELECT \(unescaped: StoreRecords.userColumns) FROM user_account WHERE id = \(id)")
        guard let row = rows.first else { throw StoreMessages.noUser(id) }
        return try StoreRecords.user(row)
    }

    private static func checkUser(_ db: PostgresSession, _ user: User) async throws {
        try StoreMessages.check { () throws(FieldError) in try user.validate() }
        try await db.requireUnique(table: "user_account", column: "login", value: user.login, except: user.id, what: "a user with login")
    }

    private static func activeAdminCount(_ db: PostgresSession) async throws -> Int {
        try await db.count("SELECT count(*) AS n FROM user_account WHERE role = 'admin' AND enabled")
    }

    // MARK: Sessions

    public func createSession(_ session: Session) async throws(StoreError) {
        try await write { db in
            try await db.run("""
                INSERT INTO user_session (token_hash, user_id, created, expires, client_address, login_gateway_id)
                VALUES (\(session.tokenHash), \(session.userID), \(session.created), \(session.expires), \(session.clientAddress),
                        \(session.loginGatewayID))
                """)
        }
    }

    public func session(tokenHash: String, now: Date) async throws(StoreError) -> AuthenticatedSession? {
        try await read { db in
            guard let row = try await db.rows(HotStatements.SessionLookup.self, {
                $0.append(tokenHash)
                $0.append(now)
            }).first else { return nil }
            return try StoreRecords.authenticatedSession(row)
        }
    }

    public func deleteSession(tokenHash: String) async throws(StoreError) {
        try await write { db in
            try await db.run("DELETE FROM user_session WHERE token_hash = \(tokenHash)")
        }
    }

    @discardableResult
    public func deleteExpiredSessions(now: Date) async throws(StoreError) -> Int {
        try await write { db in
            try await db.rows("DELETE FROM user_session WHERE expires <= \(now) RETURNING token_hash").count
        }
    }

    // MARK: Transactions

    /// A read: one statement on a pooled connection, or, with `consistent`,
    /// several in one REPEATABLE READ snapshot.
    private func read<T: Sendable>(consistent: Bool = false, _ body: @escaping @Sendable (PostgresSession) async throws -> T) async throws(StoreError) -> T {
        if consistent {
            return try await transaction(isolation: "REPEATABLE READ READ ONLY", body)
        }
        return try await statement(body)
    }

    /// One statement on a pooled connection, in its own implicit transaction:
    /// a read, or a write that needs no checks around it.
    private func statement<T: Sendable>(_ body: @escaping @Sendable (PostgresSession) async throws -> T) async throws(StoreError) -> T {
        do {
            return try await leased { session in try await body(session) }
        } catch {
            throw await storeError(error)
        }
    }

    /// A write: one SERIALIZABLE transaction, run again (up to 20 times, with
    /// a short random pause) when PostgreSQL aborts it for a concurrent one.
    private func write<T: Sendable>(_ body: @escaping @Sendable (PostgresSession) async throws -> T) async throws(StoreError) -> T {
        try await transaction(isolation: "SERIALIZABLE", body)
    }

    func transaction<T: Sendable>(isolation: String, _ body: @escaping @Sendable (PostgresSession) async throws -> T) async throws(StoreError) -> T {
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await leased { session in
                    try await session.run(PostgresQuery(unsafeSQL: "BEGIN ISOLATION LEVEL \(isolation)"))
                    do {
                        let value = try await body(session)
                        try await session.run("COMMIT")
                        return value
                    } catch {
                        _ = try? await session.run("ROLLBACK")
                        throw error
                    }
                }
            } catch let error as PSQLError where Self.isRetryable(error) && attempt < 20 {
                try? await Task.sleep(for: .milliseconds(Int.random(in: 1...(2 * attempt))))
                continue
            } catch {
                throw await storeError(error)
            }
        }
    }

    /// No answer within this long is a database that cannot be reached: the
    /// pool would otherwise wait for a connection as long as the server is down.
    public static let callTimeout: Duration = .seconds(15)

    private struct NoConnection: Error {}

    /// Runs `body` on a pooled connection, giving up after `callTimeout`.
    private func leased<T: Sendable>(_ body: @escaping @Sendable (PostgresSession) async throws -> T) async throws -> T {
        let client = self.client, logger = self.logger
        do {
            return try await watchdog.run {
                try await client.withConnection { connection in
                    try await body(PostgresSession(connection: connection, logger: logger))
                }
            }
        } catch is CallWatchdog.Expired {
            throw NoConnection()
        }
    }

    /// Connects once, outside the pool, and says why that fails (the pool only
    /// retries): wrong password, refused, TLS, unknown database.
    /// - Returns: nil when a connection could be made.
    public func probe() async -> String? {
        var configuration: PostgresConnection.Configuration
        do {
            if let folder = settings.socketDirectory {
                configuration = PostgresConnection.Configuration(unixSocketPath: "\(folder)/.s.PGSQL.\(settings.port)", username: settings.user,
                                                                 password: password, database: settings.database)
            } else {
                let tls: PostgresConnection.Configuration.TLS
                if settings.tlsMode == .disable {
                    tls = .disable
                } else {
                    let context = try NIOSSLContext(configuration: Self.tlsConfiguration(settings))
                    tls = settings.tlsMode == .prefer ? .prefer(context) : .require(context)
                }
                configuration = PostgresConnection.Configuration(host: settings.host, port: settings.port, username: settings.user,
                                                                 password: password, database: settings.database, tls: tls)
            }
        } catch {
            return "database \(location): \(error)"
        }
        configuration.options.connectTimeout = .seconds(5)
        do {
            let connection = try await PostgresConnection.connect(configuration: configuration, id: 0, logger: logger)
            try? await connection.close()
            return nil
        } catch {
            return "database \(location): \(Self.describe(error))"
        }
    }

    /// serialization_failure and deadlock_detected: the transaction lost a race and can run again.
    private static func isRetryable(_ error: PSQLError) -> Bool {
        guard let state = error.serverInfo?[.sqlState] else { return false }
        return state == "40001" || state == "40P01"
    }

    private func storeError(_ error: any Error) async -> StoreError {
        if let error = error as? StoreError { return error }
        if error is NoConnection {
            let reason = await probe() ?? "a connection could be made again just now"
            return .unavailable("no answer from the database within \(Self.callTimeout.components.seconds) s: \(reason)")
        }
        if let error = error as? FieldError { return .invalid(error) }
        if let error = error as? PSQLError, let state = error.serverInfo?[.sqlState], state == "23505" || state == "23503" {
            // The explicit checks come first; the constraints are the safety net under them.
            let constraint = error.serverInfo?[.constraintName] ?? ""
            return .conflict(field: Self.constraintField(constraint),
                             message: "conflicts with a stored row (\(error.serverInfo?[.message] ?? "constraint \(constraint) failed"))")
        }
        return .unavailable("database \(location): \(Self.describe(error))")
    }

    /// "gateway_name_unique" → "name"; "gateway_rule_gateway_id_fkey" → "gateway_id".
    static func constraintField(_ name: String) -> String {
        for (suffix, table) in PostgresMigrations.constraintColumns where name == suffix { return table }
        return name.isEmpty ? "id" : name
    }

    /// What went wrong, for a person: the server's message and SQLSTATE, or the connection's problem.
    /// Never the query's bound values (they may hold hashes or keys).
    public static func describe(_ error: any Error) -> String {
        if let error = error as? PSQLError {
            if let info = error.serverInfo {
                let message = info[.message] ?? "server error"
                return "\(message) (SQLSTATE \(info[.sqlState] ?? "?"))"
            }
            if error.code == .authMechanismRequiresPassword {
                return "the server asks for a password: give it in --database-password-file or LEOSTREAM_BROKER_DATABASE_PASSWORD"
            }
            if let underlying = error.underlying {
                return "\(error.code): \(underlying)"
            }
            return "\(error.code)"
        }
        if let error = error as? PostgresDecodingError {
            return "column \(error.columnName) cannot be read (\(error.code))"
        }
        return "\(error)"
    }
}

/// A leased connection inside a call: queries and the checks both stores make.
struct PostgresSession {
    let connection: PostgresConnection
    let logger: Logger

    func rows(_ query: PostgresQuery) async throws -> [PostgresRecord] {
        var found: [PostgresRecord] = []
        for try await row in try await connection.query(query, logger: logger) {
            found.append(PostgresRecord(row: row.makeRandomAccess()))
        }
        return found
    }

    func run(_ query: PostgresQuery) async throws {
        _ = try await rows(query)
    }

    func count(_ query: PostgresQuery) async throws -> Int {
        try await rows(query).first?.int("n") ?? 0
    }

    func insertedID(_ query: PostgresQuery) async throws -> Int64 {
        guard let row = try await rows(query).first else { throw StoreError.unavailable("an INSERT returned no id") }
        return try row.int64("id")
    }

    func requireRow(table: String, id: Int64, field: String, what: String) async throws {
        if try await rows("SELECT 1 AS found FROM \(unescaped: table) WHERE id = \(id)").isEmpty {
            throw StoreMessages.missingReference(field: field, what: what, id: id)
        }
    }

    func requireUnique(table: String, column: String, value: String, except id: Int64, what: String) async throws {
        if let other = try await rows("""
            SELECT id FROM \(unescaped: table) WHERE lower(\(unescaped: column)) = lower(\(value)) AND id <> \(id)
            """).first {
            throw StoreMessages.duplicate(column: column, what: what, value: value, existing: try other.int64("id"))
        }
    }
}

/// A PostgreSQL row as the shared row mapping reads it.
struct PostgresRecord: StoreRecord {
    let row: PostgresRandomAccessRow
    /// Put before every column name read: one table's columns among a join's, aliased `c_id`, `c_name`, ...
    var prefix = ""

    /// The same row, reading the columns aliased with `prefix`.
    func prefixed(_ prefix: String) -> PostgresRecord { PostgresRecord(row: row, prefix: prefix) }

    private func value<T: PostgresDecodable>(_ column: String, _ type: T.Type) throws -> T {
        try row[prefix.isEmpty ? column : prefix + column].decode(T.self, context: .default)
    }

    func int64(_ column: String) throws -> Int64 { try value(column, Int64.self) }
    func optionalInt64(_ column: String) throws -> Int64? { try value(column, Int64?.self) }
    func int(_ column: String) throws -> Int { try value(column, Int.self) }
    func optionalInt(_ column: String) throws -> Int? { try value(column, Int?.self) }
    func string(_ column: String) throws -> String { try value(column, String.self) }
    func optionalString(_ column: String) throws -> String? { try value(column, String?.self) }
    func bool(_ column: String) throws -> Bool { try value(column, Bool.self) }
    func date(_ column: String) throws -> Date { try value(column, Date.self) }
    func optionalDate(_ column: String) throws -> Date? { try value(column, Date?.self) }
    func optionalDouble(_ column: String) throws -> Double? { try value(column, Double?.self) }
}
