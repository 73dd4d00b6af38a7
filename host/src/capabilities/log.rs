//! `celer:plugin/log`: a plugin's log lines go to the host's structured log
//! (tagged with job id, task, plugin and attempt) and to the job's own
//! captured log; progress goes to the job's status. Always granted.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::JobInfo;
use crate::job::Progress;
use crate::runtime::bindings::celer::plugin::log::{Host, Level};

/// The job's captured log: `log` calls and guest stdout/stderr, capped so a
/// chatty or hostile plugin cannot fill the host's memory or the result store.
#[derive(Clone, Debug)]
pub struct JobLog {
    inner: Arc<Mutex<LogBuf>>,
}

#[derive(Debug)]
struct LogBuf {
    text: String,
    cap: usize,
    dropped: u64,
}

impl JobLog {
    pub fn new(cap: usize) -> Self {
        JobLog { inner: Arc::new(Mutex::new(LogBuf { text: String::new(), cap, dropped: 0 })) }
    }

    /// Appends as much of `bytes` as the cap allows; counts the rest.
    pub fn append(&self, bytes: &[u8]) {
        let Ok(mut buf) = self.inner.lock() else { return };
        let room = buf.cap.saturating_sub(buf.text.len());
        let take = bytes.len().min(room);
        let text = String::from_utf8_lossy(&bytes[..take]).into_owned();
        buf.text.push_str(&text);
        buf.dropped += (bytes.len() - take) as u64;
    }

    /// The captured text, with a last line saying how much was dropped.
    pub fn contents(&self) -> Option<String> {
        let buf = self.inner.lock().ok()?;
        if buf.text.is_empty() && buf.dropped == 0 {
            return None;
        }
        let mut text = buf.text.clone();
        if buf.dropped > 0 {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("[celer: {} more bytes of output dropped]\n", buf.dropped));
        }
        Some(text)
    }

    /// The message of the last Rust panic the guest printed to stderr
    /// ("panicked at src/lib.rs:3:5: boom"), so that a failed job says why.
    pub fn panic_message(&self) -> Option<String> {
        let buf = self.inner.lock().ok()?;
        let lines: Vec<&str> = buf.text.lines().collect();
        let at = lines.iter().rposition(|l| l.contains("panicked at"))?;
        let place = lines[at].split("panicked at").nth(1).unwrap_or("").trim().trim_end_matches(':');
        let message = lines.get(at + 1).map(|l| l.trim()).unwrap_or("");
        Some(format!("panicked at {place}: {message}"))
    }
}

/// Per-job state of the log interface.
pub struct LogCap {
    info: Arc<JobInfo>,
    log: JobLog,
    progress: Arc<watch::Sender<Option<Progress>>>,
}

impl LogCap {
    /// `progress` is followed by the worker, which publishes it to the broker.
    pub fn new(info: Arc<JobInfo>, log: JobLog, progress: Arc<watch::Sender<Option<Progress>>>) -> Self {
        LogCap { info, log, progress }
    }
}

impl Host for LogCap {
    async fn log(&mut self, level: Level, message: String) {
        let i = &self.info;
        match level {
            Level::Trace => tracing::trace!(job_id = %i.job_id, task = %i.task, plugin = %i.plugin, attempt = i.attempt, "{message}"),
            Level::Debug => tracing::debug!(job_id = %i.job_id, task = %i.task, plugin = %i.plugin, attempt = i.attempt, "{message}"),
            Level::Info => tracing::info!(job_id = %i.job_id, task = %i.task, plugin = %i.plugin, attempt = i.attempt, "{message}"),
            Level::Warn => tracing::warn!(job_id = %i.job_id, task = %i.task, plugin = %i.plugin, attempt = i.attempt, "{message}"),
            Level::Error => tracing::error!(job_id = %i.job_id, task = %i.task, plugin = %i.plugin, attempt = i.attempt, "{message}"),
        }
        let tag = match level {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        };
        self.log.append(format!("{tag} {message}\n").as_bytes());
    }

    async fn progress(&mut self, done: u64, total: u64) {
        self.progress.send_replace(Some(Progress { done, total }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_capped_and_says_so() {
        let log = JobLog::new(10);
        log.append(b"0123456789abcdef");
        let text = log.contents().expect("has text");
        assert!(text.starts_with("0123456789\n"), "{text}");
        assert!(text.contains("6 more bytes"), "{text}");
    }

    #[test]
    fn finds_the_guest_panic_message() {
        let log = JobLog::new(1000);
        log.append(b"INFO starting\nthread '<unnamed>' panicked at src/lib.rs:3:5:\nboom\nnote: run with `RUST_BACKTRACE=1`\n");
        assert_eq!(log.panic_message().as_deref(), Some("panicked at src/lib.rs:3:5: boom"));
        assert_eq!(JobLog::new(10).panic_message(), None);
        assert_eq!(JobLog::new(10).contents(), None);
    }
}
