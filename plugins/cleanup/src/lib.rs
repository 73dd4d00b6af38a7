//! `cleanup`: the seeds' periodic cleanups, batched and idempotent.
//!
//! * `cleanup.orphan_images`: images that no `image_relations` row points
//!   to; their stored object is deleted first, then the row (and the tag
//!   relations that pointed at the image). An object that is already gone
//!   is fine; an object under a prefix the manifest does not grant is left
//!   alone together with its row, and counted as `skipped`.
//! * `cleanup.orphan_tags`: tags that no `tag_relations` row points to.
//! * `cleanup.mfa`: TOTP devices never confirmed and older than
//!   `unconfirmed_totp_hours` (24), backup codes used more than
//!   `used_backup_code_days` (90) ago. Both configurable in `[config]`, and
//!   per job through the arguments.
//! * `cleanup.expired_exports`: data exports older than `export_max_age_days`
//!   (7): object, then row.
//!
//! Every bound is computed here from the sandbox's clock (UTC) and bound as
//! a timestamp parameter. Every delete works in batches of `batch_size` rows
//! and re-checks its condition, so a second run (or a concurrent one) finds
//! nothing more to do.

use celer_plugin::database::{self, Value as Db};
use celer_plugin::time::{self, DAY, HOUR};
use celer_plugin::{Context, HostError, TaskError, storage};
use serde::{Deserialize, Serialize};

celer_plugin::plugin! {
    name: "cleanup",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "cleanup.orphan_images" => orphan_images,
        "cleanup.orphan_tags" => orphan_tags,
        "cleanup.mfa" => mfa,
        "cleanup.expired_exports" => expired_exports,
    }
}

/// The manifest's `[config]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Rows per batch (one SELECT and one DELETE each).
    pub batch_size: u32,
    pub unconfirmed_totp_hours: u32,
    pub used_backup_code_days: u32,
    pub export_max_age_days: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self { batch_size: 500, unconfirmed_totp_hours: 24, used_backup_code_days: 90, export_max_age_days: 7 }
    }
}

impl Config {
    fn batch(&self) -> u32 {
        self.batch_size.clamp(1, 5000)
    }
}

/// What a run removed.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Removed {
    /// Rows deleted.
    pub deleted: u64,
    /// Stored objects deleted (that existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objects_deleted: Option<u64>,
    /// Rows left alone, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

// ------------------------------------------------------------------ images

const ORPHAN_IMAGES: &str = "SELECT i.id, i.storage_key FROM images i \
     WHERE i.id > $1 AND NOT EXISTS (SELECT 1 FROM image_relations r WHERE r.image_id = i.id) \
     ORDER BY i.id LIMIT $2";

fn orphan_images(ctx: &Context, (): ()) -> Result<Removed, TaskError> {
    let config: Config = ctx.config()?;
    let mut removed = Removed { objects_deleted: Some(0), ..Removed::default() };
    let mut after = 0_i64;
    loop {
        let rows = database::query_all(ORPHAN_IMAGES, &[Db::Int(after), Db::Int(config.batch().into())])?;
        let Some(last) = rows.last() else { break };
        after = last.first().and_then(Db::as_i64).unwrap_or(i64::MAX);
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let (Some(id), key) = (row.first().and_then(Db::as_i64), row.get(1).and_then(Db::as_str)) else {
                continue;
            };
            match key.filter(|k| !k.is_empty()) {
                None => ids.push(id),
                Some(key) => match storage::delete(key) {
                    Ok(existed) => {
                        ids.push(id);
                        if existed {
                            *removed.objects_deleted.get_or_insert(0) += 1;
                        }
                    }
                    // Not ours to delete: keep the row, which is the only
                    // pointer to the object, and say so.
                    Err(HostError::Denied(m)) => removed.skipped.push(format!("image {id}: {key}: {m}")),
                    Err(e) => return Err(e.into()),
                },
            }
        }
        if !ids.is_empty() {
            // Still an orphan? A relation may have been added meanwhile.
            let sql = format!(
                "DELETE FROM images WHERE id IN ({}) \
                 AND NOT EXISTS (SELECT 1 FROM image_relations r WHERE r.image_id = images.id)",
                placeholders(1, ids.len())
            );
            removed.deleted += database::execute(&sql, &ints(&ids))?;
            let sql = format!(
                "DELETE FROM tag_relations WHERE content_type = 'image' AND object_id IN ({})",
                placeholders(1, ids.len())
            );
            database::execute(&sql, &ints(&ids))?;
        }
        if rows.len() < config.batch() as usize {
            break;
        }
    }
    ctx.info(format!(
        "cleanup.orphan_images: {} rows, {} objects deleted, {} skipped",
        removed.deleted,
        removed.objects_deleted.unwrap_or(0),
        removed.skipped.len()
    ));
    Ok(removed)
}

// -------------------------------------------------------------------- tags

fn orphan_tags(ctx: &Context, (): ()) -> Result<Removed, TaskError> {
    let config: Config = ctx.config()?;
    let deleted = delete_in_batches(
        "DELETE FROM tags WHERE id IN (SELECT t.id FROM tags t \
         WHERE NOT EXISTS (SELECT 1 FROM tag_relations r WHERE r.tag_id = t.id) ORDER BY t.id LIMIT $1)",
        &[],
        config.batch(),
    )?;
    ctx.info(format!("cleanup.orphan_tags: {deleted} tags deleted"));
    Ok(Removed { deleted, ..Removed::default() })
}

// --------------------------------------------------------------------- mfa

/// Per-job overrides of the configured ages.
#[derive(Debug, Default, Deserialize)]
pub struct Mfa {
    pub unconfirmed_totp_hours: Option<u32>,
    pub used_backup_code_days: Option<u32>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct MfaRemoved {
    pub totp_devices: u64,
    pub backup_codes: u64,
    /// The bounds used, UTC.
    pub totp_created_before: String,
    pub codes_used_before: String,
}

/// The two cut-offs of `cleanup.mfa`, from `now`.
pub fn mfa_cutoffs(config: &Config, args: &Mfa, now: i64) -> (i64, i64) {
    let hours = args.unconfirmed_totp_hours.unwrap_or(config.unconfirmed_totp_hours);
    let days = args.used_backup_code_days.unwrap_or(config.used_backup_code_days);
    (now - i64::from(hours) * HOUR, now - i64::from(days) * DAY)
}

fn mfa(ctx: &Context, args: Mfa) -> Result<MfaRemoved, TaskError> {
    let config: Config = ctx.config()?;
    let (totp_before, codes_before) = mfa_cutoffs(&config, &args, time::now_micros());
    let totp_devices = delete_in_batches(
        "DELETE FROM totp_devices WHERE id IN (SELECT id FROM totp_devices \
         WHERE NOT confirmed AND created_at < $1 ORDER BY id LIMIT $2)",
        &[Db::Timestamp(totp_before)],
        config.batch(),
    )?;
    let backup_codes = delete_in_batches(
        "DELETE FROM backup_codes WHERE id IN (SELECT id FROM backup_codes \
         WHERE used_at IS NOT NULL AND used_at < $1 ORDER BY id LIMIT $2)",
        &[Db::Timestamp(codes_before)],
        config.batch(),
    )?;
    ctx.info(format!("cleanup.mfa: {totp_devices} unconfirmed TOTP devices, {backup_codes} used backup codes deleted"));
    Ok(MfaRemoved {
        totp_devices,
        backup_codes,
        totp_created_before: time::format_utc(totp_before),
        codes_used_before: time::format_utc(codes_before),
    })
}

// ----------------------------------------------------------------- exports

const OLD_EXPORTS: &str = "SELECT id, storage_key FROM data_exports \
     WHERE created_at < $1 AND id > $2 ORDER BY id LIMIT $3";

fn expired_exports(ctx: &Context, (): ()) -> Result<Removed, TaskError> {
    let config: Config = ctx.config()?;
    let before = time::now_micros() - i64::from(config.export_max_age_days) * DAY;
    let mut removed = Removed { objects_deleted: Some(0), ..Removed::default() };
    let mut after = 0_i64;
    loop {
        let rows = database::query_all(
            OLD_EXPORTS,
            &[Db::Timestamp(before), Db::Int(after), Db::Int(config.batch().into())],
        )?;
        let Some(last) = rows.last() else { break };
        after = last.first().and_then(Db::as_i64).unwrap_or(i64::MAX);
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let (Some(id), key) = (row.first().and_then(Db::as_i64), row.get(1).and_then(Db::as_str)) else {
                continue;
            };
            match key.filter(|k| !k.is_empty()).map(storage::delete) {
                None => ids.push(id),
                Some(Ok(existed)) => {
                    ids.push(id);
                    if existed {
                        *removed.objects_deleted.get_or_insert(0) += 1;
                    }
                }
                Some(Err(HostError::Denied(m))) => {
                    removed.skipped.push(format!("export {id}: {}: {m}", key.unwrap_or_default()))
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
        if !ids.is_empty() {
            let sql = format!("DELETE FROM data_exports WHERE id IN ({})", placeholders(1, ids.len()));
            removed.deleted += database::execute(&sql, &ints(&ids))?;
        }
        if rows.len() < config.batch() as usize {
            break;
        }
    }
    ctx.info(format!(
        "cleanup.expired_exports: {} rows, {} objects deleted (created before {})",
        removed.deleted,
        removed.objects_deleted.unwrap_or(0),
        time::format_utc(before)
    ));
    Ok(removed)
}

// ----------------------------------------------------------------- helpers

/// Runs a `DELETE … WHERE id IN (SELECT … LIMIT $n)` until it deletes
/// fewer than a batch; `$n` is the parameter after `params`.
fn delete_in_batches(sql: &str, params: &[Db], batch: u32) -> Result<u64, HostError> {
    let mut all = params.to_vec();
    all.push(Db::Int(batch.into()));
    let mut total = 0;
    loop {
        let n = database::execute(sql, &all)?;
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
    }
}

/// `$first, $first+1, …` — `count` placeholders.
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

fn ints(ids: &[i64]) -> Vec<Db> {
    ids.iter().copied().map(Db::Int).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_count_from_the_first() {
        assert_eq!(placeholders(1, 3), "$1, $2, $3");
        assert_eq!(placeholders(4, 1), "$4");
        assert_eq!(placeholders(1, 0), "");
    }

    #[test]
    fn mfa_cutoffs_use_config_unless_the_job_says_otherwise() {
        let now = time::parse_utc("2026-11-22T12:00:00Z").unwrap();
        let config = Config::default();
        let (totp, codes) = mfa_cutoffs(&config, &Mfa::default(), now);
        assert_eq!(time::format_utc(totp), "2026-11-21T12:00:00.000000Z");
        assert_eq!(time::format_utc(codes), "2026-08-24T12:00:00.000000Z");
        let args = Mfa { unconfirmed_totp_hours: Some(1), used_backup_code_days: None };
        let (totp, _) = mfa_cutoffs(&Config { used_backup_code_days: 1, ..config }, &args, now);
        assert_eq!(time::format_utc(totp), "2026-11-22T11:00:00.000000Z");
    }

    #[test]
    fn batches_are_bounded() {
        assert_eq!(Config { batch_size: 0, ..Config::default() }.batch(), 1);
        assert_eq!(Config { batch_size: 1_000_000, ..Config::default() }.batch(), 5000);
    }

    #[test]
    fn arguments_are_optional() {
        let m: Mfa = celer_plugin::args::decode("[]", "{}").unwrap();
        assert!(m.unconfirmed_totp_hours.is_none() && m.used_backup_code_days.is_none());
        let m: Mfa = celer_plugin::args::decode("[2]", "{}").unwrap();
        assert_eq!(m.unconfirmed_totp_hours, Some(2));
        celer_plugin::args::decode::<()>("[]", "{}").unwrap();
    }
}
