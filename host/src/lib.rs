//! celer runs background jobs as sandboxed WebAssembly components.
//!
//! The data path, in the order a job travels it:
//! producer → [`broker`] (queue, leases, retries, results) → [`worker`]
//! (concurrency, lease renewal, shutdown) → [`runtime`] (plugin registry,
//! fresh sandbox per job) → the plugin, which reaches the outside world only
//! through [`capabilities`], each checked against the plugin's grants.

pub mod api;
pub mod broker;
pub mod celery;
pub mod capabilities;
pub mod config;
pub mod job;
pub mod runtime;
pub mod scheduler;
pub mod worker;
