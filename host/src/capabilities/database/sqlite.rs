//! SQLite: the embedded default's domain database (by default the same
//! file as the embedded broker, through a pool of its own), and layer 2 of
//! the grants: an **authorizer callback** (`sqlite3_set_authorizer`).
//!
//! Every connection of this pool gets a deny-all authorizer the moment it
//! is opened (only `SELECT` without tables, and the host's own
//! `BEGIN`/`COMMIT`/`ROLLBACK` pass), so a connection is never usable
//! without a policy. A call installs its plugin's policy for its duration
//! (the connection's handle is locked while the callback is swapped:
//! `SqliteConnection::lock_handle`) and puts the deny-all one back after.
//! Installing an authorizer expires every prepared statement of the
//! connection, so a statement cached under one plugin's policy is
//! re-prepared — and re-authorized — under the next one. A call that is
//! dropped half-way (job timeout) closes its connection instead of giving
//! it back.
//!
//! The policy allows, per table: `SQLITE_READ` of granted tables (read or
//! write), `INSERT`/`UPDATE`/`DELETE` of `database.write` tables; reads
//! through a view that is itself granted; the eponymous virtual tables
//! `json_each`/`json_tree`; `SQLITE_FUNCTION` except the deny list of the
//! parser layer. Everything else — `ATTACH`, `DETACH`, `PRAGMA` (also the
//! `pragma_*` table functions), DDL, `SAVEPOINT`, virtual-table creation,
//! `celer_*`/`sqlite_*` tables — is denied. A trigger that writes a table
//! outside the grants is denied too (as a PostgreSQL trigger runs with the
//! plugin's role).
//!
//! Foreign keys: SQLite asks the authorizer for the reads of a foreign-key
//! check and the writes of `ON DELETE/UPDATE CASCADE | SET NULL | SET
//! DEFAULT`, which PostgreSQL performs as the table's owner. So that the
//! same statement works on both backends, the policy also allows reading
//! the parents and children of `database.write` tables, and updating and
//! deleting rows of the tables such actions reach (transitively). The
//! parser layer still refuses any statement that *names* those tables
//! without a grant.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libsqlite3_sys as ffi;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Executor, Row, Sqlite};

use super::DbError;
use super::sqlcheck::{self, Dialect, Policy};
use crate::runtime::manifest::DatabaseGrants;

/// How long a writer waits for another's write lock (the broker shares the file).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call waits for a free connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one plugin may do on SQLite, as the authorizer checks it.
#[derive(Debug, Default)]
pub struct AuthPolicy {
    policy: Policy,
    /// Parents and children of written tables (foreign-key checks).
    fk_read: BTreeSet<String>,
    /// Tables reached by cascading foreign-key actions of written tables.
    fk_write: BTreeSet<String>,
    /// The tables and views of the database when the policy was built.
    schema: BTreeSet<String>,
}

impl AuthPolicy {
    fn can_read(&self, table: &str, view: Option<&str>) -> bool {
        if sqlcheck::is_reserved(table) {
            return false;
        }
        self.policy.can_read(table)
            || self.fk_read.contains(table)
            || matches!(table, "json_each" | "json_tree")
            || view.is_some_and(|v| self.policy.can_read(v))
    }

    fn can_change(&self, table: &str) -> bool {
        !sqlcheck::is_reserved(table) && (self.policy.can_write(table) || self.fk_write.contains(table))
    }

    /// The authorizer's answer for one action.
    fn decide(&self, action: c_int, a1: Option<&str>, a2: Option<&str>, db: Option<&str>, inner: Option<&str>) -> c_int {
        let table = || -> Option<String> {
            let t = a1?.to_ascii_lowercase();
            match db {
                None | Some("main") => Some(t),
                Some(other) => Some(format!("{}.{t}", other.to_ascii_lowercase())),
            }
        };
        let inner = inner.map(str::to_ascii_lowercase);
        let ok = match action {
            ffi::SQLITE_SELECT | ffi::SQLITE_RECURSIVE | ffi::SQLITE_TRANSACTION => true,
            // A read of no column names its table without a schema, as do
            // the CTEs and subqueries it may really be: only a name that is
            // a table (or a reserved one) needs a grant then.
            ffi::SQLITE_READ if db.is_none() && a2 == Some("") => a1.is_some_and(|t| {
                let t = t.to_ascii_lowercase();
                !sqlcheck::is_reserved(&t) && (!self.schema.contains(&t) || self.can_read(&t, inner.as_deref()))
            }),
            ffi::SQLITE_READ => table().is_some_and(|t| self.can_read(&t, inner.as_deref())),
            ffi::SQLITE_INSERT => table().is_some_and(|t| self.policy.can_write(&t)),
            ffi::SQLITE_UPDATE | ffi::SQLITE_DELETE => table().is_some_and(|t| self.can_change(&t)),
            ffi::SQLITE_FUNCTION => a2.is_some_and(|f| !sqlcheck::function_denied(&f.to_ascii_lowercase())),
            _ => false,
        };
        if ok { ffi::SQLITE_OK } else { ffi::SQLITE_DENY }
    }
}

fn opt_str<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        None
    } else {
        // SAFETY: SQLite passes NUL-terminated strings valid for the call.
        unsafe { CStr::from_ptr(p) }.to_str().ok()
    }
}

/// The authorizer of a call: `user` is an `Arc<AuthPolicy>` leaked by [`Session::enter`].
extern "C" fn authorize(user: *mut c_void, action: c_int, a1: *const c_char, a2: *const c_char, db: *const c_char, inner: *const c_char) -> c_int {
    if user.is_null() {
        return ffi::SQLITE_DENY;
    }
    // SAFETY: `user` is the pointer of an Arc<AuthPolicy> kept alive (one
    // strong count held by the connection) until the authorizer is replaced.
    let policy = unsafe { &*(user as *const AuthPolicy) };
    policy.decide(action, opt_str(a1), opt_str(a2), opt_str(db), opt_str(inner))
}

/// The authorizer of an idle connection: no tables, no changes.
extern "C" fn deny_all(_user: *mut c_void, action: c_int, _a1: *const c_char, _a2: *const c_char, _db: *const c_char, _inner: *const c_char) -> c_int {
    match action {
        ffi::SQLITE_SELECT | ffi::SQLITE_TRANSACTION => ffi::SQLITE_OK,
        _ => ffi::SQLITE_DENY,
    }
}

/// Which authorizer to install.
enum Auth {
    DenyAll,
    /// The address of an `Arc<AuthPolicy>` (an integer, so that futures stay `Send`).
    Policy(usize),
}

async fn set_authorizer(conn: &mut SqliteConnection, auth: Auth) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: the handle is locked (the connection's worker thread is not
    // using it); the callback and its argument outlive their installation.
    let rc = unsafe {
        match auth {
            Auth::DenyAll => ffi::sqlite3_set_authorizer(db, Some(deny_all), std::ptr::null_mut()),
            Auth::Policy(p) => ffi::sqlite3_set_authorizer(db, Some(authorize), p as *mut c_void),
        }
    };
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!("sqlite3_set_authorizer failed with code {rc}")))
    }
}

/// A plugin's cached policy.
struct Cached {
    grants: DatabaseGrants,
    auth: Arc<AuthPolicy>,
    /// Every granted table existed when the policy was built; otherwise it
    /// is built again at the next call (tables created after load).
    complete: bool,
}

/// The SQLite backend.
pub struct Lite {
    pool: SqlitePool,
    options: SqliteConnectOptions,
    policies: Mutex<HashMap<String, Cached>>,
}

impl Lite {
    /// A lazily connecting pool on `url` (`sqlite://path`).
    pub fn connect(url: &str, max_connections: u32) -> Result<Lite, String> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| format!("invalid SQLite URL: {e}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _meta| Box::pin(async move { set_authorizer(conn, Auth::DenyAll).await }))
            .connect_lazy_with(options.clone());
        Ok(Lite { pool, options, policies: Mutex::new(HashMap::new()) })
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        let mut conn = self.pool.acquire().await.map_err(super::map_sqlx)?;
        conn.execute("SELECT 1").await.map_err(super::map_sqlx)?;
        Ok(())
    }

    /// Builds the plugin's policy at load. Tables that do not exist yet
    /// are only a warning here: the embedded default's domain schema is
    /// often created after the host starts.
    pub async fn prepare(&self, plugin: &str, grants: &DatabaseGrants) -> Result<(), DbError> {
        let (auth, missing) = self.build(grants).await?;
        if !missing.is_empty() {
            tracing::warn!(plugin, tables = ?missing, "database grants name tables that do not exist (yet) in the SQLite database");
        }
        self.policies.lock().expect("policies").insert(
            plugin.to_string(),
            Cached { grants: grants.clone(), auth: Arc::new(auth), complete: missing.is_empty() },
        );
        Ok(())
    }

    /// The policy of `plugin` for a call with `grants`.
    async fn policy(&self, plugin: &str, grants: &DatabaseGrants) -> Result<Arc<AuthPolicy>, DbError> {
        if let Some(c) = self.policies.lock().expect("policies").get(plugin)
            && c.complete
            && &c.grants == grants
        {
            return Ok(c.auth.clone());
        }
        let (auth, missing) = self.build(grants).await?;
        let auth = Arc::new(auth);
        let mut policies = self.policies.lock().expect("policies");
        // Only the load-time grants are cached; an older version's job
        // (during a hot reload) builds its own.
        match policies.get(plugin) {
            Some(c) if &c.grants != grants => {}
            _ => {
                policies.insert(plugin.to_string(), Cached { grants: grants.clone(), auth: auth.clone(), complete: missing.is_empty() });
            }
        }
        Ok(auth)
    }

    /// The policy for `grants`, with the foreign-key allowances the schema
    /// implies, and the granted tables that do not exist.
    async fn build(&self, grants: &DatabaseGrants) -> Result<(AuthPolicy, Vec<String>), DbError> {
        let policy = Policy::from_grants(grants, Dialect::Sqlite);
        // A connection of its own, without an authorizer: the host reads the schema.
        let mut conn = SqliteConnection::connect_with(&self.options).await.map_err(super::map_sqlx)?;
        let existing: BTreeSet<String> = sqlx::query("SELECT lower(name) FROM sqlite_schema WHERE type IN ('table', 'view')")
            .fetch_all(&mut conn)
            .await
            .map_err(super::map_sqlx)?
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        // child → parent edges, with their actions.
        let edges: Vec<(String, String, bool)> = sqlx::query(
            "SELECT lower(m.name), lower(f.\"table\"), f.on_delete, f.on_update
               FROM sqlite_schema m, pragma_foreign_key_list(m.name) f WHERE m.type = 'table'",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(super::map_sqlx)?
        .iter()
        .map(|r| {
            let acts = |a: String| !matches!(a.to_ascii_uppercase().as_str(), "NO ACTION" | "RESTRICT");
            let cascades = acts(r.get(2)) || acts(r.get(3));
            (r.get(0), r.get(1), cascades)
        })
        .collect();
        let _ = conn.close().await;

        let mut fk_read = BTreeSet::new();
        let mut fk_write = BTreeSet::new();
        let mut frontier: Vec<String> = policy.write.iter().cloned().collect();
        let mut seen: BTreeSet<String> = frontier.iter().cloned().collect();
        for (child, parent, _) in &edges {
            if policy.write.contains(child) {
                fk_read.insert(parent.clone());
            }
            if policy.write.contains(parent) {
                fk_read.insert(child.clone());
            }
        }
        while let Some(table) = frontier.pop() {
            for (child, parent, cascades) in &edges {
                if parent == &table && *cascades {
                    fk_write.insert(child.clone());
                    fk_read.insert(child.clone());
                    if seen.insert(child.clone()) {
                        frontier.push(child.clone());
                    }
                }
            }
        }
        let missing = policy.tables().filter(|t| !existing.contains(*t)).cloned().collect();
        Ok((AuthPolicy { policy, fk_read, fk_write, schema: existing }, missing))
    }

    /// A connection under `plugin`'s policy; in a transaction when `txn`.
    pub async fn open(&self, plugin: &str, grants: &DatabaseGrants, txn: bool) -> Result<Session, DbError> {
        let auth = self.policy(plugin, grants).await?;
        let conn = self.pool.acquire().await.map_err(super::map_sqlx)?;
        let mut session = Session { conn: Some(conn), installed: 0, in_txn: false };
        session.enter(auth).await?;
        if txn {
            session.conn().execute("BEGIN").await.map_err(super::map_sqlx)?;
            session.in_txn = true;
        }
        Ok(session)
    }

    /// A connection under an explicit policy, bypassing the parser layer
    /// (for tests of layer 2 on its own).
    #[cfg(test)]
    pub async fn open_with(&self, auth: AuthPolicy) -> Result<Session, DbError> {
        let conn = self.pool.acquire().await.map_err(super::map_sqlx)?;
        let mut session = Session { conn: Some(conn), installed: 0, in_txn: false };
        session.enter(Arc::new(auth)).await?;
        Ok(session)
    }
}

/// One pooled connection with a plugin's authorizer installed.
pub struct Session {
    conn: Option<PoolConnection<Sqlite>>,
    /// The `Arc<AuthPolicy>` pointer the connection holds (0: deny-all).
    installed: usize,
    in_txn: bool,
}

impl Session {
    async fn enter(&mut self, auth: Arc<AuthPolicy>) -> Result<(), DbError> {
        let ptr = Arc::into_raw(auth) as usize;
        match set_authorizer(self.conn(), Auth::Policy(ptr)).await {
            Ok(()) => {
                self.installed = ptr;
                Ok(())
            }
            Err(e) => {
                // SAFETY: not installed; take back the count `into_raw` leaked.
                drop(unsafe { Arc::from_raw(ptr as *const AuthPolicy) });
                Err(super::map_sqlx(e))
            }
        }
    }

    pub fn conn(&mut self) -> &mut SqliteConnection {
        self.conn.as_mut().expect("session connection")
    }

    /// Ends the transaction (if any), restores the deny-all authorizer and
    /// gives the connection back to the pool.
    pub async fn finish(mut self, commit: bool) -> Result<(), DbError> {
        let mut result = Ok(());
        if self.in_txn {
            result = self.conn().execute(if commit { "COMMIT" } else { "ROLLBACK" }).await.map(|_| ()).map_err(super::map_sqlx);
            if result.is_ok() {
                self.in_txn = false;
            }
        }
        if self.installed != 0 && set_authorizer(self.conn(), Auth::DenyAll).await.is_ok() {
            // SAFETY: the connection no longer holds the pointer.
            drop(unsafe { Arc::from_raw(self.installed as *const AuthPolicy) });
            self.installed = 0;
        }
        result
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Dropped mid-call or in a transaction: close the connection (which
        // rolls the transaction back) rather than pool it with a plugin's
        // authorizer. The policy's count stays leaked: the closing
        // connection may still point at it.
        if (self.installed != 0 || self.in_txn)
            && let Some(conn) = self.conn.as_mut()
        {
            conn.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    async fn lite(dir: &tempfile::TempDir) -> Lite {
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let lite = Lite::connect(&url, 2).expect("connect");
        let mut admin = SqliteConnection::connect_with(&lite.options).await.expect("admin");
        for ddl in [
            "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)",
            "CREATE TABLE secrets (id INTEGER PRIMARY KEY, value TEXT)",
            "CREATE TABLE exports (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(id))",
            "CREATE TABLE audit (id INTEGER PRIMARY KEY, what TEXT)",
            "CREATE TRIGGER exports_audit AFTER INSERT ON exports BEGIN INSERT INTO audit (what) VALUES ('export'); END",
            "CREATE TABLE parents (id INTEGER PRIMARY KEY)",
            "CREATE TABLE kids (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parents(id) ON DELETE CASCADE)",
            "INSERT INTO users VALUES (1, 'a@example.com')",
            "INSERT INTO secrets VALUES (1, 'hunter2')",
            "INSERT INTO parents VALUES (1)",
            "INSERT INTO kids VALUES (1, 1)",
        ] {
            admin.execute(ddl).await.expect(ddl);
        }
        lite
    }

    fn grants(read: &[&str], write: &[&str]) -> DatabaseGrants {
        DatabaseGrants { read: read.iter().map(|s| s.to_string()).collect(), write: write.iter().map(|s| s.to_string()).collect() }
    }

    async fn run(s: &mut Session, sql: &str) -> Result<u64, DbError> {
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).fetch(s.conn());
        let mut n = 0;
        while rows.try_next().await.map_err(super::super::map_sqlx)?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Layer 2 on its own: statements the parser would refuse, sent
    /// straight to a connection under the plugin's authorizer.
    #[tokio::test]
    async fn the_authorizer_blocks_what_the_parser_would_have_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lite = lite(&dir).await;
        let (auth, missing) = lite.build(&grants(&["users"], &["exports"])).await.unwrap();
        assert!(missing.is_empty());
        let mut s = lite.open_with(auth).await.unwrap();
        assert_eq!(run(&mut s, "SELECT * FROM users").await.unwrap(), 1);
        assert_eq!(run(&mut s, "WITH c AS (SELECT 1) SELECT count(*) FROM c, users, (SELECT 2)").await.unwrap(), 1);
        for sql in [
            "SELECT * FROM secrets",
            "SELECT (SELECT value FROM secrets) AS v",
            "SELECT * FROM users WHERE id IN (SELECT id FROM secrets)",
            "SELECT count(*) FROM secrets",
            "WITH s AS (SELECT 1) SELECT count(*) FROM secrets, s",
            "SELECT * FROM sqlite_master",
            "SELECT * FROM pragma_table_info('secrets')",
            "PRAGMA table_info(secrets)",
            "DELETE FROM users",
            "UPDATE users SET email = 'x'",
            "INSERT INTO secrets (value) VALUES ('x')",
            "CREATE TABLE evil (x)",
            "DROP TABLE secrets",
            "ATTACH DATABASE ':memory:' AS other",
            "SELECT load_extension('x')",
            "SAVEPOINT a",
        ] {
            let r = run(&mut s, sql).await;
            assert!(matches!(r, Err(DbError::Denied(_))), "{sql}: {r:?}");
        }
        // A trigger that writes outside the grants is blocked too.
        let r = run(&mut s, "INSERT INTO exports (user_id) VALUES (1)").await;
        assert!(matches!(r, Err(DbError::Denied(_))), "{r:?}");
        s.finish(false).await.unwrap();
    }

    #[tokio::test]
    async fn foreign_key_checks_and_cascades_follow_the_written_tables() {
        let dir = tempfile::tempdir().unwrap();
        let lite = lite(&dir).await;
        let mut admin = SqliteConnection::connect_with(&lite.options).await.unwrap();
        admin.execute("DROP TRIGGER exports_audit").await.unwrap();
        let (auth, _) = lite.build(&grants(&[], &["exports", "parents"])).await.unwrap();
        assert!(auth.fk_read.contains("users") && auth.fk_write.contains("kids"), "{auth:?}");
        let mut s = lite.open_with(auth).await.unwrap();
        run(&mut s, "INSERT INTO exports (user_id) VALUES (1)").await.expect("FK check reads users");
        run(&mut s, "DELETE FROM parents WHERE id = 1").await.expect("cascade deletes kids");
        s.finish(true).await.unwrap();
        let kids: i64 = sqlx::query_scalar("SELECT count(*) FROM kids").fetch_one(&mut admin).await.unwrap();
        assert_eq!(kids, 0);
    }

    #[tokio::test]
    async fn an_idle_connection_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let lite = lite(&dir).await;
        let mut conn = lite.pool.acquire().await.unwrap();
        conn.execute("SELECT 1").await.expect("a table-less select passes");
        let r = conn.execute("SELECT * FROM users").await;
        assert!(matches!(r.map_err(super::super::map_sqlx), Err(DbError::Denied(_))));
    }
}
