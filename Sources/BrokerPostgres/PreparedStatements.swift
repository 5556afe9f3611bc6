import Foundation
import PostgresNIO

/// The text of one statement run on every connect or disconnect, with its
/// parameters' types.
protocol HotStatement {
    static var sql: String { get }
    static var types: [PostgresDataType] { get }
}

/// A hot statement as a named prepared statement: postgres-nio prepares it
/// once per pooled connection and then only binds and executes it. About
/// half of the PostgreSQL server's CPU per connect was parsing, analysing
/// and planning the same few statements again and again (perf, issue 15).
/// Rows come back whole, to be read by column name as every other row.
struct Prepared<Statement: HotStatement>: PostgresPreparedStatement {
    typealias Row = PostgresRow

    static var name: String { "rdg_\(String(describing: Statement.self))" }
    static var sql: String { Statement.sql }
    static var bindingDataTypes: [PostgresDataType] { Statement.types }

    let bindings: PostgresBindings

    func makeBindings() throws -> PostgresBindings { bindings }
    func decodeRow(_ row: PostgresRow) throws -> PostgresRow { row }
}

extension PostgresSession {
    /// Runs a hot statement with `bind` filling in its parameters, in order.
    func rows<Statement: HotStatement>(_ statement: Statement.Type,
                                       _ bind: (inout PostgresBindings) -> Void) async throws -> [PostgresRecord] {
        var bindings = PostgresBindings(capacity: Statement.types.count)
        bind(&bindings)
        var found: [PostgresRecord] = []
        for try await row in try await connection.execute(Prepared<Statement>(bindings: bindings), logger: logger) {
            found.append(PostgresRecord(row: row.makeRandomAccess()))
        }
        return found
    }
}

/// The hot statements (`PostgresBrokerStore`): the session behind a bearer
/// token, a connect's reading and its rule, and a disconnect's reading and
/// deletion. Written with `$n` placeholders; each one's `types` lists them.
enum HotStatements {
    /// `$1` token hash, `$2` now.
    enum SessionLookup: HotStatement {
        static let sql = """
            SELECT s.token_hash, s.user_id, s.created AS session_created, s.expires, s.client_address, s.login_gateway_id,
                   u.id, u.login, u.display_name, u.role, u.enabled, u.created, u.updated
            FROM user_session s JOIN user_account u ON u.id = s.user_id
            WHERE s.token_hash = $1 AND s.expires > $2 AND u.enabled
            """
        static let types: [PostgresDataType] = [.text, .timestamptz]
    }

    /// `$1` desktop id.
    enum ConnectReading: HotStatement {
        static var sql: String { PostgresBrokerStore.connectReadingSQL }
        static let types: [PostgresDataType] = [.int8]
    }

    /// `$1` rule ids, `$2` their gateways, `$3` now.
    enum Reserve: HotStatement {
        static let sql = """
            INSERT INTO gateway_rule_pending (id, gateway_id, since)
            SELECT id, gateway_id, $3 FROM unnest($1::text[], $2::bigint[]) AS reserved(id, gateway_id)
            ON CONFLICT (id) DO UPDATE SET gateway_id = excluded.gateway_id, since = excluded.since
            """
        static let types: [PostgresDataType] = [.textArray, .int8Array, .timestamptz]
    }

    /// `$1` whether to end the reservations `$2`; then the rule's columns `$3`-`$11` in
    /// `StoreRecords.ruleColumns`' order. Returns its id, or no row when its gateway does not exist.
    enum CreateRule: HotStatement {
        static let sql = """
            WITH ended AS (DELETE FROM gateway_rule_pending WHERE $1 AND id = ANY($2))
            INSERT INTO gateway_rule (id, gateway_id, desktop_id, user_id, protocol_name, push, port, created, connection_id)
            SELECT $3, $4, $5, $6, $7, $8, $9, $10, $11
            WHERE EXISTS (SELECT 1 FROM gateway WHERE id = $4)
            RETURNING id
            """
        static let types: [PostgresDataType] = [.bool, .textArray, .text, .int8, .int8, .int8, .text, .text, .int8, .timestamptz, .text]
    }

    /// `$1` a rule id.
    enum DisconnectReading: HotStatement {
        static var sql: String { PostgresBrokerStore.disconnectReadingSQL }
        static let types: [PostgresDataType] = [.text]
    }

    /// `$1` a connection id.
    enum DeleteConnection: HotStatement {
        static let sql = "DELETE FROM gateway_rule WHERE connection_id = $1 RETURNING id"
        static let types: [PostgresDataType] = [.text]
    }
}
