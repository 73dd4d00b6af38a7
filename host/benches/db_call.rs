//! `make bench`: the cost of a one-row `database.query` made from a guest
//! (query + `next` + drop of the cursor, N of them inside one job of the
//! `db_probe` plugin, minus an empty job, divided by N) beside the same
//! query made directly with sqlx from Rust, on SQLite (the embedded
//! default) and on PostgreSQL when `CELER_TEST_DATABASE_URL` (default: the
//! test service on 127.0.0.1:5433) answers. Prints one JSON object per backend.
//!
//! Usage: db_call <path to db_probe.wasm> [queries per job]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer::broker::Broker;
use celer::broker::embedded::EmbeddedBroker;
use celer::capabilities::Capabilities;
use celer::config::{Config, SandboxConfig};
use celer::job::Job;
use celer::runtime::Runtime;
use celer::runtime::registry::Registry;
use celer::runtime::sandbox::RunOutcome;
use sqlx::{AssertSqlSafe, Connection, Executor};

const PG_DEFAULT: &str = "postgres://celer:celer@127.0.0.1:5433/celer_test";
const ROUNDS: usize = 7;

mod common;
use common::median;

/// `n` one-row queries on `table` from one job.
fn job(n: usize, table: &str, placeholder: &str) -> Job {
    let sql = format!("SELECT id, name FROM {table} WHERE id = {placeholder}");
    common::job("db_probe.query_loop", serde_json::json!({ "sql": sql, "params": [1], "n": n }), Some(600_000))
}

/// µs per query made from the guest.
async fn guest(config: &Config, work: &Path, wasm: &Path, table: &str, n: usize) -> anyhow::Result<f64> {
    let plugins = work.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(wasm, plugins.join("db_probe.wasm"))?;
    std::fs::write(
        plugins.join("db_probe.toml"),
        format!(
            "[plugin]\nname = \"db_probe\"\ntasks = [\"db_probe.run\", \"db_probe.stream\", \"db_probe.query_loop\"]\n\
             [limits]\nmemory_mb = 32\ntimeout_s = 600\n[grants]\ndatabase.read = [\"{table}\"]\n"
        ),
    )?;
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::open(&work.join("broker.db")).await?);
    let capabilities = Capabilities::connect(config, broker).await?;
    let runtime = Arc::new(Runtime::new(&SandboxConfig::default(), capabilities, work.join("cache"), 4)?);
    let registry = Arc::new(Registry::new(runtime.clone(), plugins.clone()));
    registry.scan().await;
    let plugin = registry.lookup("db_probe.query_loop").ok_or_else(|| anyhow::anyhow!("db_probe not loaded from {}", plugins.display()))?;
    let run = |n: usize| {
        let (runtime, plugin) = (runtime.clone(), plugin.clone());
        let job = job(n, table, "$1");
        async move {
            let t = Instant::now();
            let report = runtime.run_job(&plugin, &job, Arc::default()).await;
            anyhow::ensure!(matches!(report.outcome, RunOutcome::Succeeded(_)), "query_loop failed: {:?}", report.outcome);
            Ok::<Duration, anyhow::Error>(t.elapsed())
        }
    };
    run(n / 10 + 1).await?; // warm up: compile cache, pool, statement cache
    let mut per_query = Vec::new();
    for _ in 0..ROUNDS {
        let empty = run(0).await?;
        let full = run(n).await?;
        per_query.push((full.saturating_sub(empty)).as_secs_f64() * 1e6 / n as f64);
    }
    Ok(median(per_query))
}

/// Median µs per call of `call`, over ROUNDS timed rounds of `n` calls
/// after one warm-up round.
async fn per_call_us<F, Fut>(n: usize, mut call: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut per_query = Vec::new();
    for round in 0..=ROUNDS {
        let t = Instant::now();
        for _ in 0..n {
            call().await?;
        }
        if round > 0 {
            per_query.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
    }
    Ok(median(per_query))
}

/// µs per query made directly with sqlx (a pool, a bound parameter, one row).
async fn direct_sqlite(url: &str, table: &str, n: usize) -> anyhow::Result<f64> {
    let pool = sqlx::SqlitePool::connect(url).await?;
    let sql = format!("SELECT id, name FROM {table} WHERE id = ?1");
    per_call_us(n, || async {
        std::hint::black_box(sqlx::query(AssertSqlSafe(sql.clone())).bind(1_i64).fetch_one(&pool).await?);
        Ok(())
    })
    .await
}

async fn direct_pg(url: &str, table: &str, n: usize) -> anyhow::Result<f64> {
    let pool = sqlx::PgPool::connect(url).await?;
    let sql = format!("SELECT id, name FROM {table} WHERE id = $1");
    per_call_us(n, || async {
        std::hint::black_box(sqlx::query(AssertSqlSafe(sql.clone())).bind(1_i64).fetch_one(&pool).await?);
        Ok(())
    })
    .await
}

fn report(backend: &str, n: usize, guest_us: f64, direct_us: f64, note: &str) {
    println!(
        "{}",
        serde_json::json!({
            "bench": "db_query_one_row",
            "backend": backend,
            "queries_per_job": n,
            "guest_us": (guest_us * 10.0).round() / 10.0,
            "direct_sqlx_us": (direct_us * 10.0).round() / 10.0,
            "ratio": (guest_us / direct_us * 100.0).round() / 100.0,
            "what": "guest: database.query + cursor.next + drop, from a wasm job (grant checks, SQL parse, authorizer/role, row mapping); direct: sqlx fetch_one on a pool",
            "note": note,
        })
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let wasm: PathBuf = args.next().map(PathBuf::from).ok_or_else(|| anyhow::anyhow!("usage: db_call <db_probe.wasm> [queries per job]"))?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);

    // SQLite: the embedded default (the domain file is the data dir's celer.db).
    {
        let work = tempfile::tempdir()?;
        let config = Config { data_dir: work.path().to_path_buf(), ..Default::default() };
        let url = config.database_url();
        let mut admin = sqlx::SqliteConnection::connect_with(&url.parse::<sqlx::sqlite::SqliteConnectOptions>()?.create_if_missing(true)).await?;
        admin.execute("CREATE TABLE bench_one (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO bench_one VALUES (1, 'one')").await?;
        let guest_us = guest(&config, work.path(), &wasm, "bench_one", n).await?;
        let direct_us = direct_sqlite(&url, "bench_one", n).await?;
        report("sqlite", n, guest_us, direct_us, "SQLite in-process: the direct query is one hop to sqlx's connection thread; the guest adds the host call, the SQL parse (once per job per statement), the cursor task and its hop");
    }

    // PostgreSQL, when the test service (or CELER_TEST_DATABASE_URL) answers.
    let pg = std::env::var("CELER_TEST_DATABASE_URL").unwrap_or_else(|_| PG_DEFAULT.to_string());
    match sqlx::PgConnection::connect(&pg).await {
        Err(e) => eprintln!("db_call: PostgreSQL at {pg} not reachable ({e}); skipped"),
        Ok(mut admin) => {
            let table = format!("bench_one_{}", std::process::id());
            admin.execute(AssertSqlSafe(format!("CREATE TABLE {table} (id bigint PRIMARY KEY, name text); INSERT INTO {table} VALUES (1, 'one')"))).await?;
            let work = tempfile::tempdir()?;
            let mut config = Config { data_dir: work.path().to_path_buf(), ..Default::default() };
            config.database.url = Some(pg.clone());
            config.database.role_prefix = format!("celer_bench_{}_", std::process::id());
            let result = async {
                let guest_us = guest(&config, work.path(), &wasm, &table, n).await?;
                let direct_us = direct_pg(&pg, &table, n).await?;
                Ok::<_, anyhow::Error>((guest_us, direct_us))
            }
            .await;
            let role = format!("{}db_probe", config.database.role_prefix);
            let _ = admin.execute(AssertSqlSafe(format!("DROP TABLE {table}"))).await;
            let _ = admin.execute(AssertSqlSafe(format!("DROP OWNED BY \"{role}\"; DROP ROLE IF EXISTS \"{role}\""))).await;
            let (guest_us, direct_us) = result?;
            report(
                "postgres",
                n,
                guest_us,
                direct_us,
                "loopback PostgreSQL; the guest's query runs in a transaction of its own under the plugin's role: one round trip more than the direct one (BEGIN READ ONLY + SET LOCAL ROLE, sent together); the COMMIT is off the guest's path",
            );
        }
    }
    Ok(())
}
