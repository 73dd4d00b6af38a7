//! The capability driven directly (no guest), on SQLite in a temporary
//! directory and on the test PostgreSQL (`scripts/services.sh up postgres`;
//! `CELER_TEST_DATABASE_URL`, default `postgres://celer:celer@127.0.0.1:5433/celer_test`).

use std::sync::Arc;

use sqlx::{Connection, Executor};

use super::*;
use crate::runtime::manifest::DatabaseGrants;

/// WIT values have no `PartialEq`: compare their debug forms.
macro_rules! assert_rows {
    ($left:expr, $right:expr) => {
        assert_eq!(format!("{:?}", $left), format!("{:?}", $right))
    };
}

const PG_DEFAULT: &str = "postgres://celer:celer@127.0.0.1:5433/celer_test";

fn pg_url() -> String {
    std::env::var("CELER_TEST_DATABASE_URL").unwrap_or_else(|_| PG_DEFAULT.to_string())
}

/// A name no other test (or test run) uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple().to_string()[20..].to_ascii_lowercase())
}

async fn pg_admin() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&pg_url())
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {} is not reachable ({e}): run scripts/services.sh up postgres", pg_url()))
}

fn grants(read: &[&str], write: &[&str]) -> Arc<Grants> {
    Arc::new(Grants {
        database: DatabaseGrants { read: read.iter().map(|s| s.to_string()).collect(), write: write.iter().map(|s| s.to_string()).collect() },
        ..Grants::default()
    })
}

fn cap(backend: &Arc<Backend>, plugin: &str, grants: &Arc<Grants>) -> DatabaseCap {
    let info = Arc::new(JobInfo { job_id: "job".into(), root_id: "job".into(), task: "t".into(), plugin: plugin.into(), attempt: 0 });
    DatabaseCap::new(info, grants.clone(), backend.clone())
}

async fn all(cap: &mut DatabaseCap, sql: &str, params: Vec<Value>) -> Result<Vec<Row>, HostError> {
    let cursor = cap.query(sql.into(), params).await?;
    let mut rows = Vec::new();
    loop {
        let batch = cap.next(Resource::new_own(cursor.rep()), 100).await?;
        if batch.is_empty() {
            break;
        }
        rows.extend(batch);
    }
    HostCursor::drop(cap, cursor).await.unwrap();
    Ok(rows)
}

async fn sqlite_backend(dir: &tempfile::TempDir, extra: &str) -> Arc<Backend> {
    let mut config: Config = toml::from_str(extra).unwrap();
    config.data_dir = dir.path().to_path_buf();
    let url = config.database_url();
    let mut admin = sqlx::SqliteConnection::connect_with(&url.parse::<sqlx::sqlite::SqliteConnectOptions>().unwrap().create_if_missing(true))
        .await
        .unwrap();
    for ddl in [
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, flag BOOLEAN, at DATETIME, data BLOB, score REAL, doc TEXT)",
        "CREATE TABLE secrets (id INTEGER PRIMARY KEY, value TEXT)",
        "CREATE TABLE celer_jobs (id TEXT)",
        "INSERT INTO secrets VALUES (1, 'hunter2')",
    ] {
        admin.execute(ddl).await.unwrap();
    }
    Arc::new(Backend::connect(&config).await.unwrap())
}

async fn pg_backend(prefix: &str, extra: &str) -> Arc<Backend> {
    let mut config: Config = toml::from_str(extra).unwrap();
    config.database.url = Some(pg_url());
    config.database.role_prefix = prefix.to_string();
    Arc::new(Backend::connect(&config).await.unwrap())
}

fn kinds() -> Vec<Value> {
    vec![
        Value::Int(7),
        Value::Text("héllo".into()),
        Value::Boolean(true),
        Value::Timestamp(1_795_780_800_123_456),
        Value::Bytes(vec![0, 1, 255]),
        Value::Float(2.5),
        Value::Json(r#"{"a":[1,2]}"#.into()),
    ]
}

#[tokio::test]
async fn sqlite_round_trips_every_value_kind_and_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite_backend(&dir, "").await;
    let g = grants(&[], &["items"]);
    backend.prepare("p", &g).await.unwrap();
    let mut c = cap(&backend, "p", &g);
    let n = c
        .execute("INSERT INTO items (id, name, flag, at, data, score, doc) VALUES ($1, $2, $3, $4, $5, $6, $7)".into(), kinds())
        .await
        .unwrap();
    assert_eq!(n, 1);
    let rows = all(&mut c, "SELECT id, name, flag, at, data, score, doc, NULL FROM items WHERE id = $1", vec![Value::Int(7)]).await.unwrap();
    let mut expected = kinds();
    expected[6] = Value::Text(r#"{"a":[1,2]}"#.into()); // JSON is text on SQLite
    expected.push(Value::Null);
    assert_rows!(rows, vec![expected]);

    // The stored text form of a timestamp.
    let rows = all(&mut c, "SELECT at || '' FROM items", vec![]).await.unwrap();
    assert_rows!(rows, vec![vec![Value::Text("2026-11-27T12:00:00.123456Z".into())]]);

    c.begin().await.unwrap();
    c.execute("DELETE FROM items".into(), vec![]).await.unwrap();
    assert!(all(&mut c, "SELECT * FROM items", vec![]).await.unwrap().is_empty());
    c.rollback().await.unwrap();
    assert_rows!(all(&mut c, "SELECT count(*) FROM items", vec![]).await.unwrap(), vec![vec![Value::Int(1)]]);

    c.begin().await.unwrap();
    assert!(matches!(c.begin().await, Err(HostError::Invalid(_))));
    c.execute("UPDATE items SET name = $1".into(), vec![Value::Text("x".into())]).await.unwrap();
    c.commit().await.unwrap();
    assert!(matches!(c.commit().await, Err(HostError::Invalid(_))));
    assert_rows!(all(&mut c, "SELECT name FROM items", vec![]).await.unwrap(), vec![vec![Value::Text("x".into())]]);

    let touched = &c.record.used;
    assert!(touched.iter().any(|e| e["table"] == "items" && e["written"] == 3), "{touched:?}");
}

#[tokio::test]
async fn sqlite_denials_are_recorded_and_never_reach_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite_backend(&dir, "").await;
    let g = grants(&["items"], &[]);
    let mut c = cap(&backend, "p", &g);
    for sql in ["SELECT * FROM secrets", "SELECT * FROM celer_jobs", "PRAGMA table_info(items)", "ATTACH DATABASE 'x' AS x"] {
        assert!(matches!(c.query(sql.into(), vec![]).await, Err(HostError::Denied(_))), "{sql}");
    }
    assert!(matches!(c.execute("DELETE FROM items".into(), vec![]).await, Err(HostError::Denied(_))));
    assert!(matches!(c.query("SELECT * FROM items; SELECT 1".into(), vec![]).await, Err(HostError::Invalid(_))));
    assert_eq!(c.record.denials.len(), 5);

    let none = grants(&[], &[]);
    let mut c = cap(&backend, "q", &none);
    assert!(matches!(c.query("SELECT 1".into(), vec![]).await, Err(HostError::Denied(_))));
    assert!(matches!(c.begin().await, Err(HostError::Denied(_))));
}

#[tokio::test]
async fn sqlite_cursors_stream_within_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite_backend(&dir, "[database]\nmax_rows_per_query = 1000\nmax_bytes_per_query = 100000\n").await;
    let g = grants(&["items"], &[]);
    let mut c = cap(&backend, "p", &g);
    let series = "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < $1) SELECT n FROM s";
    let rows = all(&mut c, series, vec![Value::Int(1000)]).await.unwrap();
    assert_eq!(rows.len(), 1000);
    let over = all(&mut c, series, vec![Value::Int(1001)]).await;
    assert!(matches!(over, Err(HostError::BudgetExceeded(_))), "{over:?}");
    let wide = "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 500) SELECT hex(zeroblob(250)) FROM s";
    let r = all(&mut c, wide, vec![]).await;
    assert!(matches!(r, Err(HostError::BudgetExceeded(_))), "{:?}", r.map(|rows| rows.len()));

    // Columns are known before the first row, also for an empty result.
    let cursor = c.query("SELECT id AS a, name AS b FROM items WHERE 0".into(), vec![]).await.unwrap();
    assert_eq!(c.columns(Resource::new_own(cursor.rep())).await, vec!["a", "b"]);
    assert!(c.next(Resource::new_own(cursor.rep()), 10).await.unwrap().is_empty());
    HostCursor::drop(&mut c, cursor).await.unwrap();

    // Dropping a cursor half-way frees its connection.
    for _ in 0..20 {
        let cursor = c.query(series.into(), vec![Value::Int(500)]).await.unwrap();
        assert_eq!(c.next(Resource::new_own(cursor.rep()), 3).await.unwrap().len(), 3);
        HostCursor::drop(&mut c, cursor).await.unwrap();
    }
}

#[tokio::test]
async fn sqlite_cursor_inside_a_transaction_lends_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite_backend(&dir, "").await;
    let g = grants(&[], &["items"]);
    let mut c = cap(&backend, "p", &g);
    c.begin().await.unwrap();
    c.execute("INSERT INTO items (id) VALUES (1), (2), (3)".into(), vec![]).await.unwrap();
    let cursor = c.query("SELECT id FROM items".into(), vec![]).await.unwrap();
    assert_rows!(c.next(Resource::new_own(cursor.rep()), 1).await.unwrap(), vec![vec![Value::Int(1)]]);
    assert!(matches!(c.execute("DELETE FROM items".into(), vec![]).await, Err(HostError::Invalid(_))));
    HostCursor::drop(&mut c, cursor).await.unwrap();
    c.execute("DELETE FROM items WHERE id = 1".into(), vec![]).await.unwrap();
    let cursor = c.query("SELECT id FROM items".into(), vec![]).await.unwrap();
    c.commit().await.unwrap(); // ends the cursor
    assert!(c.next(Resource::new_own(cursor.rep()), 10).await.unwrap().is_empty());
    assert_rows!(all(&mut c, "SELECT count(*) FROM items", vec![]).await.unwrap(), vec![vec![Value::Int(2)]]);
}

#[tokio::test]
async fn sqlite_open_transaction_is_rolled_back_when_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite_backend(&dir, "").await;
    let g = grants(&[], &["items"]);
    let mut c = cap(&backend, "p", &g);
    c.begin().await.unwrap();
    c.execute("INSERT INTO items (id) VALUES (1)".into(), vec![]).await.unwrap();
    drop(c);
    let mut c = cap(&backend, "p", &g);
    // The abandoned connection is closed (not pooled with its write lock):
    // the next write gets through and the row is not there.
    c.execute("INSERT INTO items (id) VALUES (2)".into(), vec![]).await.unwrap();
    assert_rows!(all(&mut c, "SELECT id FROM items", vec![]).await.unwrap(), vec![vec![Value::Int(2)]]);
}

#[tokio::test]
async fn sqlite_unreachable_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.database.url = Some(format!("sqlite://{}/no/such/dir/x.db", dir.path().display()));
    let backend = Arc::new(Backend::connect(&config).await.unwrap());
    let g = grants(&["items"], &[]);
    backend.prepare("p", &g).await.expect("loads anyway");
    let mut c = cap(&backend, "p", &g);
    assert!(matches!(c.query("SELECT * FROM items".into(), vec![]).await, Err(HostError::Unavailable(_))));
    assert!(backend.ping().await.is_err());
}

// ---------------------------------------------------------------- PostgreSQL

/// Tables of one test, in `public`, removed at the end.
struct PgTables {
    names: Vec<String>,
}

impl PgTables {
    async fn create(admin: &mut sqlx::PgConnection, ddl: &[(&str, &str)]) -> (PgTables, Vec<String>) {
        let mut names = Vec::new();
        for (base, columns) in ddl {
            let name = unique(base);
            admin.execute(AssertSqlSafe(format!("CREATE TABLE {name} ({columns})"))).await.unwrap();
            names.push(name);
        }
        (PgTables { names: names.clone() }, names)
    }

    async fn drop_all(self, admin: &mut sqlx::PgConnection, role: &str) {
        for n in &self.names {
            let _ = admin.execute(AssertSqlSafe(format!("DROP TABLE IF EXISTS {n} CASCADE"))).await;
        }
        let _ = admin.execute(AssertSqlSafe(format!("DROP OWNED BY {}", postgres::quote_ident(role)))).await;
        let _ = admin.execute(AssertSqlSafe(format!("DROP ROLE IF EXISTS {}", postgres::quote_ident(role)))).await;
    }
}

#[tokio::test]
async fn postgres_round_trips_every_value_kind_and_transactions() {
    let mut admin = pg_admin().await;
    let (tables, n) = PgTables::create(
        &mut admin,
        &[(
            "items",
            "id bigserial PRIMARY KEY, i int4, name text, flag bool, at timestamptz, data bytea, score float8, doc jsonb,
             num numeric(12, 3), day date, local timestamp, u uuid, small int2, v varchar(10)",
        )],
    )
    .await;
    let items = &n[0];
    let prefix = unique("celer_t");
    let backend = pg_backend(&prefix, "").await;
    let g = grants(&[], &[items]);
    backend.prepare("p", &g).await.unwrap();
    let mut c = cap(&backend, "p", &g);
    let insert = format!("INSERT INTO {items} (i, name, flag, at, data, score, doc) VALUES ($1, $2, $3, $4, $5, $6, $7)");
    assert_eq!(c.execute(insert.clone(), kinds()).await.unwrap(), 1);
    // NULLs of every kind fit any column (their type is inferred).
    c.execute(insert, vec![Value::Null; 7]).await.unwrap();
    let rows = all(&mut c, &format!("SELECT i, name, flag, at, data, score, doc FROM {items} ORDER BY id"), vec![]).await.unwrap();
    let mut expected = kinds();
    expected[6] = Value::Json(r#"{"a": [1, 2]}"#.into()); // as jsonb prints it
    assert_rows!(rows, vec![expected, vec![Value::Null; 7]]);
    c.execute(
        format!("UPDATE {items} SET num = 1234.5, day = '2026-11-27', local = '2026-11-27 12:00:00.5', u = $1::uuid, small = 3, v = 'vv' WHERE i = 7"),
        vec![Value::Text("0193a5b2-0000-7000-8000-000000000001".into())],
    )
    .await
    .unwrap();
    let rows = all(&mut c, &format!("SELECT num, day, local, u, small, v, 1.5::float4 FROM {items} WHERE i = 7"), vec![]).await.unwrap();
    assert_rows!(
        rows,
        vec![vec![
            Value::Text("1234.500".into()),
            Value::Timestamp(1_795_737_600_000_000),
            Value::Timestamp(1_795_780_800_500_000),
            Value::Text("0193a5b2-0000-7000-8000-000000000001".into()),
            Value::Int(3),
            Value::Text("vv".into()),
            Value::Float(1.5),
        ]]
    );
    let odd = all(&mut c, "SELECT interval '1 day'", vec![]).await;
    assert!(matches!(odd, Err(HostError::Invalid(ref m)) if m.contains("::text")), "{odd:?}");
    // The same statement with other parameter kinds (the cache is keyed by them).
    for v in [Value::Int(7), Value::Null, Value::Text("7".into())] {
        let r = all(&mut c, &format!("SELECT count(*) FROM {items} WHERE i = $1::int"), vec![v]).await;
        assert!(r.is_ok(), "{r:?}");
    }

    c.begin().await.unwrap();
    c.execute(format!("DELETE FROM {items}"), vec![]).await.unwrap();
    assert!(all(&mut c, &format!("SELECT * FROM {items}"), vec![]).await.unwrap().is_empty());
    c.rollback().await.unwrap();
    assert_rows!(all(&mut c, &format!("SELECT count(*) FROM {items}"), vec![]).await.unwrap(), vec![vec![Value::Int(2)]]);

    // A failed statement aborts the transaction until rollback.
    c.begin().await.unwrap();
    assert!(matches!(c.execute(format!("INSERT INTO {items} (id) VALUES (1), (1)"), vec![]).await, Err(HostError::Invalid(_))));
    assert!(c.execute(format!("DELETE FROM {items}"), vec![]).await.is_err());
    c.rollback().await.unwrap();

    // An open transaction of a job that ends is rolled back.
    c.begin().await.unwrap();
    c.execute(format!("DELETE FROM {items}"), vec![]).await.unwrap();
    drop(c);
    let mut c = cap(&backend, "p", &g);
    assert_rows!(all(&mut c, &format!("SELECT count(*) FROM {items}"), vec![]).await.unwrap(), vec![vec![Value::Int(2)]]);
    tables.drop_all(&mut admin, &format!("{prefix}p")).await;
}

/// Layer 2 on its own: statements the parser would refuse, run straight
/// under the plugin's role.
#[tokio::test]
async fn the_postgres_role_blocks_what_the_parser_would_have_refused() {
    let mut admin = pg_admin().await;
    let (tables, n) = PgTables::create(&mut admin, &[("reads", "id int"), ("writes", "id serial, v int"), ("secrets", "id int")]).await;
    admin.execute(AssertSqlSafe(format!("INSERT INTO {} VALUES (1)", n[2]))).await.unwrap();
    let prefix = unique("celer_t");
    let backend = pg_backend(&prefix, "").await;
    let g = grants(&[&n[0]], &[&n[1]]);
    backend.prepare("p", &g).await.unwrap();
    let Db::Pg(pg) = &backend.db else { unreachable!() };
    let role = format!("{prefix}p");

    let mut ok = pg.open_as(&role, false).await.unwrap();
    ok.conn().execute(AssertSqlSafe(format!("INSERT INTO {} (v) VALUES (1)", n[1]))).await.expect("write table, with its sequence");
    ok.conn().execute(AssertSqlSafe(format!("SELECT * FROM {}", n[0]))).await.expect("read table");
    ok.finish(false).await.unwrap();

    for sql in [
        format!("SELECT * FROM {}", n[2]),
        format!("SELECT * FROM {} WHERE id IN (SELECT id FROM {})", n[0], n[2]),
        format!("INSERT INTO {} VALUES (1)", n[0]),
        format!("DELETE FROM {}", n[2]),
        format!("ALTER TABLE {} ADD COLUMN x int", n[1]),
        format!("DROP TABLE {}", n[0]),
        "CREATE TABLE public.evil (x int)".to_string(),
        "SELECT pg_read_file('/etc/passwd')".to_string(),
        "SELECT * FROM pg_ls_dir('.')".to_string(),
        format!("GRANT SELECT ON {} TO PUBLIC", n[2]),
    ] {
        let mut s = pg.open_as(&role, false).await.unwrap();
        let r = s.conn().execute(AssertSqlSafe(sql.clone())).await.map_err(map_sqlx);
        assert!(matches!(r, Err(DbError::Denied(_))), "{sql}: {r:?}");
    }
    // PostgreSQL lets any statement `SET ROLE` to the session user (only
    // the parser refuses it), but the role is set again before the next
    // statement, whose privileges are checked before it runs.
    let mut s = pg.open_as(&role, false).await.unwrap();
    s.conn().execute("SET ROLE celer").await.expect("PostgreSQL allows it");
    s.reassert_role().await.unwrap();
    let r = s.conn().execute(AssertSqlSafe(format!("SELECT * FROM {}", n[2]))).await.map_err(map_sqlx);
    assert!(matches!(r, Err(DbError::Denied(_))), "{r:?}");
    drop(s);
    let mut s = pg.open_as(&role, false).await.unwrap();
    let r = s.conn().execute(AssertSqlSafe(format!("SELECT set_config('role', 'celer', true), (SELECT count(*) FROM {})", n[2]))).await.map_err(map_sqlx);
    assert!(matches!(r, Err(DbError::Denied(_))), "checked before the statement runs: {r:?}");
    drop(s);

    // A read-only call cannot write, even a granted table.
    let mut s = pg.open_as(&role, true).await.unwrap();
    let r = s.conn().execute(AssertSqlSafe(format!("INSERT INTO {} (v) VALUES (1)", n[1]))).await.map_err(map_sqlx);
    assert!(matches!(r, Err(DbError::Denied(_))), "{r:?}");
    drop(s);

    // Changing the grants takes the old ones away.
    let g2 = grants(&[&n[2]], &[]);
    backend.prepare("p", &g2).await.unwrap();
    let mut s = pg.open_as(&role, false).await.unwrap();
    s.conn().execute(AssertSqlSafe(format!("SELECT * FROM {}", n[2]))).await.expect("newly granted");
    let r = s.conn().execute(AssertSqlSafe(format!("SELECT * FROM {}", n[0]))).await.map_err(map_sqlx);
    assert!(matches!(r, Err(DbError::Denied(_))), "{r:?}");
    drop(s);

    // Reloaded without database grants: the role keeps nothing.
    backend.prepare("p", &grants(&[], &[])).await.unwrap();
    let mut s = pg.open_as(&role, false).await.unwrap();
    let r = s.conn().execute(AssertSqlSafe(format!("SELECT * FROM {}", n[2]))).await.map_err(map_sqlx);
    assert!(matches!(r, Err(DbError::Denied(_))), "{r:?}");
    drop(s);
    tables.drop_all(&mut admin, &role).await;
}

#[tokio::test]
async fn postgres_load_is_refused_for_a_missing_table_and_unreachable_is_unavailable() {
    let prefix = unique("celer_t");
    let backend = pg_backend(&prefix, "").await;
    let err = backend.prepare("p", &grants(&["no_such_table_here"], &[])).await.unwrap_err();
    assert!(err.to_string().contains("no_such_table_here"), "{err}");

    let mut config = Config::default();
    config.database.url = Some("postgres://celer:celer@127.0.0.1:1/celer_test".into());
    let backend = Arc::new(Backend::connect(&config).await.unwrap());
    let g = grants(&["t"], &[]);
    backend.prepare("p", &g).await.expect("loads while the database is down");
    let mut c = cap(&backend, "p", &g);
    assert!(matches!(c.query("SELECT * FROM t".into(), vec![]).await, Err(HostError::Unavailable(_))));
    assert!(backend.ping().await.is_err());
}

#[tokio::test]
async fn postgres_cursors_stream_and_budgets_hold() {
    let mut admin = pg_admin().await;
    let (tables, n) = PgTables::create(&mut admin, &[("nums", "n int")]).await;
    admin.execute(AssertSqlSafe(format!("INSERT INTO {} SELECT generate_series(1, 5000)", n[0]))).await.unwrap();
    let prefix = unique("celer_t");
    let backend = pg_backend(&prefix, "[database]\nmax_rows_per_query = 4000\n").await;
    let g = grants(&[&n[0]], &[]);
    backend.prepare("p", &g).await.unwrap();
    let mut c = cap(&backend, "p", &g);
    let rows = all(&mut c, &format!("SELECT n FROM {} WHERE n <= $1", n[0]), vec![Value::Int(4000)]).await.unwrap();
    assert_eq!(rows.len(), 4000);
    let r = all(&mut c, &format!("SELECT n FROM {}", n[0]), vec![]).await;
    assert!(matches!(r, Err(HostError::BudgetExceeded(_))), "{r:?}");
    let denied = all(&mut c, "SELECT * FROM pg_catalog.pg_authid", vec![]).await;
    assert!(matches!(denied, Err(HostError::Denied(_))));
    tables.drop_all(&mut admin, &format!("{prefix}p")).await;
}
