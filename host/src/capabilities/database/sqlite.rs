//! SQLite: the embedded default's domain database (by default the same
//! file as the embedded broker, through a pool of its own), and layer 2 of
//! the grants: an **authorizer callback** (`sqlite3_set_authorizer`).
//!
//! Every connection of the plugins' pool (kept by this module, apart from
//! the broker's) has the authorizer installed from the moment it is opened,
//! with a *slot* as its argument: the slot holds the policy of the call the
//! connection is running, and is empty while the connection is idle — then
//! only `SELECT` without tables and the host's own `BEGIN`/`COMMIT`/
//! `ROLLBACK` pass, so a connection is never usable without a policy.
//! SQLite authorizes a statement when it prepares it, and sqlx caches
//! prepared statements per connection: when a connection serves a policy
//! other than the one its cached statements were prepared under, the
//! authorizer is installed again, which expires every prepared statement,
//! so each is prepared — and authorized — again under the new policy. A
//! call dropped half-way (job timeout) closes its connection instead of
//! giving it back.
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
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Executor, Row};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// A connection's authorizer argument: the policy of the call it is
/// running, none while it is idle (then only `SELECT` without tables and
/// the host's `BEGIN`/`COMMIT`/`ROLLBACK` pass).
#[derive(Default)]
struct Slot {
    policy: Mutex<Option<Arc<AuthPolicy>>>,
}

impl Slot {
    fn set(&self, policy: Option<Arc<AuthPolicy>>) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }
}

/// The authorizer of every connection of the pool; `user` is its [`Slot`].
extern "C" fn authorize(user: *mut c_void, action: c_int, a1: *const c_char, a2: *const c_char, db: *const c_char, inner: *const c_char) -> c_int {
    if user.is_null() {
        return ffi::SQLITE_DENY;
    }
    // SAFETY: `user` is the address of the connection's Slot, which lives as
    // long as the connection (it is leaked when a connection is abandoned).
    let slot = unsafe { &*(user as *const Slot) };
    let policy = slot.policy.lock().unwrap_or_else(|p| p.into_inner());
    match &*policy {
        Some(p) => p.decide(action, opt_str(a1), opt_str(a2), opt_str(db), opt_str(inner)),
        None => match action {
            ffi::SQLITE_SELECT | ffi::SQLITE_TRANSACTION => ffi::SQLITE_OK,
            _ => ffi::SQLITE_DENY,
        },
    }
}

/// Installs the authorizer with `slot` (its address, an integer so that
/// futures stay `Send`). Installing expires the connection's prepared
/// statements: they are prepared — and authorized — again at their next use.
async fn set_authorizer(conn: &mut SqliteConnection, slot: usize) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: the handle is locked (the connection's worker thread is not
    // using it); the slot outlives the connection.
    let rc = unsafe { ffi::sqlite3_set_authorizer(db, Some(authorize), slot as *mut c_void) };
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!("sqlite3_set_authorizer failed with code {rc}")))
    }
}

/// One connection of the plugins' pool.
struct Conn {
    conn: SqliteConnection,
    slot: Arc<Slot>,
    /// The policy the connection's cached statements were prepared under;
    /// held, so that its address cannot be reused by another policy.
    prepared_under: Option<Arc<AuthPolicy>>,
}

impl Conn {
    /// Abandons a connection that may be mid-statement: it closes in the
    /// background, so its slot must outlive it.
    fn abandon(self) {
        std::mem::forget(self.slot.clone());
        drop(self.conn);
    }
}

/// The pool of connections plugins use (the broker has its own). Kept by
/// hand rather than with sqlx's pool, so that each connection carries its
/// authorizer slot and switching to another call of the same plugin costs
/// no round trip to the connection's thread.
struct Pool {
    options: SqliteConnectOptions,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    async fn checkout(self: &Arc<Self>) -> Result<(Conn, OwnedSemaphorePermit), DbError> {
        let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| DbError::Unavailable("database: no SQLite connection free within the timeout".into()))?
            .map_err(|_| DbError::Unavailable("database: the pool is closed".into()))?;
        if let Some(c) = self.idle.lock().expect("idle").pop() {
            return Ok((c, permit));
        }
        let mut conn = SqliteConnection::connect_with(&self.options).await.map_err(super::map_sqlx)?;
        let slot = Arc::new(Slot::default());
        set_authorizer(&mut conn, Arc::as_ptr(&slot) as usize).await.map_err(super::map_sqlx)?;
        Ok((Conn { conn, slot, prepared_under: None }, permit))
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
    pool: Arc<Pool>,
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
        let pool = Pool {
            options: options.clone(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(max_connections.max(1) as usize)),
        };
        Ok(Lite { pool: Arc::new(pool), options, policies: Mutex::new(HashMap::new()) })
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        let (conn, permit) = self.pool.checkout().await?;
        let mut session = Session { conn: Some(conn), pool: self.pool.clone(), _permit: permit, in_txn: false, clean: false };
        session.conn().execute("SELECT 1").await.map_err(super::map_sqlx)?;
        session.finish(true).await
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
        let mut session = self.session(auth).await?;
        if txn {
            session.conn().execute("BEGIN").await.map_err(super::map_sqlx)?;
            session.in_txn = true;
        }
        Ok(session)
    }

    /// A connection under `auth`. Public to the tests of layer 2 on its
    /// own, which bypass the parser layer.
    pub(super) async fn session(&self, auth: Arc<AuthPolicy>) -> Result<Session, DbError> {
        let (mut conn, permit) = self.pool.checkout().await?;
        conn.slot.set(Some(auth.clone()));
        if !conn.prepared_under.as_ref().is_some_and(|p| Arc::ptr_eq(p, &auth)) {
            // Another policy prepared the cached statements: expire them.
            if let Err(e) = set_authorizer(&mut conn.conn, Arc::as_ptr(&conn.slot) as usize).await {
                conn.abandon();
                return Err(super::map_sqlx(e));
            }
            conn.prepared_under = Some(auth);
        }
        Ok(Session { conn: Some(conn), pool: self.pool.clone(), _permit: permit, in_txn: false, clean: false })
    }

    #[cfg(test)]
    async fn open_with(&self, auth: AuthPolicy) -> Result<Session, DbError> {
        self.session(Arc::new(auth)).await
    }
}

/// One connection of the pool with a plugin's policy in its slot.
pub struct Session {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    in_txn: bool,
    /// Ended by `finish`: the connection may serve another call.
    clean: bool,
}

impl Session {
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn.as_mut().expect("session connection").conn
    }

    /// Ends the transaction (if any), empties the slot and gives the
    /// connection back to the pool.
    pub async fn finish(mut self, commit: bool) -> Result<(), DbError> {
        let mut result = Ok(());
        if self.in_txn {
            result = self.conn().execute(if commit { "COMMIT" } else { "ROLLBACK" }).await.map(|_| ()).map_err(super::map_sqlx);
            if result.is_ok() {
                self.in_txn = false;
            }
        }
        self.clean = !self.in_txn;
        result
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        conn.slot.set(None);
        if self.clean {
            self.pool.idle.lock().expect("idle").push(conn);
        } else {
            // Dropped mid-call or in a transaction: close the connection
            // (which rolls the transaction back) instead of pooling it.
            conn.abandon();
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
    async fn a_statement_cached_under_one_policy_is_authorized_again_under_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let mut lite = lite(&dir).await;
        lite.pool = Lite::connect(&url, 1).unwrap().pool; // one connection
        let (allowed, _) = lite.build(&grants(&["secrets"], &[])).await.unwrap();
        let (refused, _) = lite.build(&grants(&["users"], &[])).await.unwrap();
        let (allowed, refused) = (Arc::new(allowed), Arc::new(refused));
        for _ in 0..2 {
            let mut s = lite.session(allowed.clone()).await.unwrap();
            assert_eq!(run(&mut s, "SELECT * FROM secrets").await.unwrap(), 1);
            s.finish(true).await.unwrap();
            let mut s = lite.session(refused.clone()).await.unwrap();
            let r = run(&mut s, "SELECT * FROM secrets").await;
            assert!(matches!(r, Err(DbError::Denied(_))), "{r:?}");
            s.finish(true).await.unwrap();
        }
        assert_eq!(lite.pool.idle.lock().unwrap().len(), 1, "one connection served every call");
    }

    #[tokio::test]
    async fn an_idle_connection_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let lite = lite(&dir).await;
        let (mut conn, _permit) = lite.pool.checkout().await.unwrap();
        conn.conn.execute("SELECT 1").await.expect("a table-less select passes");
        let r = conn.conn.execute("SELECT * FROM users").await;
        assert!(matches!(r.map_err(super::super::map_sqlx), Err(DbError::Denied(_))));
    }
}
