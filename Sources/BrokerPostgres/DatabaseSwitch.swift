import BrokerCore
import Foundation
import GRDB
import PostgresNIO

/// `leostream-broker switch-database`: copies an SQLite broker into an empty
/// PostgreSQL database, every row with its id (sessions, control keys and
/// password hashes included), in one PostgreSQL transaction: a copy that
/// fails leaves the target as it was. The SQLite file is only read.
public enum DatabaseSwitch {
    /// What was copied: table → rows.
    public struct Report: Sendable, Equatable {
        public var rows: [String: Int]
        public var total: Int { rows.values.reduce(0, +) }
    }

    enum Kind { case int64, int, text, bool, date, double }

    /// Every table in an order that satisfies the foreign keys, with its
    /// columns as of the last migration both stores know.
    static let tables: [(name: String, columns: [(String, Kind)])] = [
        ("gateway_cluster", [("id", .int64), ("name", .text), ("address", .text), ("load_balance_via", .text),
                             ("use_src_ip", .int), ("notes", .text), ("created", .date), ("updated", .date)]),
        ("gateway", [("id", .int64), ("name", .text), ("address", .text), ("address_private", .text), ("load_balancer_id", .int64),
                     ("use_src_ip", .int), ("forward_to", .text), ("signature", .text), ("notes", .text), ("online", .bool),
                     ("version", .text), ("last_heartbeat", .date), ("key_fingerprint", .text), ("created", .date),
                     ("updated", .date), ("control_key", .text), ("control_url", .text), ("port_first", .int),
                     ("port_last", .int), ("load", .double), ("active_sessions", .int), ("forwarding_path", .text),
                     ("control_certificate", .text)]),
        ("desktop", [("id", .int64), ("name", .text), ("address", .text), ("gateway_id", .int64), ("load_balancer_id", .int64),
                     ("notes", .text), ("created", .date), ("updated", .date)]),
        ("desktop_protocol", [("desktop_id", .int64), ("position", .int), ("name", .text), ("port", .int), ("transport", .text)]),
        ("user_account", [("id", .int64), ("login", .text), ("password_hash", .text), ("display_name", .text), ("role", .text),
                          ("enabled", .bool), ("created", .date), ("updated", .date)]),
        ("desktop_user", [("desktop_id", .int64), ("user_id", .int64)]),
        ("user_session", [("token_hash", .text), ("user_id", .int64), ("created", .date), ("expires", .date),
                          ("client_address", .text), ("login_gateway_id", .int64)]),
        ("gateway_rule", [("id", .text), ("gateway_id", .int64), ("desktop_id", .int64), ("user_id", .int64),
                          ("protocol_name", .text), ("push", .text), ("port", .int), ("created", .date), ("connection_id", .text)]),
    ]

    /// Tables whose ids come from an identity sequence (moved past the copied ids).
    static let identityTables = ["gateway_cluster", "gateway", "desktop", "user_account"]

    /// Copies `sqlitePath` into `target` (opened and migrated by the caller).
    /// - Throws: `StoreError.unavailable` naming the file or the database:
    ///   the file is missing or not current, the target is not empty, a row
    ///   cannot be written. Nothing is changed then.
    public static func copy(from sqlitePath: String, to target: PostgresBrokerStore) async throws(StoreError) -> Report {
        let source = try await readSource(sqlitePath)
        return try await target.copyIn(source, sourceName: sqlitePath)
    }

    struct Table: Sendable {
        let name: String
        let columns: [String]
        let rows: [[Value]]
        /// The highest id SQLite ever handed out (sqlite_sequence), deleted rows included.
        var highestID: Int64 = 0
    }

    enum Value: Sendable {
        case null, int64(Int64), int(Int), text(String), bool(Bool), date(Date), double(Double)
    }

    /// Every row of the file, read in one read transaction (a consistent snapshot).
    static func readSource(_ path: String) async throws(StoreError) -> [Table] {
        guard FileManager.default.fileExists(atPath: path) else {
            throw StoreError.unavailable("\(path): no such database file")
        }
        let status: SchemaStatus
        do {
            let store = try SQLiteBrokerStore(path: path, mode: .readOnly)
            status = try await store.schema()
            store.close()
        }
        if !status.pending.isEmpty || !status.unknown.isEmpty || status.applied.isEmpty {
            throw StoreError.unavailable("\(path): its schema (\(status.version)) is not the current one (\(status.known.last ?? "?")); start the SQLite broker once with this version to migrate it, then switch")
        }
        do {
            var configuration = Configuration()
            configuration.readonly = true
            let queue = try DatabaseQueue(path: path, configuration: configuration)
            defer { try? queue.close() }
            return try await queue.read { db in
                try tables.map { table in
                    let names = table.columns.map(\.0)
                    let rows = try Row.fetchAll(db, sql: "SELECT \(names.joined(separator: ", ")) FROM \(table.name)").map { row in
                        table.columns.map { column, kind -> Value in
                            if row.hasNull(atIndex: names.firstIndex(of: column)!) { return .null }
                            switch kind {
                            case .int64: return .int64(row[column])
                            case .int: return .int(row[column])
                            case .text: return .text(row[column])
                            case .bool: return .bool(row[column])
                            case .date: return .date(row[column])
                            case .double: return .double(row[column])
                            }
                        }
                    }
                    let highest = try Int64.fetchOne(db, sql: "SELECT seq FROM sqlite_sequence WHERE name = ?", arguments: [table.name]) ?? 0
                    return Table(name: table.name, columns: names, rows: rows, highestID: highest)
                }
            }
        } catch {
            throw StoreError.unavailable("\(path): \(error)")
        }
    }
}

extension PostgresBrokerStore {
    /// Writes the copied rows in one transaction, refusing a target that holds any row.
    func copyIn(_ tables: [DatabaseSwitch.Table], sourceName: String) async throws(StoreError) -> DatabaseSwitch.Report {
        let location = self.location
        return try await transaction(isolation: "SERIALIZABLE") { db in
            for table in tables {
                let present = try await db.count("SELECT count(*) AS n FROM \(unescaped: table.name)")
                if present > 0 {
                    throw StoreError.unavailable("database \(location) is not empty (\(present) row(s) in \(table.name)); switch-database copies into an empty database only, so nothing was copied")
                }
            }
            var report = DatabaseSwitch.Report(rows: [:])
            for table in tables {
                let placeholders = (1...table.columns.count).map { "$\($0)" }.joined(separator: ", ")
                let sql = "INSERT INTO \(table.name) (\(table.columns.joined(separator: ", "))) OVERRIDING SYSTEM VALUE VALUES (\(placeholders))"
                for row in table.rows {
                    var bindings = PostgresBindings()
                    for value in row {
                        switch value {
                        case .null: bindings.appendNull()
                        case .int64(let number): bindings.append(number)
                        case .int(let number): bindings.append(number)
                        case .text(let text): bindings.append(text)
                        case .bool(let flag): bindings.append(flag)
                        case .date(let date): bindings.append(date)
                        case .double(let number): bindings.append(number)
                        }
                    }
                    try await db.run(PostgresQuery(unsafeSQL: sql, binds: bindings))
                }
                report.rows[table.name] = table.rows.count
            }
            // Ids are never handed out twice: the sequences go on after the
            // highest id SQLite ever gave, deleted rows included.
            for table in tables where DatabaseSwitch.identityTables.contains(table.name) {
                try await db.run(PostgresQuery(unsafeSQL: """
                    SELECT setval(pg_get_serial_sequence('\(table.name)', 'id'),
                                  greatest(\(table.highestID), coalesce((SELECT max(id) FROM \(table.name)), 0)) + 1, false)
                    """))
            }
            // Read back: every table holds exactly what was read from the file.
            for table in tables {
                let stored = try await db.count("SELECT count(*) AS n FROM \(unescaped: table.name)")
                if stored != table.rows.count {
                    throw StoreError.unavailable("database \(location): \(table.name) holds \(stored) row(s) after the copy, \(sourceName) has \(table.rows.count); nothing was copied")
                }
            }
            return report
        }
    }
}
