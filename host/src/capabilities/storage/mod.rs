//! `celer:plugin/storage`: object storage, limited to keys that start with a
//! prefix in `grants.storage`.
//!
//! Two backends, chosen by `storage.url` (`CELER_STORAGE`):
//! * `file://dir` ([`file`]), the embedded default (`<data_dir>/storage`):
//!   objects are files; download links are HMAC-signed and served by the
//!   host's own HTTP listener ([`link`], `GET /files/…`);
//! * `s3://bucket/prefix` ([`s3`]): any S3-compatible endpoint; download
//!   links are S3 presigned URLs.
//!
//! Every call checks, in order: the grant (`denied`, logged, never reaches
//! the backend), the key ([`check_key`]: `invalid`), then the backend
//! (`unavailable` when it fails). Every object reached is recorded in the
//! job's `touched.storage`.

pub mod file;
pub mod link;
pub mod s3;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use wasmtime::component::{Resource, ResourceTable};

use super::{BackendError, GrantError, JobInfo, Record, prefix_granted};
use crate::config::Config;
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::storage::{Host, HostWriter, ObjectInfo};
use crate::runtime::manifest::Grants;

use self::file::{FileStore, FileWriter};
use self::link::{LinkError, LinkSigner};
use self::s3::{S3Store, S3Writer};

/// `get` reads whole objects up to this size; larger ones are for links.
pub const GET_MAX_BYTES: u64 = 16 << 20;
/// Longest key accepted (S3's limit).
const MAX_KEY_BYTES: usize = 1024;
/// Most objects one `list` call returns (S3's page size).
const MAX_LIST: u32 = 1000;
/// Longest lifetime of a download link: 7 days, as for S3 SigV4.
const MAX_LINK_S: u32 = 7 * 24 * 3600;
/// Writers a job may hold open at once; each may buffer one S3 part.
const MAX_OPEN_WRITERS: usize = 8;

/// An empty prefix would grant the whole bucket: refused.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    match grants.storage.iter().any(String::is_empty) {
        true => Err(GrantError { grant: "storage", reason: "an empty key prefix would grant every object".into() }),
        false => Ok(()),
    }
}

/// Whether `key` can name an object on every backend without escaping its
/// directory: relative, `/`-separated, no empty, `.` or `..` segment, no
/// control character (NUL included), no segment starting `.celer-`
/// (reserved for the host's temp files), at most 1024 bytes.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("the key is longer than {MAX_KEY_BYTES} bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err(format!("{key:?} contains a control character"));
    }
    if key.starts_with('/') {
        return Err(format!("{key:?} is absolute; keys are relative"));
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err(format!("{key:?} has an empty path segment")),
            "." | ".." => return Err(format!("{key:?} has a {segment:?} path segment")),
            s if s.starts_with(file::RESERVED) => return Err(format!("{key:?}: names starting {:?} are reserved", file::RESERVED)),
            _ => {}
        }
    }
    Ok(())
}

/// A `list` prefix: anything a key may start with.
fn check_prefix(prefix: &str) -> Result<(), String> {
    check_key(&format!("{prefix}x")).map_err(|_| format!("{prefix:?} is not a valid key prefix"))
}

/// A streamed upload, held in the job's storage resource table.
pub struct Writer {
    key: String,
    state: WriterState,
}

enum WriterState {
    File(FileWriter),
    S3(S3Writer),
    /// `finish` was called (successfully or not).
    Finished,
    /// An earlier `write` failed; the upload is lost.
    Failed(String),
}

enum Store {
    File { files: Arc<FileStore>, links: Arc<LinkSigner> },
    S3(S3Store),
}

/// The process-wide storage backend, shared by every job.
pub struct Backend {
    store: Store,
}

/// What the HTTP listener needs to serve `file://` download links.
#[derive(Clone)]
pub struct FileLinks {
    files: Arc<FileStore>,
    links: Arc<LinkSigner>,
}

impl FileLinks {
    /// Checks a link's signature and expiry, then opens its object: the file
    /// and its length. A bad or expired link is `Forbidden` whether or not
    /// the object exists.
    pub async fn open(&self, key: &str, expires: u64, sig: &str) -> Result<(tokio::fs::File, u64), LinkError> {
        self.links.verify(key, expires, sig, unix_now())?;
        check_key(key).map_err(|_| LinkError::NotFound)?;
        self.files.open_for_download(key).await
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Backend {
    /// Connects to what the configuration names: `storage.url`, or
    /// `file://<data_dir>/storage`. Nothing is contacted yet: an S3 endpoint
    /// that is down shows in `ping` (and `/readyz`), and jobs get `unavailable`.
    pub async fn connect(config: &Config) -> Result<Backend, BackendError> {
        let fail = |reason: String| BackendError { capability: "storage", reason };
        let store = match config.storage.url.as_deref() {
            Some(url) if url.starts_with("s3://") => Store::S3(S3Store::connect(url).await.map_err(fail)?),
            Some(url) if url.starts_with("file://") => {
                let dir = url.trim_start_matches("file://");
                if dir.is_empty() {
                    return Err(fail(format!("{url:?} names no directory (expected file://dir)")));
                }
                Self::file_store(config, dir.into())?
            }
            Some(url) => {
                return Err(fail(format!("unsupported storage URL {url:?} (expected s3://bucket/prefix or file://dir)")));
            }
            None => Self::file_store(config, config.data_dir.join("storage"))?,
        };
        Ok(Backend { store })
    }

    fn file_store(config: &Config, dir: std::path::PathBuf) -> Result<Store, BackendError> {
        let fail = |reason: String| BackendError { capability: "storage", reason };
        let files = FileStore::open(dir.clone()).map_err(|e| fail(format!("cannot use {}: {e}", dir.display())))?;
        let secret = LinkSigner::load_secret(config.storage.link_secret.as_deref(), &config.data_dir)
            .map_err(|e| fail(format!("cannot read or create the link secret in {}: {e}", config.data_dir.display())))?;
        let base = config.storage.public_url.clone().unwrap_or_else(|| format!("http://{}", config.http.listen));
        Ok(Store::File { files: Arc::new(files), links: Arc::new(LinkSigner::new(secret, &base)) })
    }

    /// Where objects go, for the log (no secrets).
    pub fn describe(&self) -> String {
        match &self.store {
            Store::File { files, .. } => format!("file://{}", files.root().display()),
            Store::S3(s3) => s3.describe(),
        }
    }

    /// The `file://` download links the HTTP listener serves; none on S3.
    pub fn file_links(&self) -> Option<FileLinks> {
        match &self.store {
            Store::File { files, links } => Some(FileLinks { files: files.clone(), links: links.clone() }),
            Store::S3(_) => None,
        }
    }

    /// Prepares the backend for a plugin at load (nothing to do for storage).
    pub async fn prepare(&self, _plugin: &str, _grants: &Grants) -> Result<(), GrantError> {
        Ok(())
    }

    /// Whether the backend answers, for `/readyz`.
    pub async fn ping(&self) -> Result<(), String> {
        match &self.store {
            Store::File { files, .. } => files.ping().await,
            Store::S3(s3) => s3.ping().await,
        }
    }
}

/// Per-job state of the storage interface.
pub struct StorageCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    backend: Arc<Backend>,
    /// The job's open writers.
    table: ResourceTable,
    open_writers: usize,
    pub(super) record: Record,
}

impl StorageCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>, backend: Arc<Backend>) -> Self {
        StorageCap { info, grants, backend, table: ResourceTable::new(), open_writers: 0, record: Record::default() }
    }

    /// The grant, then the key: `denied` or `invalid` before any backend call.
    fn admit(&mut self, op: &str, key: &str, check: fn(&str) -> Result<(), String>) -> Result<(), HostError> {
        if !prefix_granted(&self.grants.storage, key) {
            return Err(self.record.deny(&self.info, "storage", format!("{op} {key:?}")));
        }
        check(key).map_err(|m| HostError::Invalid(format!("storage: {m}")))
    }

    /// Passes a backend call's result on; a failure is recorded in the
    /// job's `touched.storage` as `{op, key, error: kind}` (the job tried).
    fn reached<T>(&mut self, op: &str, key: &str, result: Result<T, HostError>) -> Result<T, HostError> {
        if let Err(e) = &result {
            let kind = match e {
                HostError::Denied(_) => "denied",
                HostError::Unavailable(_) => "unavailable",
                HostError::Invalid(_) => "invalid",
                HostError::BudgetExceeded(_) => "budget-exceeded",
            };
            self.record.used(json!({"op": op, "key": key, "error": kind}));
        }
        result
    }

    fn writer(&mut self, writer: &Resource<Writer>) -> Result<&mut Writer, HostError> {
        self.table.get_mut(writer).map_err(|_| HostError::Invalid("storage: no such writer".into()))
    }
}

impl Host for StorageCap {
    async fn create(&mut self, key: String, content_type: Option<String>) -> Result<Resource<Writer>, HostError> {
        self.admit("create", &key, check_key)?;
        if self.open_writers >= MAX_OPEN_WRITERS {
            return Err(HostError::BudgetExceeded(format!(
                "storage: at most {MAX_OPEN_WRITERS} writers may be open at once; finish or drop one first"
            )));
        }
        let state = match &self.backend.store {
            Store::File { files, .. } => WriterState::File(files.create(&key).await?),
            Store::S3(s3) => WriterState::S3(s3.create(&key, content_type)),
        };
        let res = self
            .table
            .push(Writer { key, state })
            .map_err(|e| HostError::Unavailable(format!("storage: {e}")))?;
        self.open_writers += 1;
        Ok(res)
    }

    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        self.admit("get", &key, check_key)?;
        let got = match &self.backend.store {
            Store::File { files, .. } => files.get(&key, GET_MAX_BYTES).await,
            Store::S3(s3) => s3.get(&key, GET_MAX_BYTES).await,
        };
        let got = self.reached("get", &key, got)?;
        self.record.used(json!({"op": "get", "key": key, "bytes": got.as_ref().map(Vec::len)}));
        Ok(got)
    }

    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        self.admit("delete", &key, check_key)?;
        let existed = match &self.backend.store {
            Store::File { files, .. } => files.delete(&key).await,
            Store::S3(s3) => s3.delete(&key).await,
        };
        let existed = self.reached("delete", &key, existed)?;
        self.record.used(json!({"op": "delete", "key": key, "existed": existed}));
        Ok(existed)
    }

    async fn list(&mut self, prefix: String, start_after: Option<String>, limit: u32) -> Result<Vec<ObjectInfo>, HostError> {
        self.admit("list", &prefix, check_prefix)?;
        let limit = limit.min(MAX_LIST) as usize;
        let found = if limit == 0 {
            Ok(Vec::new())
        } else {
            match &self.backend.store {
                Store::File { files, .. } => files.list(&prefix, start_after.as_deref(), limit).await,
                Store::S3(s3) => s3.list(&prefix, start_after.as_deref(), limit).await,
            }
        };
        let found = self.reached("list", &prefix, found)?;
        self.record.used(json!({"op": "list", "prefix": prefix, "count": found.len()}));
        Ok(found)
    }

    async fn presign_get(&mut self, key: String, expires_in_s: u32) -> Result<String, HostError> {
        self.admit("presign-get", &key, check_key)?;
        if expires_in_s == 0 || expires_in_s > MAX_LINK_S {
            return Err(HostError::Invalid(format!("storage: expires-in-s must be 1..={MAX_LINK_S} (7 days)")));
        }
        let url = match &self.backend.store {
            Store::File { files, links } => match files.exists(&key).await {
                Ok(true) => Ok(links.url(&key, unix_now() + u64::from(expires_in_s))),
                Ok(false) => Err(HostError::Invalid(format!("storage: no object {key:?}"))),
                Err(e) => Err(e),
            },
            Store::S3(s3) => s3.presign_get(&key, Duration::from_secs(u64::from(expires_in_s))).await,
        };
        let url = self.reached("presign-get", &key, url)?;
        self.record.used(json!({"op": "presign-get", "key": key, "expires_in_s": expires_in_s}));
        Ok(url)
    }
}

impl HostWriter for StorageCap {
    async fn write(&mut self, writer: Resource<Writer>, chunk: Vec<u8>) -> Result<(), HostError> {
        let w = self.writer(&writer)?;
        let result = match &mut w.state {
            WriterState::File(f) => f.write(&chunk).await,
            WriterState::S3(s) => s.write(&chunk).await,
            WriterState::Finished => return Err(HostError::Invalid("storage: write after finish".into())),
            WriterState::Failed(m) => return Err(HostError::Unavailable(m.clone())),
        };
        if let Err(HostError::Unavailable(m) | HostError::BudgetExceeded(m)) = &result {
            // The upload is lost: drop what was sent (temp file, parts) now.
            w.state = WriterState::Failed(format!("{m} (an earlier write of this writer failed)"));
            let key = w.key.clone();
            return self.reached("write", &key, result);
        }
        result
    }

    async fn finish(&mut self, writer: Resource<Writer>) -> Result<ObjectInfo, HostError> {
        let w = self.writer(&writer)?;
        let key = w.key.clone();
        let result = match std::mem::replace(&mut w.state, WriterState::Finished) {
            WriterState::File(f) => f.finish().await,
            WriterState::S3(s) => s.finish().await,
            WriterState::Finished => return Err(HostError::Invalid("storage: finish called twice".into())),
            WriterState::Failed(m) => return Err(HostError::Unavailable(m)),
        };
        let info = self.reached("write", &key, result)?;
        self.record.used(json!({"op": "write", "key": key, "bytes": info.size}));
        Ok(info)
    }

    async fn drop(&mut self, writer: Resource<Writer>) -> wasmtime::Result<()> {
        // Dropping an unfinished writer discards the upload (its Drop).
        self.table.delete(writer)?;
        self.open_writers = self.open_writers.saturating_sub(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_store() {
        for ok in ["a", "exports/42.zip", "exports/a b/ü.txt", "x/.hidden", "a..b/c"] {
            assert_eq!(check_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "/etc/passwd", "exports/../secret", "..", "exports/./x", "exports//x", "exports/", "a\0b",
            "a\nb", "x/.celer-part-1",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_key(&"k".repeat(1025)).is_err());
        assert_eq!(check_prefix("exports/"), Ok(()));
        assert_eq!(check_prefix("exports/ab"), Ok(()));
        assert!(check_prefix("exports/../").is_err());
        assert!(check_prefix("exports//").is_err());
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(f)
    }

    #[test]
    fn file_store_round_trip() {
        let dir = tempfile::tempdir().expect("tmp");
        let files = FileStore::open(dir.path().join("s")).expect("store");
        run(async {
            let mut w = files.create("a/b/c.txt").await.expect("create");
            w.write(b"hello ").await.expect("write");
            w.write(b"world").await.expect("write");
            assert_eq!(files.get("a/b/c.txt", 100).await.expect("get"), None, "not visible before finish");
            let info = w.finish().await.expect("finish");
            assert_eq!((info.key.as_str(), info.size), ("a/b/c.txt", 11));
            assert!(info.modified > 0);
            assert_eq!(files.get("a/b/c.txt", 100).await.expect("get"), Some(b"hello world".to_vec()));
            assert!(matches!(files.get("a/b/c.txt", 5).await, Err(HostError::BudgetExceeded(_))));

            let dropped = files.create("a/b/gone.txt").await.expect("create");
            drop(dropped);
            for k in ["a/b/d.txt", "a/bb.txt", "a/c/e.txt", "z.txt"] {
                files.create(k).await.expect("create").finish().await.expect("finish");
            }
            let keys = |v: Vec<ObjectInfo>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();
            assert_eq!(keys(files.list("a/", None, 100).await.expect("list")), ["a/b/c.txt", "a/b/d.txt", "a/bb.txt", "a/c/e.txt"]);
            assert_eq!(keys(files.list("a/b", None, 100).await.expect("list")), ["a/b/c.txt", "a/b/d.txt", "a/bb.txt"]);
            assert_eq!(keys(files.list("a/", Some("a/b/c.txt"), 2).await.expect("list")), ["a/b/d.txt", "a/bb.txt"]);
            assert!(files.list("nothing/", None, 10).await.expect("list").is_empty());

            assert!(files.delete("a/b/c.txt").await.expect("delete"));
            assert!(!files.delete("a/b/c.txt").await.expect("delete again"));
            assert!(!files.delete("a/b").await.expect("a directory is not an object"));
            assert_eq!(files.get("a/b", 100).await.expect("get dir"), None);
        });
        // No temp file left behind by the dropped writer.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("s/a/b"))
            .expect("dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(file::RESERVED))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
