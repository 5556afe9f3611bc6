import GRDB

/// The SQLite schema, as an ordered list of migrations from the first version on.
/// A migration, once released, never changes: a new schema is a new migration
/// appended here, so every database reaches the current schema by the same steps.
enum Migrations {
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("0001-initial") { db in
            // AUTOINCREMENT: an id is never handed out twice, so a REST client
            // holding an old id cannot reach a newer row by mistake.
            try db.execute(sql: """
                CREATE TABLE gateway_cluster (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
                    address TEXT NOT NULL DEFAULT '',
                    load_balance_via TEXT NOT NULL CHECK (load_balance_via IN ('E', 'P', 'L')),
                    use_src_ip INTEGER NOT NULL DEFAULT 0 CHECK (use_src_ip BETWEEN 0 AND 2),
                    notes TEXT NOT NULL DEFAULT '',
                    created DATETIME NOT NULL,
                    updated DATETIME NOT NULL
                );

                CREATE TABLE gateway (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
                    address TEXT NOT NULL UNIQUE COLLATE NOCASE,
                    address_private TEXT NOT NULL DEFAULT '',
                    load_balancer_id INTEGER REFERENCES gateway_cluster(id) ON DELETE RESTRICT,
                    use_src_ip INTEGER NOT NULL DEFAULT 0 CHECK (use_src_ip BETWEEN 0 AND 2),
                    forward_to TEXT NOT NULL DEFAULT '',
                    signature TEXT NOT NULL DEFAULT '',
                    notes TEXT NOT NULL DEFAULT '',
                    -- Kept by the control plane.
                    online BOOLEAN NOT NULL DEFAULT 0,
                    version TEXT NOT NULL DEFAULT '',
                    last_heartbeat DATETIME,
                    key_fingerprint TEXT UNIQUE,
                    created DATETIME NOT NULL,
                    updated DATETIME NOT NULL
                );
                CREATE INDEX gateway_load_balancer_id ON gateway(load_balancer_id);

                CREATE TABLE desktop (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
                    address TEXT NOT NULL,
                    gateway_id INTEGER REFERENCES gateway(id) ON DELETE RESTRICT,
                    load_balancer_id INTEGER REFERENCES gateway_cluster(id) ON DELETE RESTRICT,
                    notes TEXT NOT NULL DEFAULT '',
                    created DATETIME NOT NULL,
                    updated DATETIME NOT NULL
                );
                CREATE INDEX desktop_gateway_id ON desktop(gateway_id);
                CREATE INDEX desktop_load_balancer_id ON desktop(load_balancer_id);

                CREATE TABLE desktop_protocol (
                    desktop_id INTEGER NOT NULL REFERENCES desktop(id) ON DELETE CASCADE,
                    position INTEGER NOT NULL,
                    name TEXT NOT NULL,
                    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
                    transport TEXT NOT NULL CHECK (transport IN ('tcp', 'udp', 'both')),
                    PRIMARY KEY (desktop_id, name)
                );

                CREATE TABLE user_account (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    login TEXT NOT NULL UNIQUE COLLATE NOCASE,
                    password_hash TEXT NOT NULL,
                    display_name TEXT NOT NULL DEFAULT '',
                    role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
                    enabled BOOLEAN NOT NULL DEFAULT 1,
                    created DATETIME NOT NULL,
                    updated DATETIME NOT NULL
                );

                -- Only the SHA-256 of a bearer token is kept.
                CREATE TABLE user_session (
                    token_hash TEXT PRIMARY KEY NOT NULL,
                    user_id INTEGER NOT NULL REFERENCES user_account(id) ON DELETE CASCADE,
                    created DATETIME NOT NULL,
                    expires DATETIME NOT NULL,
                    client_address TEXT NOT NULL DEFAULT ''
                ) WITHOUT ROWID;
                CREATE INDEX user_session_user_id ON user_session(user_id);
                CREATE INDEX user_session_expires ON user_session(expires);
                """)
        }
        migrator.registerMigration("0002-control-plane") { db in
            // The control key is kept as it was issued (base64url): the broker
            // signs pushes with it, so it cannot be hashed. key_fingerprint
            // (from 0001) identifies it in --info without revealing it.
            try db.execute(sql: """
                ALTER TABLE gateway ADD COLUMN control_key TEXT;
                ALTER TABLE gateway ADD COLUMN control_url TEXT NOT NULL DEFAULT '';
                ALTER TABLE gateway ADD COLUMN port_first INTEGER;
                ALTER TABLE gateway ADD COLUMN port_last INTEGER;
                ALTER TABLE gateway ADD COLUMN load REAL;
                ALTER TABLE gateway ADD COLUMN active_sessions INTEGER;

                ALTER TABLE user_session ADD COLUMN login_gateway_id INTEGER REFERENCES gateway(id) ON DELETE SET NULL;

                -- Rules the broker pushed: one per connect call, until disconnect.
                CREATE TABLE gateway_rule (
                    id TEXT PRIMARY KEY NOT NULL,
                    gateway_id INTEGER NOT NULL REFERENCES gateway(id) ON DELETE RESTRICT,
                    desktop_id INTEGER REFERENCES desktop(id) ON DELETE RESTRICT,
                    user_id INTEGER REFERENCES user_account(id) ON DELETE SET NULL,
                    protocol_name TEXT NOT NULL,
                    push TEXT NOT NULL,
                    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
                    created DATETIME NOT NULL
                ) WITHOUT ROWID;
                CREATE INDEX gateway_rule_gateway_id ON gateway_rule(gateway_id);
                CREATE INDEX gateway_rule_desktop_id ON gateway_rule(desktop_id);
                """)
        }
        migrator.registerMigration("0003-connection-groups") { db in
            try db.execute(sql: """
                -- A connect call through a cluster with load_balance_via E pushes
                -- one rule to every gateway of the cluster: they share the
                -- connection id (the first rule's id), which disconnect takes.
                ALTER TABLE gateway_rule ADD COLUMN connection_id TEXT;
                UPDATE gateway_rule SET connection_id = id;
                CREATE INDEX gateway_rule_connection_id ON gateway_rule(connection_id);
                """)
        }
        migrator.registerMigration("0004-entitlements") { db in
            try db.execute(sql: """
                -- The users entitled to a desktop; a desktop with none is open
                -- to every enabled user (the REST connect call and the PCoIP
                -- broker protocol both go by it).
                CREATE TABLE desktop_user (
                    desktop_id INTEGER NOT NULL REFERENCES desktop(id) ON DELETE CASCADE,
                    user_id INTEGER NOT NULL REFERENCES user_account(id) ON DELETE CASCADE,
                    PRIMARY KEY (desktop_id, user_id)
                ) WITHOUT ROWID;
                CREATE INDEX desktop_user_user_id ON desktop_user(user_id);
                """)
        }
        migrator.registerMigration("0005-forwarding-path") { db in
            try db.execute(sql: """
                -- The path a gateway's pushed rules take (issue 12): '' for
                -- the gateway's own default, else userspace, kernel or offload.
                ALTER TABLE gateway ADD COLUMN forwarding_path TEXT NOT NULL DEFAULT ''
                    CHECK (forwarding_path IN ('', 'userspace', 'kernel', 'offload'));
                """)
        }
        migrator.registerMigration("0006-control-certificate") { db in
            try db.execute(sql: """
                -- The certificate of a gateway's https control endpoint, from its
                -- signed registration (issue 14): pinned for the broker's pushes.
                ALTER TABLE gateway ADD COLUMN control_certificate TEXT;
                """)
        }
        migrator.registerMigration("0007-pending-rules") { _ in
            // PostgreSQL's brokers share their reservations of rules being
            // pushed in an unlogged table; an SQLite file serves one broker,
            // which keeps them in memory (`SQLiteBrokerStore.reserveRules`).
            // Nothing to change here: the identifier keeps both lists alike.
        }
        return migrator
    }
}
