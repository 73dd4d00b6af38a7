//! The one macro an author writes: the table from task names to functions.

/// Declares the plugin: its name, its version and which function runs which
/// task; implements the component's `describe` and `run` exports.
///
/// Exists so that a plugin never touches the generated bindings: `describe`
/// returns exactly the listed task names (the host checks them against the
/// manifest), and `run` decodes each job's arguments into the function's
/// argument type, calls it, and encodes its result as JSON. A job for a task
/// not in the table fails with `unknown task …`.
///
/// Each function has the form `fn(&Context, A) -> Result<R, TaskError>` with
/// `A: DeserializeOwned` and `R: Serialize`. Use the macro once per crate, at
/// the crate root or in any module.
///
/// ```no_run
/// # use celer_plugin::{Context, TaskError};
/// # fn greet(_: &Context, _: ()) -> Result<(), TaskError> { Ok(()) }
/// # fn fail(_: &Context, _: ()) -> Result<(), TaskError> { Ok(()) }
/// celer_plugin::plugin! {
///     name: "hello",
///     version: env!("CARGO_PKG_VERSION"),
///     tasks: {
///         "hello.greet" => greet,
///         "hello.fail" => fail,
///     }
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! plugin {
    (
        name: $name:expr,
        version: $version:expr,
        tasks: { $($task:literal => $function:expr),+ $(,)? } $(,)?
    ) => {
        #[doc(hidden)]
        pub struct __CelerPlugin;

        impl $crate::__private::Guest for __CelerPlugin {
            fn describe() -> $crate::__private::PluginInfo {
                $crate::__private::plugin_info($name, $version, &[$($task),+])
            }

            fn run(
                job: $crate::__private::Job,
            ) -> ::core::result::Result<::std::string::String, $crate::__private::WitTaskError> {
                $crate::__private::run_job(job, &[$($task),+], |ctx, task, args, kwargs| {
                    match task {
                        $($task => ::core::option::Option::Some(
                            $crate::__private::invoke(ctx, args, kwargs, $function),
                        ),)+
                        _ => ::core::option::Option::None,
                    }
                })
            }
        }

        $crate::bindings::__export_task_plugin!(__CelerPlugin with_types_in $crate::bindings);
    };
}
