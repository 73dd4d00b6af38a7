//! `export`: the GDPR export of one organization, the seeds'
//! `export_organization_data` Celery task.
//!
//! `export.organization(org_id, requested_by)`:
//!
//! 1. only an `owner` or `admin` of the organization may ask (checked in the
//!    `memberships` table; anyone else fails the job with the reason);
//! 2. every table of the organization (`tables.rs`: members with email, name,
//!    role and language; contacts; images; tags; their polymorphic
//!    relations; events and attendees; creator fields and timestamps) is
//!    read page by page and written as JSON into a zip that streams through
//!    the host's storage `writer` to `exports/<org>/<job id>.zip`: memory
//!    stays at one page of rows, one deflate window and one upload chunk,
//!    whatever the size of the organization;
//! 3. the export is recorded in `data_exports` (idempotent: a redelivered
//!    job rewrites the same object and row);
//! 4. a download link valid `link_ttl_days` (7) is made with `presign-get`,
//!    and `email.send` (template `export_ready`) is enqueued for the
//!    requester;
//! 5. progress is reported as rows written of rows counted.

pub mod sink;
pub mod tables;

use std::collections::BTreeMap;
use std::io::Write;

use celer_plugin::database::{self, Row, Value as Db};
use celer_plugin::time::{self, DAY};
use celer_plugin::{Context, EnqueueOptions, HostError, TaskError, storage};
use serde::{Deserialize, Serialize};
use serde_json::json;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use crate::sink::{ChunkSink, Chunked, ErrorSlot};
use crate::tables::{TABLES, Table};

celer_plugin::plugin! {
    name: "export",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "export.organization" => organization,
    }
}

/// The manifest's `[config]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// How long the download link (and the export) lives.
    pub link_ttl_days: u32,
    /// `deflate` (default) or `stored` (no compression: fastest, biggest).
    pub compression: String,
    /// Deflate level 1 (fast) … 9 (small).
    pub compression_level: i64,
    /// Rows per page query.
    pub page_rows: u32,
    /// Rows per cursor `next` call.
    pub batch_rows: u32,
    /// Bytes per storage `write` call.
    pub chunk_kib: u32,
    /// Objects go to `<key_prefix><org id>/<job id>.zip`; must be granted.
    pub key_prefix: String,
    /// The task that mails the link (`""`: none).
    pub email_task: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            link_ttl_days: 7,
            compression: "deflate".into(),
            compression_level: 1,
            page_rows: 5000,
            batch_rows: 1000,
            chunk_kib: 1024,
            key_prefix: "exports/".into(),
            email_task: "email.send".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct Organization {
    // No `#[serde(alias)]` here: the SDK names positional arguments after
    // the fields serde reports, and serde reports aliases as fields too.
    pub org_id: i64,
    pub requested_by: i64,
}

#[derive(Debug, Serialize)]
pub struct Exported {
    pub organization_id: i64,
    pub storage_key: String,
    pub url: String,
    pub size_bytes: u64,
    pub rows: u64,
    pub tables: BTreeMap<String, u64>,
    pub expires_at: String,
    /// The follow-up `email.send` job, when one was enqueued.
    pub email_job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_error: Option<String>,
}

fn organization(ctx: &Context, args: Organization) -> Result<Exported, TaskError> {
    let config: Config = ctx.config()?;
    let now = time::now_micros();
    let org = args.org_id;

    let org_row = database::query_all(tables::ORGANIZATION_SQL, &[Db::Int(org)])?
        .into_iter()
        .next()
        .ok_or_else(|| TaskError::fail(format!("no organization with id {org}")))?;
    let org_name = org_row.get(1).and_then(Db::as_str).unwrap_or_default().to_owned();
    let role = database::query_all(tables::ROLE_SQL, &[Db::Int(org), Db::Int(args.requested_by)])?
        .into_iter()
        .next()
        .and_then(|r| r.first().and_then(Db::as_str).map(str::to_owned));
    check_role(org, args.requested_by, role.as_deref()).map_err(TaskError::fail)?;

    let key = format!("{}{org}/{}.zip", config.key_prefix, ctx.job_id());
    ctx.info(format!("export.organization: organization {org} for user {} into {key}", args.requested_by));
    let writer = storage::create(&key, Some("application/zip"))?;
    let mut source = HostSource { batch_rows: config.batch_rows.max(1) };
    let plan = Plan { org_id: org, requested_by: args.requested_by, now, organization: org_row, config: config.clone() };
    let (writer, summary) = write_zip(&mut source, writer, &plan, &mut |done, total| ctx.progress(done, total))?;
    let info = writer.finish()?;

    let ttl_days = config.link_ttl_days.max(1);
    let expires = now + i64::from(ttl_days) * DAY;
    database::execute(
        "INSERT INTO data_exports (organization_id, requested_by, storage_key, status, size_bytes, row_count, created_at, expires_at) \
         VALUES ($1, $2, $3, 'COMPLETED', $4, $5, $6, $7) ON CONFLICT (storage_key) DO NOTHING",
        &[
            Db::Int(org),
            Db::Int(args.requested_by),
            Db::Text(key.clone()),
            Db::Int(i64::try_from(info.size).unwrap_or(i64::MAX)),
            Db::Int(i64::try_from(summary.rows).unwrap_or(i64::MAX)),
            Db::Timestamp(now),
            Db::Timestamp(expires),
        ],
    )?;
    let url = storage::presign_get(&key, ttl_days.saturating_mul(86_400))?;

    let (mut email_job, mut email_error) = (None, None);
    if !config.email_task.is_empty() {
        let kwargs = json!({
            "template": "export_ready",
            "user_id": args.requested_by,
            "context": {
                "organization": org_name,
                "url": url,
                "expires_at": human_time(expires),
                "link_ttl_days": ttl_days,
            },
        });
        let options = EnqueueOptions::new().idempotency_key(format!("export.organization:{}:email", ctx.job_id()));
        match ctx.enqueue_with(&config.email_task, (), kwargs, &options) {
            Ok(id) => email_job = Some(id),
            // The export exists and is recorded: a broker that is away is
            // worth a retry (the same object and row are rewritten)...
            Err(HostError::Unavailable(m)) => return Err(TaskError::retry(format!("unavailable: cannot enqueue the email: {m}"))),
            // ...a refusal is the operator's to fix, and the link is in the result.
            Err(e) => {
                ctx.error(format!("export.organization: the export is ready but the email was not enqueued: {e:?}"));
                email_error = Some(format!("{e:?}"));
            }
        }
    }
    ctx.info(format!("export.organization: {} rows, {} bytes, {key}", summary.rows, info.size));
    Ok(Exported {
        organization_id: org,
        storage_key: key,
        url,
        size_bytes: info.size,
        rows: summary.rows,
        tables: summary.tables,
        expires_at: time::format_utc(expires),
        email_job,
        email_error,
    })
}

/// Only an owner or admin of the organization may export it.
pub fn check_role(org: i64, user: i64, role: Option<&str>) -> Result<(), String> {
    match role {
        Some(r) if tables::ALLOWED_ROLES.contains(&r) => Ok(()),
        Some(r) => Err(format!(
            "user {user} may not export organization {org}: their role is `{r}`, an owner or admin is needed"
        )),
        None => Err(format!("user {user} may not export organization {org}: they are not a member of it")),
    }
}

/// `2026-11-29 12:00 UTC`, for people.
pub fn human_time(micros: i64) -> String {
    let c = time::to_civil(micros);
    format!("{:04}-{:02}-{:02} {:02}:{:02} UTC", c.year, c.month, c.day, c.hour, c.minute)
}

/// Where rows come from: the host's database, or a test double.
pub trait Source {
    fn count(&mut self, sql: &str, org: i64) -> Result<u64, HostError>;
    /// Every row of one page query.
    fn page(&mut self, sql: &str, params: &[Db]) -> Result<Vec<Row>, HostError>;
}

struct HostSource {
    batch_rows: u32,
}

impl Source for HostSource {
    fn count(&mut self, sql: &str, org: i64) -> Result<u64, HostError> {
        let rows = database::query_all(sql, &[Db::Int(org)])?;
        Ok(rows.first().and_then(|r| r.first()).and_then(Db::as_i64).unwrap_or(0).max(0) as u64)
    }

    fn page(&mut self, sql: &str, params: &[Db]) -> Result<Vec<Row>, HostError> {
        let cursor = database::query(sql, params)?;
        let mut rows = Vec::new();
        loop {
            let batch = cursor.next(self.batch_rows)?;
            if batch.is_empty() {
                return Ok(rows);
            }
            rows.extend(batch);
        }
    }
}

/// What one export writes.
pub struct Plan {
    pub org_id: i64,
    pub requested_by: i64,
    pub now: i64,
    /// The organization's row, as `tables::ORGANIZATION_SQL` returns it.
    pub organization: Row,
    pub config: Config,
}

/// Rows written, per table.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub rows: u64,
    pub tables: BTreeMap<String, u64>,
}

/// Streams the whole export as a zip into `sink`: `organization.json`, one
/// `<table>.json` array per table, then `export.json` (what is in it).
/// Returns the sink once everything, the zip's central directory included,
/// has been handed to it.
pub fn write_zip<S: ChunkSink>(
    source: &mut impl Source,
    sink: S,
    plan: &Plan,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(S, Summary), TaskError> {
    let config = &plan.config;
    let mut counts = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        counts.push(source.count(table.count_sql, plan.org_id)?);
    }
    let total: u64 = counts.iter().sum::<u64>() + 1;

    let slot = ErrorSlot::default();
    let chunk = usize::try_from(config.chunk_kib.max(1)).unwrap_or(1024) * 1024;
    let mut zip = ZipWriter::new_stream(Chunked::new(sink, chunk, slot.clone()));
    let zip_err = |e: &dyn std::fmt::Display| -> TaskError {
        match slot.borrow().clone() {
            Some(host) => TaskError::from(host),
            None => TaskError::fail(format!("writing the zip: {e}")),
        }
    };
    let base = entry_options(config, plan.now).map_err(TaskError::fail)?;

    zip.start_file("organization.json", base).map_err(|e| zip_err(&e))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    tables::write_row(&mut buf, tables::ORGANIZATION_COLUMNS, &plan.organization);
    buf.push(b'\n');
    zip.write_all(&buf).map_err(|e| zip_err(&e))?;
    let mut done = 1;
    progress(done, total);

    let mut summary = Summary::default();
    for (table, expected) in TABLES.iter().zip(&counts) {
        // Past 2 GiB of JSON an entry needs zip64 sizes; ~1 KiB a row is generous.
        let large = expected.saturating_mul(1024) > (2_u64 << 30);
        zip.start_file(format!("{}.json", table.name), base.large_file(large)).map_err(|e| zip_err(&e))?;
        let rows = write_table(source, &mut zip, table, plan, &mut buf, &mut |n| {
            done += n;
            progress(done.min(total), total);
        })
        .map_err(|e| match e {
            TableError::Host(h) => TaskError::from(h),
            TableError::Io(io) => zip_err(&io),
            TableError::Key(name) => TaskError::fail(format!("table {name}: a row without its key")),
        })?;
        summary.rows += rows;
        summary.tables.insert(table.name.to_owned(), rows);
    }

    let about = json!({
        "format": "celer-export/1",
        "organization_id": plan.org_id,
        "requested_by": plan.requested_by,
        "generated_at": time::format_utc(plan.now),
        "tables": summary.tables,
        "rows": summary.rows,
    });
    zip.start_file("export.json", base).map_err(|e| zip_err(&e))?;
    zip.write_all(format!("{about:#}\n").as_bytes()).map_err(|e| zip_err(&e))?;
    let chunked = zip.finish().map_err(|e| zip_err(&e))?.into_inner();
    let sink = chunked.finish()?;
    progress(total.max(done), total.max(done));
    Ok((sink, summary))
}

fn entry_options(config: &Config, now: i64) -> Result<SimpleFileOptions, String> {
    let c = time::to_civil(now);
    let modified = zip::DateTime::from_date_and_time(
        u16::try_from(c.year.clamp(1980, 2107)).unwrap_or(1980),
        c.month as u8,
        c.day as u8,
        c.hour as u8,
        c.minute as u8,
        c.second as u8,
    )
    .unwrap_or_default();
    let options = SimpleFileOptions::default().last_modified_time(modified).unix_permissions(0o644);
    match config.compression.as_str() {
        "deflate" | "deflated" => Ok(options
            .compression_method(CompressionMethod::Deflated)
            .compression_level(Some(config.compression_level.clamp(1, 9)))),
        "stored" | "none" => Ok(options.compression_method(CompressionMethod::Stored)),
        other => Err(format!("config compression = {other:?}: use \"deflate\" or \"stored\"")),
    }
}

enum TableError {
    Host(HostError),
    Io(std::io::Error),
    Key(&'static str),
}

/// Writes one table as a JSON array, page by page; returns its row count.
fn write_table(
    source: &mut impl Source,
    out: &mut impl Write,
    table: &Table,
    plan: &Plan,
    buf: &mut Vec<u8>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, TableError> {
    let limit = plan.config.page_rows.max(1);
    let mut after = tables::first_key(table.key);
    let mut rows = 0_u64;
    buf.clear();
    buf.push(b'[');
    loop {
        let page = source
            .page(table.page_sql, &tables::page_params(plan.org_id, &after, limit))
            .map_err(TableError::Host)?;
        let Some(last) = page.last() else { break };
        after = tables::key_of(table.key, last).ok_or(TableError::Key(table.name))?;
        for row in &page {
            buf.extend_from_slice(if rows == 0 { b"\n" } else { b",\n" });
            tables::write_row(buf, table.columns, row);
            rows += 1;
            if buf.len() >= 64 * 1024 {
                out.write_all(buf).map_err(TableError::Io)?;
                buf.clear();
            }
        }
        progress(page.len() as u64);
        if page.len() < limit as usize {
            break;
        }
    }
    buf.extend_from_slice(if rows == 0 { b"]\n" } else { b"\n]\n" });
    out.write_all(buf).map_err(TableError::Io)?;
    buf.clear();
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Read;

    use super::*;
    use crate::sink::tests::FakeSink;
    use crate::tables::{Key, Kind};

    /// Serves `n` synthetic rows per table, honouring the keyset paging
    /// exactly as the SQL would (keys strictly after `after`, `limit` rows).
    struct FakeSource {
        rows_per_table: i64,
        pages: usize,
        largest_page: usize,
    }

    impl FakeSource {
        fn table_of(sql: &str) -> &'static Table {
            TABLES.iter().find(|t| t.page_sql == sql || t.count_sql == sql).expect("known SQL")
        }
    }

    impl Source for FakeSource {
        fn count(&mut self, _sql: &str, _org: i64) -> Result<u64, HostError> {
            Ok(self.rows_per_table as u64)
        }

        fn page(&mut self, sql: &str, params: &[Db]) -> Result<Vec<Row>, HostError> {
            let table = Self::table_of(sql);
            let org = params[0].as_i64().unwrap();
            let limit = params.last().unwrap().as_i64().unwrap();
            // Two-column keys: parent id = id / 10 (ten children per parent).
            let key = |id: i64| match table.key {
                Key::One(_) => vec![id],
                Key::Two(..) => vec![id / 10, id],
            };
            let after: Vec<i64> = params[1..params.len() - 1].iter().map(|v| v.as_i64().unwrap()).collect();
            let rows: Vec<Row> = (1..=self.rows_per_table)
                .filter(|id| key(*id) > after)
                .take(limit as usize)
                .map(|id| {
                    let k = key(id);
                    table
                        .columns
                        .iter()
                        .enumerate()
                        .map(|(i, (name, kind))| match (table.key, i, kind) {
                            (Key::One(a), i, _) if i == a => Db::Int(k[0]),
                            (Key::Two(a, _), i, _) if i == a => Db::Int(k[0]),
                            (Key::Two(_, b), i, _) if i == b => Db::Int(k[1]),
                            (_, _, Kind::Int) => Db::Int(org),
                            (_, _, Kind::Bool) => Db::Int(1),
                            (_, _, Kind::Time) => Db::Timestamp(id * 1_000_000),
                            (_, _, Kind::Text) => Db::Text(format!("{name} {id} of org {org} \"quoted\"")),
                        })
                        .collect()
                })
                .collect();
            self.pages += 1;
            self.largest_page = self.largest_page.max(rows.len());
            Ok(rows)
        }
    }

    fn plan(config: Config) -> Plan {
        Plan {
            org_id: 42,
            requested_by: 7,
            now: time::parse_utc("2026-11-22T12:00:00Z").unwrap(),
            organization: vec![
                Db::Int(42),
                Db::Text("Org".into()),
                Db::Int(7),
                Db::Text("2025-01-01T00:00:00.000000Z".into()),
                Db::Timestamp(0),
            ],
            config,
        }
    }

    fn unzip(bytes: Vec<u8>) -> HashMap<String, serde_json::Value> {
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("a valid zip");
        let mut files = HashMap::new();
        for i in 0..archive.len() {
            let mut f = archive.by_index(i).unwrap();
            let mut text = String::new();
            f.read_to_string(&mut text).unwrap();
            files.insert(f.name().unwrap().into_owned(), serde_json::from_str(&text).expect("each file is JSON"));
        }
        files
    }

    fn run(rows: i64, config: Config) -> (FakeSink, Summary, FakeSource, Vec<(u64, u64)>) {
        let mut source = FakeSource { rows_per_table: rows, pages: 0, largest_page: 0 };
        let mut seen = Vec::new();
        let (sink, summary) =
            write_zip(&mut source, FakeSink::default(), &plan(config), &mut |d, t| seen.push((d, t))).unwrap();
        (sink, summary, source, seen)
    }

    #[test]
    fn every_row_of_every_table_lands_in_the_zip_in_key_order() {
        for compression in ["deflate", "stored"] {
            let config = Config { page_rows: 7, compression: compression.into(), ..Config::default() };
            let (sink, summary, source, progress) = run(25, config);
            assert_eq!(summary.rows, 25 * TABLES.len() as u64);
            assert!(source.largest_page <= 7, "pages are bounded");
            let files = unzip(sink.bytes());
            assert_eq!(files.len(), TABLES.len() + 2, "{:?}", files.keys());
            assert_eq!(files["organization.json"]["name"], "Org");
            assert_eq!(files["organization.json"]["updated_at"], "1970-01-01T00:00:00.000000Z");
            for table in TABLES {
                let rows = files[&format!("{}.json", table.name)].as_array().unwrap().clone();
                assert_eq!(rows.len(), 25, "{}", table.name);
                let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
                assert_eq!(ids, (1..=25).collect::<Vec<_>>(), "{}: every id once, in order", table.name);
            }
            let about = &files["export.json"];
            assert_eq!(about["rows"], 25 * TABLES.len() as u64);
            assert_eq!(about["generated_at"], "2026-11-22T12:00:00.000000Z");
            assert_eq!(about["tables"]["contacts"], 25);
            let (done, total) = *progress.last().unwrap();
            assert_eq!((done, total), (25 * TABLES.len() as u64 + 1, 25 * TABLES.len() as u64 + 1));
            assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0), "progress only grows");
        }
    }

    #[test]
    fn empty_tables_are_empty_arrays() {
        let (sink, summary, ..) = run(0, Config::default());
        assert_eq!(summary.rows, 0);
        let files = unzip(sink.bytes());
        assert_eq!(files["contacts.json"], serde_json::json!([]));
    }

    #[test]
    fn the_zip_streams_out_in_bounded_chunks() {
        // ~ 40 MB of JSON, stored: it must leave in 64 KiB chunks as it is
        // written, never gathered whole.
        let config = Config { compression: "stored".into(), chunk_kib: 64, page_rows: 5000, ..Config::default() };
        let (sink, summary, ..) = run(40_000, config);
        assert_eq!(summary.rows, 40_000 * TABLES.len() as u64);
        assert!(sink.chunks.len() > 100, "{} chunks", sink.chunks.len());
        assert!(sink.chunks.iter().all(|c| c.len() <= 64 * 1024));
        assert!(sink.chunks[..sink.chunks.len() - 1].iter().all(|c| c.len() == 64 * 1024), "only the last chunk is short");
        let files = unzip(sink.bytes());
        assert_eq!(files["events.json"].as_array().unwrap().len(), 40_000);
    }

    #[test]
    fn a_storage_outage_mid_way_asks_for_a_retry() {
        let mut source = FakeSource { rows_per_table: 20_000, pages: 0, largest_page: 0 };
        let sink = FakeSink { chunks: Vec::new(), fail_at: Some((3, HostError::Unavailable("s3 down".into()))) };
        let config = Config { compression: "stored".into(), chunk_kib: 64, ..Config::default() };
        let err = write_zip(&mut source, sink, &plan(config), &mut |_, _| {}).map(|_| ()).unwrap_err();
        assert_eq!(err, TaskError::retry("unavailable: s3 down"));
        let sink = FakeSink { chunks: Vec::new(), fail_at: Some((0, HostError::Denied("exports/".into()))) };
        let config = Config { compression: "stored".into(), chunk_kib: 1, ..Config::default() };
        let err = write_zip(&mut source, sink, &plan(config), &mut |_, _| {}).map(|_| ()).unwrap_err();
        assert!(matches!(err, TaskError::Fail(ref m) if m.starts_with("denied")), "{err:?}");
    }

    #[test]
    fn only_owners_and_admins_may_export() {
        assert!(check_role(1, 2, Some("owner")).is_ok());
        assert!(check_role(1, 2, Some("admin")).is_ok());
        let e = check_role(1, 2, Some("member")).unwrap_err();
        assert!(e.contains("role is `member`"), "{e}");
        let e = check_role(1, 2, None).unwrap_err();
        assert!(e.contains("not a member"), "{e}");
    }

    #[test]
    fn config_and_arguments() {
        assert!(entry_options(&Config { compression: "zstd".into(), ..Config::default() }, 0).is_err());
        let a: Organization = celer_plugin::args::decode("[42, 7]", "{}").unwrap();
        assert_eq!((a.org_id, a.requested_by), (42, 7));
        let a: Organization = celer_plugin::args::decode("[]", r#"{"org_id": 42, "requested_by": 7}"#).unwrap();
        assert_eq!(a.org_id, 42);
        assert_eq!(human_time(time::parse_utc("2026-11-29T12:05:59Z").unwrap()), "2026-11-29 12:05 UTC");
    }
}
