//! The guest bindings generated from `wit/plugin.wit`, the one contract
//! between the host and a plugin.
//!
//! They are generated here, once, so that a plugin crate never runs
//! `wit_bindgen::generate!` itself: a plugin built with this SDK is, by
//! construction, built against the contract version the SDK was built for.
//! Authors use the friendlier modules at the crate root; this module is public
//! only because [`plugin!`](crate::plugin) must reach the generated export
//! machinery from the plugin's crate.

wit_bindgen::generate!({
    world: "task-plugin",
    path: "../../wit",
    // `plugin!` expands in the plugin's crate and must call the export macro
    // from there, so it has to be `#[macro_export]`ed...
    pub_export_macro: true,
    // ...under a name that does not suggest authors call it themselves...
    export_macro_name: "__export_task_plugin",
    // ...and, used without `with_types_in`, it still finds these bindings.
    default_bindings_module: "celer_plugin::bindings",
    // Lets tests (and authors) compare values and errors with `==`.
    additional_derives: [PartialEq],
});
