//! `celer:plugin/database`: SQL on PostgreSQL or SQLite, limited to the
//! tables in `grants.database.read` / `grants.database.write`.
//!
//! The backend follows `database.url` (`DATABASE_URL`): `postgres://…`
//! ([`postgres`]) or `sqlite://path` ([`sqlite`]); the embedded default is
//! the broker's own file, `<data_dir>/celer.db`, through a pool of its own.
//!
//! Grants are enforced twice, each layer on its own:
//! 1. [`sqlcheck`]: the host parses every statement and checks every table
//!    it names, before anything reaches the database;
//! 2. the database: a PostgreSQL role per plugin (`SET LOCAL ROLE` in every
//!    transaction) or an SQLite authorizer callback.
//!
//! A call refused by either is `denied`, logged once and listed in the
//! job's `touched.denials`. Values are mapped by [`values`]. A plugin with
//! no database grant at all is refused every call (it gets no role and no
//! connection).
//!
//! Streaming: `query` checks the statement, takes a connection and returns
//! a cursor; the statement runs at the first `next` (the database's own
//! errors come from there), in a task that owns the connection and the
//! sqlx row stream, and each `next` asks it for a batch, so a plugin never
//! holds a whole result. Column names come with the first rows (or from
//! the prepared statement when there are none). Each
//! query may return `[database] max_rows_per_query` rows and
//! `max_bytes_per_query` bytes (`budget-exceeded` beyond); one `next`
//! returns at most [`BATCH_MAX_ROWS`] rows and stops adding rows after
//! [`BATCH_MAX_BYTES`], so that a small plugin asking for many rows gets
//! them in pieces it can hold.
//!
//! Transactions: `begin` checks out one connection for the job; every call
//! until `commit`/`rollback` runs on it. While a cursor of the transaction
//! is open, other calls are `invalid` (read it to the end or drop it;
//! `commit`/`rollback` end it). A job that ends with a transaction open is
//! rolled back (its connection is dropped mid-transaction).
//!
//! `touched.database` lists, per table, the rows read (rows returned by
//! queries naming the table) and written (rows affected by statements
//! targeting it).

pub mod postgres;
pub mod sqlcheck;
pub mod sqlite;
pub mod values;

use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::json;
use sqlx::{AssertSqlSafe, Column, Executor, Row as _, TypeInfo};
use tokio::sync::{mpsc, oneshot};
use wasmtime::component::{Resource, ResourceTable};

use self::sqlcheck::{Dialect, Kind, Policy, Refusal};
use super::{BackendError, GrantError, JobInfo, Record};
use crate::config::Config;
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::database::{Host, HostCursor, Row, Value};
use crate::runtime::manifest::{DatabaseGrants, Grants};

/// Rows one `next` returns at most, whatever the plugin asks.
pub const BATCH_MAX_ROWS: u32 = 10_000;
/// One `next` stops adding rows once its rows hold this many bytes.
pub const BATCH_MAX_BYTES: u64 = 1 << 20;
/// Cursors a job may hold open at once (each holds a connection).
pub const MAX_OPEN_CURSORS: usize = 4;
/// Statements a job remembers the parser's verdict on (a job often runs
/// the same statement in a loop; its grants do not change while it runs).
const CHECKED_CACHE: usize = 32;

/// A table name must be a plain SQL identifier (optionally schema-qualified),
/// so that it can be matched against the tables a statement names; the
/// host's own tables (`celer_*`), SQLite's (`sqlite_*`) and PostgreSQL's
/// catalogs can never be granted.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    let db = &grants.database;
    for table in db.read.iter().chain(&db.write) {
        let parts: Vec<&str> = table.split('.').collect();
        let plain = !table.is_empty()
            && parts.len() <= 2
            && parts.iter().all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !plain {
            return Err(GrantError { grant: "database", reason: format!("{table:?} is not a table name") });
        }
        let lower = table.to_ascii_lowercase();
        if sqlcheck::is_reserved(&lower) {
            return Err(GrantError { grant: "database", reason: format!("{table:?} belongs to the host and cannot be granted") });
        }
        if parts.len() == 2 && matches!(parts[0].to_ascii_lowercase().as_str(), "pg_catalog" | "information_schema" | "pg_toast") {
            return Err(GrantError { grant: "database", reason: format!("{table:?} is a system catalog and cannot be granted") });
        }
    }
    Ok(())
}

/// An error of the database itself, before it becomes a `host-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbError {
    /// Refused by the database's own grants (layer 2).
    Denied(String),
    /// The statement or its values are wrong.
    Invalid(String),
    /// The database cannot be reached or is overloaded: retry later.
    Unavailable(String),
}

/// Classifies an sqlx error.
pub(crate) fn map_sqlx(e: sqlx::Error) -> DbError {
    match &e {
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = d.message().to_string();
            if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                // PostgreSQL SQLSTATE.
                return match (code.as_str(), &code[..2]) {
                    ("42501", _) => DbError::Denied(format!("the database refused: {message}")),
                    ("25006", _) => DbError::Denied(format!("the database refused a write in a read-only call: {message}")),
                    (_, "08" | "53" | "57" | "58" | "40") | ("55P03", _) => DbError::Unavailable(format!("database: {message} ({code})")),
                    _ => DbError::Invalid(format!("database: {message} ({code})")),
                };
            }
            // SQLite (extended) result code: the primary code is the low byte.
            let primary = code.parse::<i32>().map(|c| c & 0xff).unwrap_or(-1);
            match primary {
                libsqlite3_sys::SQLITE_AUTH => DbError::Denied(format!("the database refused: {message}")),
                // A function refused by the authorizer is reported as a plain error.
                libsqlite3_sys::SQLITE_ERROR if message.starts_with("not authorized") => {
                    DbError::Denied(format!("the database refused: {message}"))
                }
                libsqlite3_sys::SQLITE_BUSY
                | libsqlite3_sys::SQLITE_LOCKED
                | libsqlite3_sys::SQLITE_IOERR
                | libsqlite3_sys::SQLITE_FULL
                | libsqlite3_sys::SQLITE_CANTOPEN
                | libsqlite3_sys::SQLITE_NOMEM
                | libsqlite3_sys::SQLITE_PROTOCOL => DbError::Unavailable(format!("database: {message}")),
                _ => DbError::Invalid(format!("database: {message}")),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => DbError::Unavailable(format!("database: {e}")),
        sqlx::Error::Configuration(_) => DbError::Unavailable(format!("database configuration: {e}")),
        _ => DbError::Invalid(format!("database: {e}")),
    }
}

/// Per-query budgets (`[database]`).
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_rows: u64,
    max_bytes: u64,
}

#[allow(clippy::large_enum_variant)] // one per process
enum Db {
    Pg(postgres::Pg),
    Sqlite(sqlite::Lite),
}

/// The process-wide database backend, shared by every job.
pub struct Backend {
    db: Db,
    limits: Limits,
}

impl Backend {
    /// Connects (lazily: a database that is down at start makes calls
    /// `unavailable`, it does not stop the host) to what the configuration names.
    pub async fn connect(config: &Config) -> Result<Backend, BackendError> {
        let url = config.database_url();
        let c = &config.database;
        let err = |reason: String| BackendError { capability: "database", reason };
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Db::Pg(postgres::Pg::connect(&url, &c.role_prefix, c.max_connections).map_err(err)?)
        } else if url.starts_with("sqlite:") {
            Db::Sqlite(sqlite::Lite::connect(&url, c.max_connections).map_err(err)?)
        } else {
            return Err(err("database.url must be postgres://… or sqlite://path".into()));
        };
        Ok(Backend { db, limits: Limits { max_rows: c.max_rows_per_query, max_bytes: c.max_bytes_per_query } })
    }

    pub fn dialect(&self) -> Dialect {
        match self.db {
            Db::Pg(_) => Dialect::Postgres,
            Db::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// At load: the plugin's PostgreSQL role, or its SQLite policy. A
    /// plugin without database grants needs neither.
    pub async fn prepare(&self, plugin: &str, grants: &Grants) -> Result<(), GrantError> {
        let g = &grants.database;
        if g.read.is_empty() && g.write.is_empty() {
            // No role needed (every call is refused before the database);
            // the role of a version loaded before loses its privileges.
            if let Db::Pg(pg) = &self.db {
                pg.revoke_if_known(plugin).await;
            }
            return Ok(());
        }
        match &self.db {
            Db::Pg(pg) => pg.prepare(plugin, g).await.map_err(|reason| GrantError { grant: "database", reason }),
            Db::Sqlite(lite) => {
                if let Err(e) = lite.prepare(plugin, g).await {
                    tracing::warn!(plugin, error = ?e, "SQLite unreachable at load; the plugin's policy is built at its first call");
                }
                Ok(())
            }
        }
    }

    /// Whether the backend answers, for `/readyz`.
    pub async fn ping(&self) -> Result<(), String> {
        let r = match &self.db {
            Db::Pg(pg) => pg.ping().await,
            Db::Sqlite(lite) => lite.ping().await,
        };
        r.map_err(|e| match e {
            DbError::Denied(m) | DbError::Invalid(m) | DbError::Unavailable(m) => m,
        })
    }

    /// A connection for one call (or a transaction) under the plugin's grants.
    async fn open(&self, plugin: &str, grants: &DatabaseGrants, kind: Open) -> Result<Session, DbError> {
        match &self.db {
            Db::Pg(pg) => Ok(Session::Pg(pg.open(plugin, grants, kind == Open::Read).await?)),
            Db::Sqlite(lite) => Ok(Session::Sqlite(lite.open(plugin, grants, kind == Open::Transaction).await?)),
        }
    }

    /// The PostgreSQL pool (for benchmarks and tests), if that is the backend.
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.db {
            Db::Pg(pg) => Some(pg.pool()),
            Db::Sqlite(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// One `query` outside a transaction (read-only on PostgreSQL).
    Read,
    /// One `execute` outside a transaction.
    Write,
    /// `begin`.
    Transaction,
}

/// What `columns` needs of the parameters: their PostgreSQL types and the
/// statement's cache key.
enum Shape {
    Pg(Vec<sqlx::postgres::PgTypeInfo>, String),
    Sqlite,
}

/// Bound parameters, per backend.
enum Args {
    Pg(sqlx::postgres::PgArguments, Vec<sqlx::postgres::PgTypeInfo>, String),
    Sqlite(sqlx::sqlite::SqliteArguments),
}

fn pg_type(v: &Value) -> sqlx::postgres::PgTypeInfo {
    use sqlx::Type;
    use sqlx::postgres::Postgres;
    match v {
        Value::Null => <values::UntypedNull as Type<Postgres>>::type_info(),
        Value::Boolean(_) => <bool as Type<Postgres>>::type_info(),
        Value::Int(_) => <i64 as Type<Postgres>>::type_info(),
        Value::Float(_) => <f64 as Type<Postgres>>::type_info(),
        Value::Text(_) => <String as Type<Postgres>>::type_info(),
        Value::Bytes(_) => <Vec<u8> as Type<Postgres>>::type_info(),
        Value::Timestamp(_) => <chrono::DateTime<chrono::Utc> as Type<Postgres>>::type_info(),
        Value::Json(_) => <values::JsonbText as Type<Postgres>>::type_info(),
    }
}

impl Args {
    fn shape(&self) -> Shape {
        match self {
            Args::Pg(_, types, key) => Shape::Pg(types.clone(), key.clone()),
            Args::Sqlite(_) => Shape::Sqlite,
        }
    }

    fn new(dialect: Dialect, params: &[Value]) -> Result<Args, DbError> {
        match dialect {
            Dialect::Postgres => {
                let args = values::pg_arguments(params).map_err(DbError::Invalid)?;
                let types = params.iter().map(pg_type).collect();
                // A cached statement keeps the parameter types of its first
                // use: the kinds are part of the cache key.
                let key: String = params.iter().map(values::kind_tag).collect();
                Ok(Args::Pg(args, types, key))
            }
            Dialect::Sqlite => Ok(Args::Sqlite(values::sqlite_arguments(params).map_err(DbError::Invalid)?)),
        }
    }
}

/// One checked-out connection, under the plugin's grants.
enum Session {
    Pg(postgres::Session),
    Sqlite(sqlite::Session),
}

/// A decoded row, its size, and (with the first row) the column names.
type SizedRow = (Row, u64, Option<Vec<String>>);

impl Session {
    /// The text sent for `sql` (PostgreSQL: keyed by the parameter kinds).
    fn text(sql: &str, args: &Args) -> String {
        match args {
            Args::Pg(_, _, key) => Self::keyed(sql, key),
            Args::Sqlite(_) => sql.to_string(),
        }
    }

    fn keyed(sql: &str, key: &str) -> String {
        match key.is_empty() {
            true => sql.to_string(),
            false => format!("{sql}\n-- celer:{key}"),
        }
    }

    async fn reassert(&mut self) -> Result<(), DbError> {
        match self {
            Session::Pg(s) => s.reassert_role().await,
            Session::Sqlite(_) => Ok(()),
        }
    }

    async fn columns(&mut self, sql: &str, shape: &Shape) -> Result<Vec<String>, DbError> {
        fn names<C: Column>(cols: &[C]) -> Vec<String> {
            cols.iter().map(|c| c.name().to_string()).collect()
        }
        match (self, shape) {
            (Session::Pg(s), Shape::Pg(types, key)) => {
                let text = sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(Self::keyed(sql, key)));
                let st = s.conn().prepare_with(text, types).await.map_err(map_sqlx)?;
                Ok(names(sqlx::Statement::columns(&st)))
            }
            (Session::Sqlite(s), Shape::Sqlite) => {
                let text = sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(sql.to_string()));
                let st = s.conn().prepare(text).await.map_err(map_sqlx)?;
                Ok(names(sqlx::Statement::columns(&st)))
            }
            _ => Err(DbError::Invalid("parameters bound for another backend".into())),
        }
    }

    async fn execute(&mut self, sql: &str, args: Args) -> Result<u64, DbError> {
        let text = AssertSqlSafe(Self::text(sql, &args));
        match (self, args) {
            (Session::Pg(s), Args::Pg(a, _, _)) => sqlx::query_with(text, a).execute(s.conn()).await.map(|r| r.rows_affected()).map_err(map_sqlx),
            (Session::Sqlite(s), Args::Sqlite(a)) => sqlx::query_with(text, a).execute(s.conn()).await.map(|r| r.rows_affected()).map_err(map_sqlx),
            _ => Err(DbError::Invalid("parameters bound for another backend".into())),
        }
    }

    fn rows(&mut self, sql: &str, args: Args) -> BoxStream<'_, Result<SizedRow, DbError>> {
        let text = AssertSqlSafe(Self::text(sql, &args));
        match (self, args) {
            (Session::Pg(s), Args::Pg(a, _, _)) => sqlx::query_with(text, a)
                .fetch(s.conn())
                .enumerate()
                .map(|(i, r)| {
                    let row = r.map_err(map_sqlx)?;
                    let mut out = Vec::with_capacity(row.len());
                    let mut size = 0;
                    for (c, col) in row.columns().iter().enumerate() {
                        let raw = row.try_get_raw(c).map_err(map_sqlx)?;
                        let v = values::pg_value(raw, col.name()).map_err(DbError::Invalid)?;
                        size += values::size(&v);
                        out.push(v);
                    }
                    let names = (i == 0).then(|| row.columns().iter().map(|c| c.name().to_string()).collect());
                    Ok((out, size, names))
                })
                .boxed(),
            (Session::Sqlite(s), Args::Sqlite(a)) => sqlx::query_with(text, a)
                .fetch(s.conn())
                .enumerate()
                .map(|(i, r)| {
                    let row = r.map_err(map_sqlx)?;
                    let mut out = Vec::with_capacity(row.len());
                    let mut size = 0;
                    for (c, col) in row.columns().iter().enumerate() {
                        let declared = col.type_info().name().to_string();
                        let raw = row.try_get_raw(c).map_err(map_sqlx)?;
                        let v = values::sqlite_value(raw, &declared, col.name()).map_err(DbError::Invalid)?;
                        size += values::size(&v);
                        out.push(v);
                    }
                    let names = (i == 0).then(|| row.columns().iter().map(|c| c.name().to_string()).collect());
                    Ok((out, size, names))
                })
                .boxed(),
            _ => futures_util::stream::once(async { Err(DbError::Invalid("parameters bound for another backend".into())) }).boxed(),
        }
    }

    /// Ends the session: commit (or roll back) its transaction, give the
    /// connection back.
    async fn finish(self, commit: bool) -> Result<(), DbError> {
        match self {
            Session::Pg(s) => s.finish(commit).await,
            Session::Sqlite(s) => s.finish(commit).await,
        }
    }
}

/// A request from `next` to the task streaming a cursor's rows.
struct Fetch {
    max_rows: usize,
    max_bytes: u64,
    reply: oneshot::Sender<Batch>,
}

/// What the host asks the task of a cursor.
enum Request {
    Fetch(Fetch),
    /// The column names, before any row was fetched.
    Columns(oneshot::Sender<Result<Vec<String>, DbError>>),
}

#[derive(Default)]
struct Batch {
    rows: Vec<Row>,
    bytes: u64,
    end: bool,
    error: Option<DbError>,
    /// The column names, with the first batch that has rows, or with the
    /// last one when there were none.
    columns: Option<Vec<String>>,
}

/// Owns the connection and the row stream of one cursor; answers `next`
/// with batches. The statement runs at the first `next` (its column names
/// come with the rows: no extra round trip). Ends at the end of the rows,
/// on an error, or when the cursor is dropped; then gives the connection
/// back to the job's transaction (`give_back`) or ends its own transaction.
async fn stream_rows(mut session: Session, sql: String, args: Args, mut requests: mpsc::Receiver<Request>, give_back: Option<oneshot::Sender<Session>>) {
    let shape = args.shape();
    let mut clean = true;
    let mut known = false;
    // Before the first fetch: column names on demand.
    let first = loop {
        match requests.recv().await {
            None => break None,
            Some(Request::Columns(reply)) => {
                let c = session.columns(&sql, &shape).await;
                known |= c.is_ok();
                let _ = reply.send(c);
            }
            Some(Request::Fetch(f)) => break Some(f),
        }
    };
    let mut last: Option<(oneshot::Sender<Batch>, Batch)> = None;
    if let Some(first) = first {
        let mut rows = session.rows(&sql, args);
        let mut next = Some(first);
        loop {
            let req = match next.take() {
                Some(f) => f,
                None => match requests.recv().await {
                    Some(Request::Fetch(f)) => f,
                    Some(Request::Columns(reply)) => {
                        // Rows were fetched already: their names came with them.
                        let _ = reply.send(Err(DbError::Invalid("columns are known".into())));
                        continue;
                    }
                    None => break,
                },
            };
            let mut batch = Batch::default();
            while batch.rows.len() < req.max_rows && batch.bytes < req.max_bytes {
                match rows.next().await {
                    None => {
                        batch.end = true;
                        break;
                    }
                    Some(Ok((row, size, names))) => {
                        if let Some(names) = names {
                            known = true;
                            batch.columns = Some(names);
                        }
                        batch.bytes += size;
                        batch.rows.push(row);
                    }
                    Some(Err(e)) => {
                        batch.error = Some(e);
                        clean = false;
                        break;
                    }
                }
            }
            if batch.end || batch.error.is_some() {
                last = Some((req.reply, batch));
                break;
            }
            let _ = req.reply.send(batch);
        }
    }
    if let Some((reply, mut batch)) = last {
        if batch.end && !known {
            // No row: the names come from the prepared statement.
            batch.columns = session.columns(&sql, &shape).await.ok();
        }
        let _ = reply.send(batch);
    }
    match give_back {
        Some(back) => {
            let _ = back.send(session);
        }
        None => {
            let _ = session.finish(clean).await;
        }
    }
}

/// An open query's rows, as the plugin's `cursor` resource.
pub struct Cursor {
    /// Known once rows came (or asked for before).
    columns: Option<Vec<String>>,
    /// To the streaming task; `None` once the cursor ended.
    requests: Option<mpsc::Sender<Request>>,
    /// No `next` yet: the task can still be asked for the column names.
    fetched: bool,
    rows: u64,
    bytes: u64,
    /// Tables the query reads, for `touched`.
    tables: Vec<String>,
    /// Runs on the job's transaction.
    in_txn: bool,
}

/// The job's transaction.
enum Txn {
    None,
    Open(Session),
    /// A cursor of the transaction holds the connection; it comes back here.
    Lent { back: oneshot::Receiver<Session>, cursor: u32 },
    /// The connection was lost mid-transaction: calls fail until `rollback`.
    Broken,
}

/// Per-job state of the database interface.
pub struct DatabaseCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    backend: Arc<Backend>,
    pub(super) record: Record,
    policy: Option<Policy>,
    /// The parser's verdicts on statements this job ran: (call, SQL, parameters).
    checked: std::collections::HashMap<(Kind, String, usize), sqlcheck::Checked>,
    txn: Txn,
    cursors: ResourceTable,
    open_cursors: usize,
}

impl DatabaseCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>, backend: Arc<Backend>) -> Self {
        DatabaseCap { info, grants, backend, record: Record::default(), policy: None, checked: Default::default(), txn: Txn::None, cursors: ResourceTable::new(), open_cursors: 0 }
    }

    fn deny(&mut self, what: String) -> HostError {
        self.record.deny(&self.info, "database", what)
    }

    /// Layer 1: the parser's verdict on one statement.
    fn check(&mut self, kind: Kind, sql: &str, params: usize) -> Result<sqlcheck::Checked, HostError> {
        let g = &self.grants.database;
        if g.read.is_empty() && g.write.is_empty() {
            let head: String = sql.chars().take(60).collect();
            return Err(self.deny(format!("no database.read or database.write grant ({head:?})")));
        }
        let key = (kind, sql.to_string(), params);
        if let Some(c) = self.checked.get(&key) {
            return Ok(c.clone());
        }
        let dialect = self.backend.dialect();
        let policy = self.policy.get_or_insert_with(|| Policy::from_grants(g, dialect));
        match sqlcheck::check(dialect, kind, sql, params, policy) {
            Ok(c) => {
                if self.checked.len() >= CHECKED_CACHE {
                    self.checked.clear();
                }
                self.checked.insert(key, c.clone());
                Ok(c)
            }
            Err(Refusal::Denied(why)) => Err(self.deny(why)),
            Err(Refusal::Invalid(why)) => Err(HostError::Invalid(format!("database: {why}"))),
        }
    }

    /// An error from the database, recorded when it is a layer-2 denial.
    fn db_error(&mut self, e: DbError) -> HostError {
        match e {
            DbError::Denied(why) => self.deny(format!("{why} (database layer)")),
            DbError::Invalid(why) => HostError::Invalid(why),
            DbError::Unavailable(why) => HostError::Unavailable(why),
        }
    }

    /// Adds to the per-table tally in `touched.database`.
    fn tally(&mut self, table: &str, read: u64, written: u64) {
        let used = &mut self.record.used;
        if let Some(entry) = used.iter_mut().find(|e| e["table"] == table) {
            for (key, n) in [("read", read), ("written", written)] {
                let total = entry[key].as_u64().unwrap_or(0) + n;
                entry[key] = json!(total);
            }
        } else {
            self.record.used(json!({"table": table, "read": read, "written": written}));
        }
    }

    /// The transaction's connection, if a transaction is open.
    fn take_txn(&mut self) -> Result<Option<Session>, HostError> {
        match std::mem::replace(&mut self.txn, Txn::None) {
            Txn::None => Ok(None),
            Txn::Open(s) => Ok(Some(s)),
            Txn::Broken => {
                self.txn = Txn::Broken;
                Err(HostError::Unavailable("database: the transaction's connection was lost; roll back".into()))
            }
            Txn::Lent { mut back, cursor } => match back.try_recv() {
                Ok(s) => Ok(Some(s)),
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.txn = Txn::Lent { back, cursor };
                    Err(HostError::Invalid("database: a cursor of this transaction is still open; read it to the end or drop it first".into()))
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.txn = Txn::Broken;
                    Err(HostError::Unavailable("database: the transaction's connection was lost; roll back".into()))
                }
            },
        }
    }

    /// Ends the cursor that holds the transaction's connection and takes
    /// the connection back.
    async fn reclaim_txn(&mut self) {
        if !matches!(self.txn, Txn::Lent { .. }) {
            return;
        }
        if let Txn::Lent { back, cursor } = std::mem::replace(&mut self.txn, Txn::None) {
            if let Ok(c) = self.cursors.get_mut(&Resource::<Cursor>::new_own(cursor)) {
                c.requests = None;
            }
            self.txn = match back.await {
                Ok(s) => Txn::Open(s),
                Err(_) => Txn::Broken,
            };
        }
    }

    async fn end_txn(&mut self, commit: bool) -> Result<(), HostError> {
        self.reclaim_txn().await;
        match std::mem::replace(&mut self.txn, Txn::None) {
            Txn::Open(s) => s.finish(commit).await.map_err(|e| self.db_error(e)),
            Txn::Broken if !commit => Ok(()),
            Txn::Broken => Err(HostError::Unavailable("database: the transaction's connection was lost; it was rolled back".into())),
            Txn::None | Txn::Lent { .. } => Err(HostError::Invalid("database: no transaction is open".into())),
        }
    }
}

impl Host for DatabaseCap {
    async fn query(&mut self, sql: String, params: Vec<Value>) -> Result<Resource<Cursor>, HostError> {
        let checked = self.check(Kind::Read, &sql, params.len())?;
        if self.open_cursors >= MAX_OPEN_CURSORS {
            return Err(HostError::BudgetExceeded(format!("database: at most {MAX_OPEN_CURSORS} cursors may be open at once; drop one first")));
        }
        let args = Args::new(self.backend.dialect(), &params).map_err(|e| self.db_error(e))?;
        let (mut session, in_txn) = match self.take_txn()? {
            Some(s) => (s, true),
            None => {
                let s = self.backend.open(&self.info.plugin, &self.grants.database, Open::Read).await.map_err(|e| self.db_error(e))?;
                (s, false)
            }
        };
        if in_txn && let Err(e) = session.reassert().await {
            self.txn = Txn::Open(session);
            return Err(self.db_error(e));
        }
        let (requests, receiver) = mpsc::channel(1);
        let (give_back, back) = match in_txn {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        tokio::spawn(stream_rows(session, checked.sql, args, receiver, give_back));
        let cursor = Cursor { columns: None, requests: Some(requests), fetched: false, rows: 0, bytes: 0, tables: checked.reads, in_txn };
        let handle = self.cursors.push(cursor).map_err(|e| HostError::Unavailable(format!("database: {e}")))?;
        if let Some(back) = back {
            self.txn = Txn::Lent { back, cursor: handle.rep() };
        }
        self.open_cursors += 1;
        Ok(handle)
    }

    async fn execute(&mut self, sql: String, params: Vec<Value>) -> Result<u64, HostError> {
        let checked = self.check(Kind::Write, &sql, params.len())?;
        let args = Args::new(self.backend.dialect(), &params).map_err(|e| self.db_error(e))?;
        let affected = match self.take_txn()? {
            Some(mut s) => {
                let r = match s.reassert().await {
                    Ok(()) => s.execute(&checked.sql, args).await,
                    Err(e) => Err(e),
                };
                self.txn = Txn::Open(s);
                r
            }
            None => match self.backend.open(&self.info.plugin, &self.grants.database, Open::Write).await {
                Ok(mut s) => match s.execute(&checked.sql, args).await {
                    Ok(n) => s.finish(true).await.map(|()| n),
                    Err(e) => {
                        let _ = s.finish(false).await;
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            },
        };
        let affected = affected.map_err(|e| self.db_error(e))?;
        for table in &checked.writes {
            self.tally(table, 0, affected);
        }
        Ok(affected)
    }

    async fn begin(&mut self) -> Result<(), HostError> {
        let g = &self.grants.database;
        if g.read.is_empty() && g.write.is_empty() {
            return Err(self.deny("no database.read or database.write grant (begin)".into()));
        }
        if !matches!(self.txn, Txn::None) {
            return Err(HostError::Invalid("database: a transaction is already open".into()));
        }
        let s = self.backend.open(&self.info.plugin, &self.grants.database, Open::Transaction).await.map_err(|e| self.db_error(e))?;
        self.txn = Txn::Open(s);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), HostError> {
        self.end_txn(true).await
    }

    async fn rollback(&mut self) -> Result<(), HostError> {
        self.end_txn(false).await
    }
}

impl HostCursor for DatabaseCap {
    async fn columns(&mut self, cursor: Resource<Cursor>) -> Vec<String> {
        let Ok(c) = self.cursors.get_mut(&cursor) else { return Vec::new() };
        if let Some(names) = &c.columns {
            return names.clone();
        }
        // Before the first `next`, the task prepares the statement for them.
        let (Some(requests), false) = (c.requests.clone(), c.fetched) else { return Vec::new() };
        let (reply, answer) = oneshot::channel();
        if requests.send(Request::Columns(reply)).await.is_err() {
            return Vec::new();
        }
        let names = match answer.await {
            Ok(Ok(names)) => names,
            Ok(Err(e)) => {
                // The statement fails; `next` says why.
                tracing::debug!(error = ?e, "database: no column names");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        if let Ok(c) = self.cursors.get_mut(&cursor) {
            c.columns = Some(names.clone());
        }
        names
    }

    async fn next(&mut self, cursor: Resource<Cursor>, max_rows: u32) -> Result<Vec<Row>, HostError> {
        if max_rows == 0 {
            return Err(HostError::Invalid("database: next(0): ask for at least one row".into()));
        }
        let limits = self.backend.limits;
        let c = self.cursors.get_mut(&cursor).map_err(|_| HostError::Invalid("database: no such cursor".into()))?;
        let Some(requests) = c.requests.clone() else {
            return Ok(Vec::new());
        };
        let max_rows = u64::from(max_rows.min(BATCH_MAX_ROWS)).min(limits.max_rows.saturating_sub(c.rows) + 1);
        let max_bytes = BATCH_MAX_BYTES.min(limits.max_bytes.saturating_sub(c.bytes) + 1);
        let (reply, answer) = oneshot::channel();
        c.fetched = true;
        let sent = requests.send(Request::Fetch(Fetch { max_rows: max_rows as usize, max_bytes, reply })).await;
        let batch = match sent {
            Ok(()) => answer.await.ok(),
            Err(_) => None,
        };
        let c = self.cursors.get_mut(&cursor).map_err(|_| HostError::Invalid("database: no such cursor".into()))?;
        let Some(mut batch) = batch else {
            c.requests = None;
            return Err(HostError::Unavailable("database: the query's connection was lost".into()));
        };
        c.rows += batch.rows.len() as u64;
        c.bytes += batch.bytes;
        if batch.columns.is_some() {
            c.columns = batch.columns.take();
        }
        if batch.end || batch.error.is_some() {
            c.requests = None;
        }
        let over = if c.rows > limits.max_rows {
            Some(format!("more than {} rows", limits.max_rows))
        } else if c.bytes > limits.max_bytes {
            Some(format!("more than {} bytes", limits.max_bytes))
        } else {
            None
        };
        if over.is_some() {
            c.requests = None;
        }
        let (tables, n) = (c.tables.clone(), batch.rows.len() as u64);
        for table in &tables {
            self.tally(table, n, 0);
        }
        if let Some(e) = batch.error {
            return Err(self.db_error(e));
        }
        if let Some(what) = over {
            return Err(HostError::BudgetExceeded(format!(
                "database: the query returned {what} ([database] max_rows_per_query / max_bytes_per_query)"
            )));
        }
        Ok(batch.rows)
    }

    async fn drop(&mut self, cursor: Resource<Cursor>) -> wasmtime::Result<()> {
        let c = self.cursors.delete(cursor)?;
        self.open_cursors = self.open_cursors.saturating_sub(1);
        drop(c.requests);
        if c.in_txn {
            self.reclaim_txn().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
