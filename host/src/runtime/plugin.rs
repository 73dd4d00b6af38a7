//! Turning `<name>.wasm` + `<name>.toml` into a plugin ready to run, or a
//! clear reason why not. Validation happens once, at load: the file is a
//! component, it links against the `task-plugin` world, its manifest parses
//! and is grantable, and its `describe()` names exactly the manifest's tasks.
//! Compiled code is cached on disk by the digest of the file, so a restart
//! does not recompile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::Component;

use super::Runtime;
use super::bindings::TaskPluginPre;
use super::manifest::{EffectiveLimits, Grants, Manifest};
use super::sandbox::JobCtx;

/// Why a plugin was refused. Each names the file and the reason in one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a WebAssembly file")]
    NotWasm { path: PathBuf },
    #[error("{path}: a core WebAssembly module, not a component (build for wasm32-wasip2)")]
    NotComponent { path: PathBuf },
    #[error("{path}: does not compile: {reason}")]
    Compile { path: PathBuf, reason: String },
    #[error("{path}: does not fit the celer:plugin task-plugin world: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Manifest { path: PathBuf, source: super::manifest::ManifestError },
    #[error("{path}: manifest names plugin {found:?}; the file must be named {found}.toml")]
    NameMismatch { path: PathBuf, found: String },
    #[error("{path}: {source}")]
    Grants { path: PathBuf, source: crate::capabilities::GrantError },
    #[error("{path}: describe() failed: {reason}")]
    Describe { path: PathBuf, reason: String },
    #[error("{path}: describe() lists tasks {plugin:?} but the manifest grants {manifest:?}")]
    TaskMismatch { path: PathBuf, plugin: Vec<String>, manifest: Vec<String> },
    #[error("{path}: task {task} is already served by plugin {other}")]
    TaskConflict { path: PathBuf, task: String, other: String },
}

/// A validated, compiled plugin version. Jobs hold an `Arc` to the version
/// they started on, so a reload never disturbs a running job.
pub struct LoadedPlugin {
    pub name: String,
    /// From `describe()`.
    pub version: String,
    pub tasks: Vec<String>,
    /// alias → task, from the manifest.
    pub aliases: BTreeMap<String, String>,
    /// SHA-256 of the `.wasm` file.
    pub digest: String,
    pub manifest: Manifest,
    pub grants: Arc<Grants>,
    pub limits: EffectiveLimits,
    pub config_json: String,
    pub wasm_path: PathBuf,
    /// `limits.concurrency` slots of this version.
    pub slots: Arc<Semaphore>,
    /// What the files looked like when loaded, to skip unchanged files cheaply.
    pub(crate) fingerprint: Fingerprint,
    pub(crate) pre: TaskPluginPre<JobCtx>,
}

impl LoadedPlugin {
    /// The task name a job's `task` (possibly an alias) stands for.
    pub fn canonical_task<'a>(&'a self, task: &'a str) -> &'a str {
        self.aliases.get(task).map(String::as_str).unwrap_or(task)
    }
}

/// Size and modification time of the wasm and manifest files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    wasm: (u64, Option<SystemTime>),
    manifest: (u64, Option<SystemTime>),
}

impl Fingerprint {
    pub(crate) fn of(wasm: &Path, manifest: &Path) -> Option<Fingerprint> {
        let stat = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().ok()));
        Some(Fingerprint { wasm: stat(wasm)?, manifest: stat(manifest)? })
    }
}

/// The component-model binary header: `\0asm`, then the layer field that
/// tells a component (0x0d 0x00 0x01 0x00) from a core module.
fn check_header(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm { path: path.to_path_buf() });
    }
    if bytes[6..8] != [0x01, 0x00] {
        return Err(LoadError::NotComponent { path: path.to_path_buf() });
    }
    Ok(())
}

impl Runtime {
    /// Loads and validates one plugin. `others` are the plugins already
    /// loaded under other names, to refuse a task claimed twice.
    pub async fn load_plugin(&self, wasm_path: &Path, manifest_path: &Path, others: &[Arc<LoadedPlugin>]) -> Result<LoadedPlugin, LoadError> {
        let fingerprint = Fingerprint::of(wasm_path, manifest_path);
        let manifest_err = |source| LoadError::Manifest { path: manifest_path.to_path_buf(), source };
        let manifest = Manifest::load(manifest_path).map_err(manifest_err)?;
        self.capabilities
            .prepare(&manifest)
            .await
            .map_err(|source| LoadError::Grants { path: manifest_path.to_path_buf(), source })?;
        let limits = manifest
            .effective_limits(&self.sandbox, usize::MAX)
            .map_err(manifest_err)?;
        for other in others {
            if let Some(task) = manifest.plugin.tasks.iter().chain(manifest.plugin.aliases.keys()).find(|t| other.tasks.contains(t) || other.aliases.contains_key(*t)) {
                return Err(LoadError::TaskConflict { path: manifest_path.to_path_buf(), task: task.clone(), other: other.name.clone() });
            }
        }

        let bytes = tokio::fs::read(wasm_path)
            .await
            .map_err(|source| LoadError::Read { path: wasm_path.to_path_buf(), source })?;
        check_header(wasm_path, &bytes)?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let component = self.compile_cached(wasm_path, bytes, &digest).await?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(TaskPluginPre::new)
            .map_err(|e| LoadError::Link { path: wasm_path.to_path_buf(), reason: format!("{e:#}") })?;

        let mut plugin = LoadedPlugin {
            name: manifest.plugin.name.clone(),
            version: String::new(),
            tasks: manifest.plugin.tasks.clone(),
            aliases: manifest.plugin.aliases.clone(),
            digest,
            grants: Arc::new(manifest.grants.clone()),
            config_json: manifest.config_json(),
            slots: Arc::new(Semaphore::new(limits.concurrency.min(Semaphore::MAX_PERMITS))),
            limits,
            manifest,
            wasm_path: wasm_path.to_path_buf(),
            fingerprint: fingerprint.unwrap_or(Fingerprint { wasm: (0, None), manifest: (0, None) }),
            pre,
        };
        let info = self
            .describe(&plugin)
            .await
            .map_err(|reason| LoadError::Describe { path: wasm_path.to_path_buf(), reason })?;
        let mut described = info.tasks.clone();
        let mut granted = plugin.tasks.clone();
        described.sort();
        granted.sort();
        if described != granted {
            return Err(LoadError::TaskMismatch { path: wasm_path.to_path_buf(), plugin: described, manifest: granted });
        }
        plugin.version = info.version;
        Ok(plugin)
    }

    /// Compiles a component, or loads the code compiled for the same digest
    /// and engine on an earlier run. Compilation is CPU-bound: it runs off
    /// the async threads.
    async fn compile_cached(&self, wasm_path: &Path, bytes: Vec<u8>, digest: &str) -> Result<Component, LoadError> {
        let cached = self.cache_dir.join(format!("{digest}-{}.cwasm", self.engine_hash));
        let engine = self.engine.clone();
        let path = wasm_path.to_path_buf();
        let cache_dir = self.cache_dir.clone();
        let compile = move || -> Result<Component, LoadError> {
            if cached.exists() {
                // SAFETY: the file was written by this code path (serialize of
                // a component compiled by an engine with the same
                // compatibility hash) into the host's private cache directory.
                match unsafe { Component::deserialize_file(&engine, &cached) } {
                    Ok(c) => return Ok(c),
                    Err(e) => tracing::warn!(file = %cached.display(), error = %format!("{e:#}"), "compiled-code cache entry unusable; recompiling"),
                }
            }
            let component = Component::new(&engine, &bytes)
                .map_err(|e| LoadError::Compile { path: path.clone(), reason: format!("{e:#}") })?;
            if let Err(e) = write_cache(&cache_dir, &cached, &component) {
                tracing::warn!(dir = %cache_dir.display(), error = %e, "cannot write the compiled-code cache; the next start will recompile");
            }
            Ok(component)
        };
        tokio::task::spawn_blocking(compile)
            .await
            .map_err(|e| LoadError::Compile { path: wasm_path.to_path_buf(), reason: format!("compiler task failed: {e}") })?
    }
}

/// Write-then-rename, so a crash never leaves a truncated cache entry.
fn write_cache(dir: &Path, target: &Path, component: &Component) -> Result<(), String> {
    let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let tmp = target.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, target).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tells_components_from_modules_and_junk() {
        let p = Path::new("x.wasm");
        assert!(check_header(p, b"\0asm\x0d\x00\x01\x00rest").is_ok());
        assert!(matches!(check_header(p, b"\0asm\x01\x00\x00\x00"), Err(LoadError::NotComponent { .. })));
        assert!(matches!(check_header(p, b"PK\x03\x04...."), Err(LoadError::NotWasm { .. })));
        assert!(matches!(check_header(p, b"\0as"), Err(LoadError::NotWasm { .. })));
    }
}
