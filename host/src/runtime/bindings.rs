//! Host-side bindings generated from `wit/plugin.wit`, the public contract.
//! Generated once here so that every capability module implements the
//! trait of its own interface and nothing else.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "task-plugin",
    imports: { default: async },
    exports: { default: async },
    with: {
        "celer:plugin/database.cursor": crate::capabilities::database::Cursor,
        "celer:plugin/storage.writer": crate::capabilities::storage::Writer,
    },
});

pub use celer::plugin::types::{HostError, Job as WitJob};
