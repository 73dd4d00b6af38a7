//! Which plugin serves which task, right now. The plugins directory is the
//! source of truth: `<dir>/<name>.wasm` beside `<dir>/<name>.toml`.
//! [`Registry::sync`] brings one name in line with the disk — load a new or
//! changed plugin, keep the previous version when the new one is refused,
//! unload a deleted one — and swaps the lookup table atomically.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::Runtime;
use crate::broker::PluginRoom;
use super::plugin::{Fingerprint, LoadedPlugin};

/// An immutable view of the loaded plugins; replaced whole on every change.
#[derive(Default)]
struct Snapshot {
    by_name: BTreeMap<String, Arc<LoadedPlugin>>,
    /// Task names and aliases.
    by_task: HashMap<String, Arc<LoadedPlugin>>,
}

impl Snapshot {
    fn with(&self, name: &str, plugin: Option<Arc<LoadedPlugin>>) -> Snapshot {
        let mut by_name = self.by_name.clone();
        match plugin {
            Some(p) => by_name.insert(name.to_string(), p),
            None => by_name.remove(name),
        };
        let mut by_task = HashMap::new();
        for p in by_name.values() {
            for t in p.tasks.iter().chain(p.aliases.keys()) {
                by_task.insert(t.clone(), p.clone());
            }
        }
        Snapshot { by_name, by_task }
    }
}

/// The live set of plugins.
pub struct Registry {
    runtime: Arc<Runtime>,
    dir: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    /// Serialises loads so two events for one file never race.
    loading: tokio::sync::Mutex<()>,
}

/// What [`Registry::sync`] did; for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    Loaded,
    Unchanged,
    Unloaded,
    /// The files are not there (or only one of the two).
    Absent,
    /// Refused; the previous version (if any) keeps serving.
    Refused(String),
}

impl Registry {
    pub fn new(runtime: Arc<Runtime>, dir: PathBuf) -> Self {
        Registry { runtime, dir, current: RwLock::new(Arc::default()), loading: tokio::sync::Mutex::new(()) }
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, next: Snapshot) {
        match self.current.write() {
            Ok(mut s) => *s = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
    }

    /// The plugin version serving `task` (a task name or an alias).
    pub fn lookup(&self, task: &str) -> Option<Arc<LoadedPlugin>> {
        self.snapshot().by_task.get(task).cloned()
    }

    /// The loaded plugin called `name`.
    pub fn lookup_plugin(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.snapshot().by_name.get(name).cloned()
    }

    /// Every loaded plugin, by name.
    pub fn plugins(&self) -> Vec<Arc<LoadedPlugin>> {
        self.snapshot().by_name.values().cloned().collect()
    }

    /// What a fetch of up to `max` jobs may take of each plugin now: the
    /// tasks (and aliases) of full plugins, whose jobs are left to another
    /// host, and the room of plugins with fewer free slots than `max`.
    pub fn room(&self, max: usize) -> (Vec<String>, Vec<PluginRoom>) {
        let mut full = Vec::new();
        let mut limited: Vec<(String, PluginRoom)> = Vec::new();
        for (task, plugin) in &self.snapshot().by_task {
            match plugin.slots.available_permits() {
                0 => full.push(task.clone()),
                free if free < max => match limited.iter_mut().find(|(name, _)| *name == plugin.name) {
                    Some((_, room)) => room.tasks.push(task.clone()),
                    None => limited.push((plugin.name.clone(), PluginRoom { tasks: vec![task.clone()], free })),
                },
                _ => {}
            }
        }
        (full, limited.into_iter().map(|(_, room)| room).collect())
    }

    /// Brings every plugin in line with the directory.
    pub async fn scan(&self) {
        let mut names: BTreeSet<String> = self.snapshot().by_name.keys().cloned().collect();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => names.extend(entries.flatten().filter_map(|e| plugin_name(&e.path()))),
            Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the plugins directory"),
        }
        for name in names {
            self.sync(&name).await;
        }
    }

    /// Brings the plugin `name` in line with its files.
    pub async fn sync(&self, name: &str) -> SyncOutcome {
        let _guard = self.loading.lock().await;
        let wasm = self.dir.join(format!("{name}.wasm"));
        let manifest = self.dir.join(format!("{name}.toml"));
        let current = self.snapshot();
        let loaded = current.by_name.get(name).cloned();

        if !wasm.exists() {
            if loaded.is_some() {
                self.replace(current.with(name, None));
                tracing::info!(plugin = name, "plugin unloaded: {} was removed", wasm.display());
                return SyncOutcome::Unloaded;
            }
            return SyncOutcome::Absent;
        }
        if !manifest.exists() {
            let reason = format!("{}: no manifest {} beside it", wasm.display(), manifest.display());
            tracing::error!(plugin = name, file = %wasm.display(), "plugin refused: {reason}");
            return SyncOutcome::Refused(reason);
        }
        if let Some(p) = &loaded {
            if Fingerprint::of(&wasm, &manifest).as_ref() == Some(&p.fingerprint) {
                return SyncOutcome::Unchanged;
            }
        }
        let others: Vec<Arc<LoadedPlugin>> = current.by_name.iter().filter(|(n, _)| n.as_str() != name).map(|(_, p)| p.clone()).collect();
        let loaded_result = match super::manifest::Manifest::load(&manifest) {
            Ok(m) if m.plugin.name != name => Err(super::plugin::LoadError::NameMismatch { path: manifest.clone(), found: m.plugin.name }),
            _ => self.runtime.load_plugin(&wasm, &manifest, &others).await,
        };
        match loaded_result {
            Ok(p) => {
                if loaded.as_ref().is_some_and(|old| old.digest == p.digest && old.manifest == p.manifest) {
                    // Touched but identical: keep the running version (and its slots).
                    return SyncOutcome::Unchanged;
                }
                tracing::info!(
                    plugin = name, version = %p.version, digest = %&p.digest[..12], tasks = ?p.tasks,
                    "plugin loaded from {}", wasm.display()
                );
                self.replace(self.snapshot().with(name, Some(Arc::new(p))));
                SyncOutcome::Loaded
            }
            Err(e) => {
                let keeps = match &loaded {
                    Some(old) => format!("; version {} keeps serving", old.version),
                    None => String::new(),
                };
                tracing::error!(plugin = name, file = %wasm.display(), "plugin refused: {e}{keeps}");
                SyncOutcome::Refused(e.to_string())
            }
        }
    }
}

/// The plugin a file in the directory belongs to: `x.wasm` and `x.toml`
/// belong to `x`. Dot-files (write-then-rename temporaries) and anything
/// else are ignored.
pub fn plugin_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    if file.starts_with('.') {
        return None;
    }
    let (stem, ext) = file.rsplit_once('.')?;
    (matches!(ext, "wasm" | "toml") && !stem.is_empty()).then(|| stem.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_map_to_plugin_names() {
        assert_eq!(plugin_name(Path::new("/p/hello.wasm")).as_deref(), Some("hello"));
        assert_eq!(plugin_name(Path::new("/p/hello.toml")).as_deref(), Some("hello"));
        assert_eq!(plugin_name(Path::new("/p/.hello.wasm.tmp")), None);
        assert_eq!(plugin_name(Path::new("/p/.hello.wasm")), None);
        assert_eq!(plugin_name(Path::new("/p/hello.wasm.part")), None);
        assert_eq!(plugin_name(Path::new("/p/README.md")), None);
    }
}
