//! The manifest (`<name>.toml` beside `<name>.wasm`): what the operator
//! allows a plugin to do. The plugin proposes (its `describe()`), the
//! manifest disposes: limits and grants come only from here.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::SandboxConfig;

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest: {0}")]
    Read(#[from] std::io::Error),
    #[error("invalid manifest: {0}")]
    Parse(String),
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

/// The parsed manifest.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub plugin: PluginSection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub grants: Grants,
    /// Free-form settings handed to the plugin as `job.config`.
    #[serde(default)]
    pub config: toml::Table,
    /// Default schedules, created at first start when absent:
    /// `[schedules.<name>] task = "…", cron = "0 3 * * *"` (or `every = "5m"`).
    #[serde(default)]
    pub schedules: BTreeMap<String, ManifestSchedule>,
}

/// A default schedule in a manifest.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestSchedule {
    pub task: String,
    /// A crontab expression (5 fields, or 6 with seconds).
    pub cron: Option<String>,
    /// IANA time zone of `cron`; UTC by default.
    pub timezone: Option<String>,
    /// An interval such as `5m` or `1h` instead of `cron`.
    pub every: Option<String>,
    #[serde(default)]
    pub args: Option<serde_json::Value>,
    #[serde(default)]
    pub kwargs: Option<serde_json::Value>,
    pub queue: Option<String>,
    pub description: Option<String>,
}

impl ManifestSchedule {
    /// The stored schedule this declares, for plugin `plugin`.
    pub fn to_schedule(&self, name: &str, plugin: &str) -> Result<crate::scheduler::schedule::Schedule, String> {
        use crate::scheduler::schedule::{Schedule, Timing, validate};
        let timing = match (&self.cron, &self.every) {
            (Some(expr), None) => Timing::Crontab { expr: expr.clone(), timezone: self.timezone.clone().unwrap_or_else(|| "UTC".into()) },
            (None, Some(every)) => Timing::Interval {
                every_s: humantime::parse_duration(every).map_err(|e| format!("every = {every:?}: {e}"))?.as_secs(),
            },
            _ => return Err("give exactly one of `cron` and `every`".into()),
        };
        validate(&timing).map_err(|e| e.to_string())?;
        Ok(Schedule {
            name: name.to_string(),
            task: self.task.clone(),
            args: self.args.clone().unwrap_or_else(|| serde_json::json!([])),
            kwargs: self.kwargs.clone().unwrap_or_else(|| serde_json::json!({})),
            queue: self.queue.clone().unwrap_or_else(|| crate::job::DEFAULT_QUEUE.to_string()),
            timing,
            enabled: true,
            one_off: false,
            start_time: None,
            expires: None,
            last_run_at: None,
            total_run_count: 0,
            description: self.description.clone().unwrap_or_default(),
            source: format!("plugin:{plugin}"),
            created_at: chrono::Utc::now(),
        })
    }
}

/// `[plugin]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    pub name: String,
    pub tasks: Vec<String>,
    /// Other names producers use for the same tasks (e.g. Celery task
    /// paths): alias → task.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
}

/// `[limits]`; absent values come from `[sandbox]` in celer.toml.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub memory_mb: Option<u64>,
    pub timeout_s: Option<u64>,
    /// Jobs of this plugin running at once on one host.
    pub concurrency: Option<usize>,
}

/// `[grants]`: everything a plugin may reach. Empty means nothing.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    #[serde(default)]
    pub database: DatabaseGrants,
    /// Cache key prefixes.
    #[serde(default)]
    pub cache: Vec<String>,
    /// Storage key prefixes.
    #[serde(default)]
    pub storage: Vec<String>,
    #[serde(default)]
    pub mail: MailGrant,
    /// Task names this plugin may enqueue.
    #[serde(default)]
    pub enqueue: Vec<String>,
}

/// `database.read` / `database.write`: table names.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DatabaseGrants {
    #[serde(default)]
    pub read: Vec<String>,
    #[serde(default)]
    pub write: Vec<String>,
}

/// `mail = true`, or `mail = { senders = ["noreply@example.com"] }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(untagged)]
pub enum MailGrant {
    #[default]
    #[serde(skip)]
    None,
    Allowed(bool),
    Senders {
        senders: Vec<String>,
    },
}

/// Written back as the manifest would say it (`false` when absent), for
/// `celer plugins`.
impl Serialize for MailGrant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MailGrant::None => s.serialize_bool(false),
            MailGrant::Allowed(b) => s.serialize_bool(*b),
            MailGrant::Senders { senders } => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("senders", senders)?;
                m.end()
            }
        }
    }
}

impl MailGrant {
    /// Whether the plugin may send mail at all.
    pub fn allowed(&self) -> bool {
        match self {
            MailGrant::None => false,
            MailGrant::Allowed(b) => *b,
            MailGrant::Senders { .. } => true,
        }
    }
}

/// Limits with defaults applied: what the sandbox enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EffectiveLimits {
    pub memory_bytes: usize,
    pub timeout_ms: u64,
    pub concurrency: usize,
}

impl Manifest {
    /// Reads and checks a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        Self::parse(&std::fs::read_to_string(path)?)
    }

    /// Parses and checks manifest text.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(|e| ManifestError::Parse(e.message().to_string()))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), ManifestError> {
        let name = &self.plugin.name;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(ManifestError::Invalid(format!(
                "plugin.name {name:?} must be non-empty ASCII letters, digits, '-' or '_'"
            )));
        }
        if self.plugin.tasks.is_empty() {
            return Err(ManifestError::Invalid("plugin.tasks is empty".into()));
        }
        for task in &self.plugin.tasks {
            if task.trim().is_empty() || task.chars().any(char::is_whitespace) {
                return Err(ManifestError::Invalid(format!("task name {task:?} is empty or has spaces")));
            }
        }
        for (alias, task) in &self.plugin.aliases {
            if !self.plugin.tasks.contains(task) {
                return Err(ManifestError::Invalid(format!(
                    "alias {alias:?} points to {task:?}, which is not in plugin.tasks"
                )));
            }
        }
        for (name, s) in &self.schedules {
            if !self.plugin.tasks.contains(&s.task) && !self.grants.enqueue.contains(&s.task) {
                return Err(ManifestError::Invalid(format!(
                    "schedule {name:?} runs {:?}, which is neither in plugin.tasks nor in grants.enqueue", s.task
                )));
            }
            s.to_schedule(name, &self.plugin.name).map_err(|e| ManifestError::Invalid(format!("schedule {name:?}: {e}")))?;
        }
        if self.limits.memory_mb == Some(0) || self.limits.timeout_s == Some(0) || self.limits.concurrency == Some(0) {
            return Err(ManifestError::Invalid("limits must be positive".into()));
        }
        Ok(())
    }

    /// Limits with the host's defaults filled in; refused when the manifest
    /// asks for more memory than the host's sandbox allows.
    pub fn effective_limits(&self, sandbox: &SandboxConfig, worker_concurrency: usize) -> Result<EffectiveLimits, ManifestError> {
        let memory_mb = self.limits.memory_mb.unwrap_or(sandbox.default_memory_mb);
        if memory_mb > sandbox.max_memory_mb {
            return Err(ManifestError::Invalid(format!(
                "limits.memory_mb = {memory_mb} exceeds the host's sandbox.max_memory_mb = {}",
                sandbox.max_memory_mb
            )));
        }
        Ok(EffectiveLimits {
            memory_bytes: usize::try_from(memory_mb << 20).unwrap_or(usize::MAX),
            timeout_ms: self.limits.timeout_s.unwrap_or(sandbox.default_timeout_s).saturating_mul(1000),
            concurrency: self.limits.concurrency.unwrap_or(worker_concurrency).min(worker_concurrency),
        })
    }

    /// `[config]` as JSON, handed to the plugin with every job.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPORT: &str = r#"
[plugin]
name = "export"
tasks = ["export.organization"]
aliases = { "apps.export.tasks.export_org" = "export.organization" }
[limits]
memory_mb = 64
timeout_s = 600
concurrency = 2
[grants]
database.read  = ["users", "organizations"]
database.write = ["data_exports"]
cache   = ["is_member_"]
storage = ["exports/"]
mail    = true
enqueue = ["email.export_ready"]
[config]
link_ttl_days = 7
"#;

    #[test]
    fn parses_the_design_example() {
        let m = Manifest::parse(EXPORT).expect("design manifest parses");
        assert_eq!(m.plugin.name, "export");
        assert_eq!(m.grants.database.read, vec!["users", "organizations"]);
        assert!(m.grants.mail.allowed());
        assert_eq!(m.config_json(), r#"{"link_ttl_days":7}"#);
        let l = m.effective_limits(&SandboxConfig::default(), 16).expect("within host limits");
        assert_eq!(l, EffectiveLimits { memory_bytes: 64 << 20, timeout_ms: 600_000, concurrency: 2 });
    }

    #[test]
    fn mail_senders_form() {
        let m = Manifest::parse("[plugin]\nname='m'\ntasks=['m.x']\n[grants]\nmail = { senders = ['a@b.c'] }\n").expect("ok");
        assert!(m.grants.mail.allowed());
        let m = Manifest::parse("[plugin]\nname='m'\ntasks=['m.x']\n").expect("ok");
        assert!(!m.grants.mail.allowed());
        assert_eq!(serde_json::to_value(&m.grants.mail).expect("serializes"), serde_json::json!(false));
    }

    #[test]
    fn refuses_what_cannot_be_meant() {
        for (text, needle) in [
            ("[plugin]\nname='x'\ntasks=[]\n", "tasks is empty"),
            ("[plugin]\nname='a b'\ntasks=['t']\n", "plugin.name"),
            ("[plugin]\nname='x'\ntasks=['t']\naliases={a='u'}\n", "not in plugin.tasks"),
            ("[plugin]\nname='x'\ntasks=['t']\n[grants]\nsockets=true\n", "sockets"),
            ("[plugin]\nname='x'\ntasks=['t']\n[limits]\nmemory_mb=0\n", "positive"),
        ] {
            let err = Manifest::parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn default_schedules_are_checked_at_load() {
        let ok = "[plugin]\nname='e'\ntasks=['e.t']\n[schedules.nightly]\ntask='e.t'\ncron='0 3 * * *'\ntimezone='Europe/London'\n";
        let m = Manifest::parse(ok).expect("valid schedule");
        assert_eq!(m.schedules["nightly"].to_schedule("nightly", "e").expect("ok").source, "plugin:e");
        for (text, needle) in [
            ("[plugin]\nname='e'\ntasks=['e.t']\n[schedules.x]\ntask='e.t'\ncron='0 3 * *'\n", "expected 5 fields"),
            ("[plugin]\nname='e'\ntasks=['e.t']\n[schedules.x]\ntask='other.t'\nevery='5m'\n", "neither in plugin.tasks"),
            ("[plugin]\nname='e'\ntasks=['e.t']\n[schedules.x]\ntask='e.t'\n", "exactly one of"),
            ("[plugin]\nname='e'\ntasks=['e.t']\n[schedules.x]\ntask='e.t'\ncron='* * * * *'\ntimezone='Nowhere/Land'\n", "unknown time zone"),
        ] {
            let e = Manifest::parse(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn memory_above_the_host_cap_is_refused() {
        let m = Manifest::parse("[plugin]\nname='x'\ntasks=['t']\n[limits]\nmemory_mb=4096\n").expect("parses");
        let err = m.effective_limits(&SandboxConfig::default(), 4).expect_err("too big");
        assert!(err.to_string().contains("max_memory_mb"), "{err}");
    }
}
