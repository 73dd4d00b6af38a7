//! PostgreSQL, and layer 2 of the grants: **a role per plugin**.
//!
//! At load ([`Pg::prepare`]) the host creates — idempotently, under an
//! advisory lock so that several hosts agree — a `NOLOGIN` role named
//! `<role_prefix><plugin>` (default `celer_plugin_<plugin>`), makes the
//! connecting user a member of it (so that it may `SET ROLE` to it),
//! revokes every privilege the role had, and grants:
//!
//! * `SELECT` on each `database.read` table;
//! * `SELECT, INSERT, UPDATE, DELETE` on each `database.write` table, and
//!   `USAGE, SELECT` on the sequences those tables own (`serial` columns);
//! * `USAGE` on the schemas of those tables.
//!
//! A granted table that does not exist refuses the load with the table's
//! name. If the database cannot be reached at load, the plugin still loads
//! and the role is prepared at its first call (until then calls are
//! `unavailable`).
//!
//! Every call runs in a transaction that starts
//! `SET LOCAL ROLE <role>; SET LOCAL search_path TO public` (a `query`
//! outside a plugin transaction in a `READ ONLY` one), and inside a
//! plugin's own transaction the role is set again before each statement.
//! So a statement that slipped past the parser still runs with the
//! plugin's privileges only: PostgreSQL answers `permission denied`, which
//! the plugin gets as `denied`. What every role can do anyway stays
//! possible (reading the system catalogs; `TEMP` tables where the database
//! grants `TEMP` to `PUBLIC`); the parser layer refuses those statements.
//!
//! The connecting user needs `CREATEROLE` and must own the granted tables
//! (or hold them `WITH GRANT OPTION`) — for a Django database, connect as
//! the user that ran the migrations.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor, Postgres, Row, Transaction};

use super::DbError;
use crate::runtime::manifest::DatabaseGrants;

/// How long a call waits for a connection (also bounds connecting to a
/// server that is down).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// PostgreSQL truncates longer identifiers.
const MAX_IDENTIFIER: usize = 63;

/// A quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether the plugin's role is ready.
enum RoleState {
    Ready,
    /// The database was unreachable at load: prepare at the first call.
    Pending(DatabaseGrants),
}

/// Why preparing a role failed.
pub enum PrepareError {
    /// The database cannot be reached; try again later.
    Unreachable(String),
    /// The grants cannot be honoured (missing table, no privilege to grant).
    Refused(String),
}

/// The PostgreSQL backend.
pub struct Pg {
    pool: PgPool,
    prefix: String,
    roles: Mutex<HashMap<String, RoleState>>,
}

impl Pg {
    /// A lazily connecting pool on `url`.
    pub fn connect(url: &str, prefix: &str, max_connections: u32) -> Result<Pg, String> {
        let options: PgConnectOptions = url.parse().map_err(|e| format!("invalid PostgreSQL URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Pg { pool, prefix: prefix.to_string(), roles: Mutex::new(HashMap::new()) })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The role of `plugin`.
    pub fn role(&self, plugin: &str) -> Result<String, String> {
        let role = format!("{}{plugin}", self.prefix);
        if role.len() > MAX_IDENTIFIER {
            return Err(format!("role name {role:?} is longer than PostgreSQL's {MAX_IDENTIFIER} bytes; shorten the plugin name or [database] role_prefix"));
        }
        Ok(role)
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        self.pool.execute("SELECT 1").await.map(|_| ()).map_err(super::map_sqlx)
    }

    /// At load: the plugin's role with exactly `grants`. Unreachable is
    /// not fatal (the role is prepared at the first call).
    pub async fn prepare(&self, plugin: &str, grants: &DatabaseGrants) -> Result<(), String> {
        match self.apply(plugin, grants).await {
            Ok(()) => {
                self.roles.lock().expect("roles").insert(plugin.to_string(), RoleState::Ready);
                Ok(())
            }
            Err(PrepareError::Refused(reason)) => Err(reason),
            Err(PrepareError::Unreachable(reason)) => {
                tracing::warn!(plugin, %reason, "PostgreSQL unreachable at load; the plugin's role is prepared at its first call");
                self.roles.lock().expect("roles").insert(plugin.to_string(), RoleState::Pending(grants.clone()));
                Ok(())
            }
        }
    }

    /// For a plugin reloaded without database grants: the role its earlier
    /// version used (in this process) is stripped of its privileges. Best
    /// effort: with no grants every call is refused before the database.
    pub async fn revoke_if_known(&self, plugin: &str) {
        if self.roles.lock().expect("roles").remove(plugin).is_none() {
            return;
        }
        if let Err(PrepareError::Refused(e) | PrepareError::Unreachable(e)) = self.apply(plugin, &DatabaseGrants::default()).await {
            tracing::warn!(plugin, error = %e, "could not revoke the privileges of the plugin's role");
        }
    }

    /// Before a call: the role is ready, or is made ready now.
    async fn ensure(&self, plugin: &str, grants: &DatabaseGrants) -> Result<String, DbError> {
        let role = self.role(plugin).map_err(DbError::Invalid)?;
        let pending = match self.roles.lock().expect("roles").get(plugin) {
            Some(RoleState::Ready) => return Ok(role),
            Some(RoleState::Pending(g)) => g.clone(),
            None => grants.clone(),
        };
        match self.apply(plugin, &pending).await {
            Ok(()) => {
                self.roles.lock().expect("roles").insert(plugin.to_string(), RoleState::Ready);
                Ok(role)
            }
            Err(PrepareError::Unreachable(r)) => Err(DbError::Unavailable(r)),
            Err(PrepareError::Refused(r)) => Err(DbError::Unavailable(format!("the plugin's database role cannot be prepared: {r}"))),
        }
    }

    /// Creates the role and sets its privileges to exactly `grants`, in one transaction.
    async fn apply(&self, plugin: &str, grants: &DatabaseGrants) -> Result<(), PrepareError> {
        let role = self.role(plugin).map_err(PrepareError::Refused)?;
        let q = quote_ident(&role);
        let unreachable = |e: sqlx::Error| match super::map_sqlx(e) {
            DbError::Unavailable(m) => PrepareError::Unreachable(m),
            DbError::Denied(m) | DbError::Invalid(m) => PrepareError::Refused(m),
        };
        let mut tx = self.pool.begin().await.map_err(unreachable)?;
        let c = &mut *tx;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('celer-role:' || $1))").bind(&role).execute(&mut *c).await.map_err(unreachable)?;
        let exists = sqlx::query("SELECT 1 FROM pg_roles WHERE rolname = $1").bind(&role).fetch_optional(&mut *c).await.map_err(unreachable)?.is_some();
        if !exists {
            c.execute(AssertSqlSafe(format!("CREATE ROLE {q} NOLOGIN NOINHERIT"))).await.map_err(unreachable)?;
        }
        let member = sqlx::query("SELECT pg_has_role(current_user, $1, 'MEMBER')").bind(&role).fetch_one(&mut *c).await.map_err(unreachable)?.get::<bool, _>(0);
        if !member {
            c.execute(AssertSqlSafe(format!("GRANT {q} TO CURRENT_USER"))).await.map_err(unreachable)?;
        }

        // Forget what the role could do before.
        let held = sqlx::query(
            "SELECT c.oid::regclass::text, c.relkind::text FROM pg_class c, aclexplode(c.relacl) a
              WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = $1)
              GROUP BY 1, 2",
        )
        .bind(&role)
        .fetch_all(&mut *c)
        .await
        .map_err(unreachable)?;
        for r in held {
            let (name, kind): (String, String) = (r.get(0), r.get(1));
            let what = if kind == "S" { "SEQUENCE" } else { "TABLE" };
            c.execute(AssertSqlSafe(format!("REVOKE ALL ON {what} {name} FROM {q}"))).await.map_err(unreachable)?;
        }
        let schemas = sqlx::query(
            "SELECT DISTINCT n.nspname FROM pg_namespace n, aclexplode(n.nspacl) a
              WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = $1)",
        )
        .bind(&role)
        .fetch_all(&mut *c)
        .await
        .map_err(unreachable)?;
        for s in schemas {
            let name: String = s.get(0);
            c.execute(AssertSqlSafe(format!("REVOKE ALL ON SCHEMA {} FROM {q}", quote_ident(&name)))).await.map_err(unreachable)?;
        }

        // Grant exactly the manifest.
        let tables = grants.read.iter().map(|t| (t, false)).chain(grants.write.iter().map(|t| (t, true)));
        for (table, write) in tables {
            let qualified = if table.contains('.') { table.to_ascii_lowercase() } else { format!("public.{}", table.to_ascii_lowercase()) };
            let found = sqlx::query(
                "SELECT c.oid::regclass::text, quote_ident(n.nspname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'v', 'm', 'p', 'f')",
            )
            .bind(&qualified)
            .fetch_optional(&mut *c)
            .await
            .map_err(unreachable)?;
            let Some(found) = found else {
                let grant = if write { "database.write" } else { "database.read" };
                return Err(PrepareError::Refused(format!("{grant} names table {table:?}, which does not exist in the database")));
            };
            let (regclass, schema): (String, String) = (found.get(0), found.get(1));
            c.execute(AssertSqlSafe(format!("GRANT USAGE ON SCHEMA {schema} TO {q}"))).await.map_err(unreachable)?;
            let privileges = if write { "SELECT, INSERT, UPDATE, DELETE" } else { "SELECT" };
            c.execute(AssertSqlSafe(format!("GRANT {privileges} ON TABLE {regclass} TO {q}"))).await.map_err(unreachable)?;
            if write {
                let sequences = sqlx::query(
                    "SELECT s.oid::regclass::text FROM pg_class s JOIN pg_depend d ON d.objid = s.oid
                      WHERE s.relkind = 'S' AND d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                        AND d.refobjid = to_regclass($1) AND d.deptype IN ('a', 'i')",
                )
                .bind(&qualified)
                .fetch_all(&mut *c)
                .await
                .map_err(unreachable)?;
                for s in sequences {
                    let seq: String = s.get(0);
                    c.execute(AssertSqlSafe(format!("GRANT USAGE, SELECT ON SEQUENCE {seq} TO {q}"))).await.map_err(unreachable)?;
                }
            }
        }
        tx.commit().await.map_err(unreachable)?;
        tracing::info!(plugin, role = %role, read = ?grants.read, write = ?grants.write, "PostgreSQL role prepared");
        Ok(())
    }

    /// A connection in a transaction under `plugin`'s role.
    pub async fn open(&self, plugin: &str, grants: &DatabaseGrants, read_only: bool) -> Result<Session, DbError> {
        let role = self.ensure(plugin, grants).await?;
        self.open_as(&role, read_only).await
    }

    /// A connection in a transaction under `role`, bypassing the parser
    /// layer (also for tests of layer 2 on its own).
    pub async fn open_as(&self, role: &str, read_only: bool) -> Result<Session, DbError> {
        let set_role = format!("SET LOCAL ROLE {}; SET LOCAL search_path TO public", quote_ident(role));
        let begin = if read_only { "BEGIN READ ONLY" } else { "BEGIN" };
        let tx = self.pool.begin_with(AssertSqlSafe(format!("{begin}; {set_role}"))).await.map_err(super::map_sqlx)?;
        Ok(Session { tx, set_role })
    }
}

/// One pooled connection inside a transaction under a plugin's role.
/// Dropping it rolls the transaction back.
pub struct Session {
    tx: Transaction<'static, Postgres>,
    set_role: String,
}

impl Session {
    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// Sets the role again (before each statement of a plugin's own
    /// transaction, in case an earlier one reset it).
    pub async fn reassert_role(&mut self) -> Result<(), DbError> {
        sqlx::raw_sql(AssertSqlSafe(self.set_role.clone())).execute(&mut *self.tx).await.map(|_| ()).map_err(super::map_sqlx)
    }

    pub async fn finish(self, commit: bool) -> Result<(), DbError> {
        if commit { self.tx.commit().await } else { self.tx.rollback().await }.map_err(super::map_sqlx)
    }
}
