//! The `celer` binary: parses the command line, sets up logging, and maps
//! every failure to the documented exit code (1: the job failed or the host
//! could not do its work; 2: bad usage or bad input) with one clear line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Many small allocations per job on every worker thread: mimalloc's
/// per-thread free lists cost a fraction of glibc malloc's arena locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // The host logs its work; one-shot commands only speak up when something is wrong.
    init_logging(if args.is_serve() { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("celer: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("celer: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go to stderr: human-readable by default, JSON lines with
/// `CELER_LOG_FORMAT=json`; the level comes from `CELER_LOG` or `RUST_LOG`.
fn init_logging(default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("CELER_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(format!("{default_level},wasmtime=warn,cranelift=warn,sqlx=warn")));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal; files and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var("CELER_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
