//! # celer-plugin: write celer task plugins in plain Rust
//!
//! A celer plugin is a WebAssembly component (`wasm32-wasip2`) that the celer
//! host loads from its plugins directory and runs once per job, each job in a
//! fresh sandbox that reaches only what the plugin's manifest grants. This
//! crate holds the guest bindings of the contract (`wit/plugin.wit`) and the
//! API an author uses instead of them, so that a plugin is a handful of
//! ordinary functions.
//!
//! ## A task is a function
//!
//! ```no_run
//! use celer_plugin::{Context, TaskError};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Greet {
//!     name: String,
//!     excited: Option<bool>,
//! }
//!
//! #[derive(Serialize)]
//! struct Greeting {
//!     message: String,
//! }
//!
//! fn greet(ctx: &Context, args: Greet) -> Result<Greeting, TaskError> {
//!     ctx.info(format!("greeting {}", args.name));
//!     let bang = if args.excited == Some(true) { "!!!" } else { "!" };
//!     Ok(Greeting { message: format!("Hello, {}{bang}", args.name) })
//! }
//!
//! fn noop(_: &Context, (): ()) -> Result<(), TaskError> {
//!     Ok(())
//! }
//!
//! celer_plugin::plugin! {
//!     name: "hello",
//!     version: env!("CARGO_PKG_VERSION"),
//!     tasks: {
//!         "hello.greet" => greet,
//!         "hello.noop" => noop,
//!     }
//! }
//! # fn main() {}
//! ```
//!
//! * The argument type is any `serde::de::DeserializeOwned`. The job's
//!   Celery-style `args` (array) and `kwargs` (object) are mapped onto it by
//!   [`args::decode`]: positional arguments fill a struct's fields in
//!   declaration order, keyword arguments fill them by name, and both can be
//!   mixed (`greet.delay("Ann", excited=True)`). Arguments that do not fit
//!   fail the job with a message starting `invalid arguments:`.
//! * The result is any `serde::Serialize`; the host stores it as JSON.
//! * [`TaskError::fail`] fails the job for good; [`TaskError::retry`] and
//!   [`TaskError::retry_after`] ask for another attempt. `?` on a capability
//!   call converts a [`HostError`] (unavailable → retry, anything else → fail).
//! * A panic, an out-of-memory or a timeout ends the job as a trap; the host
//!   records it and the sandbox is thrown away. No cleanup is needed.
//! * [`plugin!`] names the plugin and maps task names to functions; it
//!   implements the component's exports. The task list must equal the
//!   manifest's `tasks`, or the host refuses to load the plugin.
//!
//! ## What a task can reach
//!
//! * Through the [`Context`]: the job's id, attempt and queue, the manifest's
//!   `[config]` ([`Context::config`]), logging ([`Context::info`] …), progress
//!   ([`Context::progress`]) and follow-up jobs ([`Context::enqueue`]).
//! * [`database`], [`cache`], [`storage`] and [`mail`]: the host's services,
//!   each call checked against the manifest's `[grants]`; a call outside them
//!   returns [`HostError::Denied`].
//! * `println!`/`eprintln!` go to the job's captured output. There is no
//!   filesystem, network or environment: ask the host through a capability.
//!
//! ## Building
//!
//! A plugin crate is a `cdylib` depending on this crate and `serde`; build it
//! with `cargo build --release --target wasm32-wasip2` and install
//! `target/wasm32-wasip2/release/<name>.wasm` with its manifest (see
//! `plugins/README.md`). On a native target the crate also compiles, so
//! argument types and pure task logic can be unit-tested with `cargo test`
//! ([`Context::for_tests`]); host calls panic there.

#![warn(missing_docs)]

#[doc(hidden)]
#[allow(missing_docs)]
pub mod bindings;

pub mod args;
pub mod cache;
pub mod database;
pub mod mail;
pub mod storage;
pub mod time;

mod context;
mod error;
mod introspect;
mod macros;

#[doc(hidden)]
pub mod __private {
    //! Used by [`plugin!`](crate::plugin) expansions; not a stable API.
    pub use crate::runtime::*;
}
mod runtime;

pub use bindings::celer::plugin::log::Level;
pub use bindings::celer::plugin::types::HostError;
pub use context::{Context, EnqueueOptions};
pub use error::TaskError;
