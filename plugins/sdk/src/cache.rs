//! The shared cache, limited to the key prefixes in `grants.cache`.
//!
//! The WIT `cache` interface as generated ([`get`], [`set`], [`delete`],
//! [`incr`]); values are bytes, time-to-live in milliseconds. Re-exported under
//! a stable path so that plugins never name the generated module tree.

pub use crate::bindings::celer::plugin::cache::*;
