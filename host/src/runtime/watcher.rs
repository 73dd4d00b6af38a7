//! Hot reload: watches the plugins directory and hands each changed plugin
//! name to the [`Registry`] once its files have been quiet for the debounce
//! time. Editors and `cp` write a file in several steps; waiting for quiet
//! means a half-written file is not loaded. The reliable way to install is
//! write-then-rename (`cp x.wasm dir/.x.tmp && mv dir/.x.tmp dir/x.wasm`):
//! dot-files are ignored and a rename is atomic.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::registry::{Registry, plugin_name};

/// Why the directory cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch the plugins directory {dir}: {reason}")]
pub struct WatchError {
    pub dir: String,
    pub reason: String,
}

/// A running watch; dropping it stops watching.
pub struct PluginWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A full rescan at this interval catches anything the OS did not report
/// (network filesystems, overflowed event queues).
const RESCAN_EVERY: Duration = Duration::from_secs(30);

/// Starts watching `registry.dir()`.
pub fn watch(registry: Arc<Registry>, debounce: Duration) -> Result<PluginWatcher, WatchError> {
    let dir = registry.dir().to_path_buf();
    let err = |reason: String| WatchError { dir: dir.display().to_string(), reason };
    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            for name in event.paths.iter().filter_map(|p| plugin_name(p)) {
                let _ = tx.send(name);
            }
        }
        Err(e) => tracing::warn!(error = %e, "plugin directory watch error"),
    })
    .map_err(|e| err(e.to_string()))?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(|e| err(e.to_string()))?;

    let task = tokio::spawn(async move {
        let mut rescan = tokio::time::interval(RESCAN_EVERY);
        rescan.tick().await;
        loop {
            let mut pending = BTreeSet::new();
            tokio::select! {
                first = rx.recv() => match first {
                    Some(name) => { pending.insert(name); }
                    None => return,
                },
                _ = rescan.tick() => { registry.scan().await; continue; }
            }
            // Debounce: keep collecting until the directory is quiet.
            while let Ok(Some(name)) = tokio::time::timeout(debounce, rx.recv()).await {
                pending.insert(name);
            }
            for name in pending {
                registry.sync(&name).await;
            }
        }
    });
    Ok(PluginWatcher { _watcher: watcher, task })
}
