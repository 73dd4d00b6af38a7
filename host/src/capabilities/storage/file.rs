//! `file://dir`: objects are files under one directory, a key's `/`
//! separating subdirectories. Keys are checked before they get here
//! ([`super::check_key`]: no `..`, no absolute paths, no NUL), so a key
//! never names a path outside the directory.
//!
//! An upload writes to a temp file beside its target (`.celer-part-<id>`,
//! same directory, so the same filesystem) and renames it into place on
//! `finish`: readers see the old object or the new one, never half of one.
//! Names starting with `.celer-` are reserved for this and never listed.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tokio::io::AsyncWriteExt as _;

use super::link::LinkError;
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::storage::ObjectInfo;

/// Names beginning with this are the host's own (temp files).
pub(super) const RESERVED: &str = ".celer-";

/// The directory holding every object.
pub struct FileStore {
    root: PathBuf,
}

fn unavailable(what: &str, e: std::io::Error) -> HostError {
    HostError::Unavailable(format!("storage: {what}: {e}"))
}

fn micros(t: std::io::Result<SystemTime>) -> i64 {
    t.ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl FileStore {
    /// Uses `root`, creating it when missing.
    pub fn open(root: PathBuf) -> std::io::Result<FileStore> {
        std::fs::create_dir_all(&root)?;
        Ok(FileStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of a checked key.
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Whether the directory is there and is a directory.
    pub async fn ping(&self) -> Result<(), String> {
        match tokio::fs::metadata(&self.root).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(format!("{} is not a directory", self.root.display())),
            Err(e) => Err(format!("{}: {e}", self.root.display())),
        }
    }

    /// Metadata of the object `key`, none when there is no such file.
    async fn stat(&self, key: &str) -> Result<Option<std::fs::Metadata>, HostError> {
        match tokio::fs::symlink_metadata(self.path(key)).await {
            Ok(m) if m.is_file() => Ok(Some(m)),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => self.root_ok().await.map(|()| None),
            Err(e) => Err(unavailable("stat", e)),
        }
    }

    /// A missing file means a missing object only while the directory
    /// itself is there; without it the store is down.
    async fn root_ok(&self) -> Result<(), HostError> {
        self.ping().await.map_err(|m| HostError::Unavailable(format!("storage: {m}")))
    }

    pub async fn exists(&self, key: &str) -> Result<bool, HostError> {
        Ok(self.stat(key).await?.is_some())
    }

    /// Starts an upload of `key`.
    pub async fn create(&self, key: &str) -> Result<FileWriter, HostError> {
        let target = self.path(key);
        let dir = target.parent().unwrap_or(&self.root).to_path_buf();
        tokio::fs::create_dir_all(&dir).await.map_err(|e| unavailable("create directory", e))?;
        let tmp = dir.join(format!("{RESERVED}part-{}", uuid::Uuid::now_v7().simple()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(|e| unavailable("create temp file", e))?;
        Ok(FileWriter { key: key.to_string(), tmp, target, file: Some(file) })
    }

    /// The whole object when it is at most `max` bytes.
    pub async fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>, HostError> {
        let Some(meta) = self.stat(key).await? else { return Ok(None) };
        if meta.len() > max {
            return Err(too_big(key, meta.len(), max));
        }
        match tokio::fs::read(self.path(key)).await {
            Ok(bytes) if bytes.len() as u64 > max => Err(too_big(key, bytes.len() as u64, max)),
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if is_missing(&e) => self.root_ok().await.map(|()| None),
            Err(e) => Err(unavailable("read", e)),
        }
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, HostError> {
        if self.stat(key).await?.is_none() {
            return Ok(false);
        }
        match tokio::fs::remove_file(self.path(key)).await {
            Ok(()) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(unavailable("delete", e)),
        }
    }

    /// Objects under `prefix` (a checked prefix), in key order, after
    /// `start_after`, at most `limit`.
    pub async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<Vec<ObjectInfo>, HostError> {
        self.root_ok().await?;
        let (root, prefix, start_after) = (self.root.clone(), prefix.to_string(), start_after.map(str::to_string));
        tokio::task::spawn_blocking(move || list_sync(&root, &prefix, start_after.as_deref(), limit))
            .await
            .map_err(|e| HostError::Unavailable(format!("storage: list: {e}")))?
            .map_err(|e| unavailable("list", e))
    }

    /// Opens `key` for a download link; the file and its length.
    pub async fn open_for_download(&self, key: &str) -> Result<(tokio::fs::File, u64), LinkError> {
        let meta = self.stat(key).await.map_err(|_| LinkError::NotFound)?.ok_or(LinkError::NotFound)?;
        let file = tokio::fs::File::open(self.path(key)).await.map_err(|_| LinkError::NotFound)?;
        Ok((file, meta.len()))
    }
}

fn too_big(key: &str, size: u64, max: u64) -> HostError {
    HostError::BudgetExceeded(format!(
        "storage: {key:?} is {size} bytes; get reads at most {max} bytes (use a download link for larger objects)"
    ))
}

fn is_missing(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory)
}

fn list_sync(root: &Path, prefix: &str, start_after: Option<&str>, limit: usize) -> std::io::Result<Vec<ObjectInfo>> {
    // Start at the deepest directory the prefix names in full.
    let base = prefix.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("");
    let mut stack = vec![base.to_string()];
    let mut found = Vec::new();
    while let Some(dir_key) = stack.pop() {
        let dir = if dir_key.is_empty() { root.to_path_buf() } else { root.join(&dir_key) };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if name.starts_with(RESERVED) {
                continue;
            }
            let key = if dir_key.is_empty() { name } else { format!("{dir_key}/{name}") };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                let sub = format!("{key}/");
                if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                    stack.push(key);
                }
            } else if meta.is_file() && key.starts_with(prefix) && start_after.is_none_or(|s| key.as_str() > s) {
                found.push(ObjectInfo { size: meta.len(), modified: micros(meta.modified()), key });
            }
        }
    }
    found.sort_by(|a, b| a.key.cmp(&b.key));
    found.truncate(limit);
    Ok(found)
}

/// An upload in progress: a temp file that becomes the object on `finish`,
/// and is removed when dropped unfinished.
pub struct FileWriter {
    key: String,
    tmp: PathBuf,
    target: PathBuf,
    file: Option<tokio::fs::File>,
}

impl FileWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), HostError> {
        let file = self.file.as_mut().ok_or_else(|| HostError::Invalid("storage: writer already finished".into()))?;
        file.write_all(chunk).await.map_err(|e| unavailable("write", e))
    }

    /// Flushes, syncs and renames the temp file into place.
    pub async fn finish(mut self) -> Result<ObjectInfo, HostError> {
        let mut file = self.file.take().ok_or_else(|| HostError::Invalid("storage: writer already finished".into()))?;
        file.flush().await.map_err(|e| unavailable("write", e))?;
        file.sync_all().await.map_err(|e| unavailable("sync", e))?;
        drop(file);
        tokio::fs::rename(&self.tmp, &self.target).await.map_err(|e| unavailable("rename", e))?;
        // Renamed: nothing left for Drop to clean up.
        self.tmp = PathBuf::new();
        let meta = tokio::fs::metadata(&self.target).await.map_err(|e| unavailable("stat", e))?;
        Ok(ObjectInfo { key: std::mem::take(&mut self.key), size: meta.len(), modified: micros(meta.modified()) })
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
