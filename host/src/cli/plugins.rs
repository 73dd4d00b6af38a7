//! `celer plugins` and `celer plugin check`: would the host load these
//! plugins, and if not, why. Uses the same loader as `celer serve` (and its
//! compiled-code cache), so the answer is the host's answer.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use serde_json::{Value, json};

use celer::capabilities::Capabilities;
use celer::config::Config;
use celer::runtime::Runtime;
use celer::runtime::plugin::LoadedPlugin;
use celer::runtime::registry::{Registry, SyncOutcome, plugin_name};

use super::{CliError, open_broker, print_json};

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Check that a plugin would load: exit 0 and its description, or exit 2 and why not.
    Check {
        wasm: PathBuf,
        /// Its manifest (default: the .wasm path with .toml, else celer-plugin.toml beside it).
        manifest: Option<PathBuf>,
    },
}

async fn runtime(config: &Config) -> Result<Arc<Runtime>, CliError> {
    let broker = open_broker(config).await?;
    let capabilities = Capabilities::connect(config, broker).await.map_err(|e| CliError::Failed(e.to_string()))?;
    Runtime::new(&config.sandbox, capabilities, config.cache_dir(), 4)
        .map(Arc::new)
        .map_err(|e| CliError::Failed(e.to_string()))
}

fn describe(p: &LoadedPlugin) -> Value {
    json!({
        "name": p.name,
        "version": p.version,
        "digest": p.digest,
        "file": p.wasm_path.display().to_string(),
        "tasks": p.tasks,
        "aliases": p.aliases,
        "grants": p.manifest.grants,
        "limits": p.limits,
    })
}

/// `celer plugins`: what the host would load, read from the files, without a running host.
pub async fn list(config: &Config, as_json: bool) -> Result<ExitCode, CliError> {
    let registry = Registry::new(runtime(config).await?, config.plugins.dir.clone());
    let mut names: Vec<String> = std::fs::read_dir(&config.plugins.dir)
        .map_err(|e| CliError::Usage(format!("cannot read the plugins directory {}: {e}", config.plugins.dir.display())))?
        .flatten()
        .filter_map(|e| plugin_name(&e.path()))
        .collect();
    names.sort();
    names.dedup();
    let mut rows = Vec::new();
    for name in names {
        let row = match registry.sync(&name).await {
            SyncOutcome::Refused(reason) => json!({"name": name, "status": "refused", "reason": reason}),
            _ => match registry.lookup_plugin(&name) {
                Some(p) => {
                    let mut d = describe(&p);
                    d["status"] = json!("ok");
                    d
                }
                None => json!({"name": name, "status": "refused", "reason": "no .wasm file beside the manifest"}),
            },
        };
        rows.push(row);
    }
    if as_json {
        print_json(&rows)?;
    } else {
        for r in &rows {
            let name = r["name"].as_str().unwrap_or("?");
            match r["status"].as_str() {
                Some("ok") => super::say(&format!(
                    "{name:<16} {:<10} {}  tasks: {}",
                    r["version"].as_str().unwrap_or(""),
                    &r["digest"].as_str().unwrap_or("")[..12.min(r["digest"].as_str().unwrap_or("").len())],
                    r["tasks"].as_array().map(|t| t.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default()
                )),
                _ => super::say(&format!("{name:<16} REFUSED    {}", r["reason"].as_str().unwrap_or(""))),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `celer plugin …`: the plugin author's tools (check a build, scaffold a crate).
pub async fn run(config: &Config, command: PluginCommand) -> Result<ExitCode, CliError> {
    match command {
        PluginCommand::Check { wasm, manifest } => {
            if !wasm.exists() {
                return Err(CliError::Usage(format!("{}: no such file", wasm.display())));
            }
            let manifest = manifest.unwrap_or_else(|| {
                let beside = wasm.with_extension("toml");
                if beside.exists() { beside } else { wasm.with_file_name("celer-plugin.toml") }
            });
            let runtime = runtime(config).await?;
            match runtime.load_plugin(&wasm, &manifest, &[]).await {
                Ok(p) => {
                    print_json(&describe(&p))?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(CliError::Usage(e.to_string())),
            }
        }
    }
}
