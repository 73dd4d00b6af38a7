//! `hostile`: a test-only plugin whose tasks misbehave on purpose.
//!
//! The integration tests run each task and check that the host contains it:
//! a job that spins is interrupted at its deadline, one that eats memory hits
//! its limit, a panic or trap becomes a `trap` error, a capability call without
//! a grant is `denied`, a flood of output does not take the host down, and a
//! long job can be stopped from outside; `hostile.remember` tries to see
//! what an earlier job left in memory. `hostile.ok` proves that the plugin
//! itself loads and works. None of this belongs in a real plugin.

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use celer_plugin::{Context, TaskError, cache};
use serde::Deserialize;
use serde_json::{Value, json};

celer_plugin::plugin! {
    name: "hostile",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "hostile.loop" => spin,
        "hostile.alloc" => alloc,
        "hostile.panic" => panic,
        "hostile.trap" => trap,
        "hostile.denied" => denied,
        "hostile.sleep" => sleep,
        "hostile.print_flood" => print_flood,
        "hostile.ok" => ok,
        "hostile.remember" => remember,
        "hostile.sleep_then_retry" => sleep_then_retry,
    }
}

/// Spins forever; only the host's deadline (epoch interruption) ends it.
fn spin(_: &Context, (): ()) -> Result<(), TaskError> {
    let mut n = 0_u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Size of each allocation in `hostile.alloc`.
const CHUNK: usize = 1 << 20;

/// Allocates 1 MiB chunks forever, writing to every page so that the memory
/// is really used; only the host's memory limit ends it.
fn alloc(_: &Context, (): ()) -> Result<(), TaskError> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0_u8; CHUNK];
        for page in chunk.chunks_mut(4096) {
            page[0] = 1;
        }
        hoard.push(black_box(chunk));
    }
}

/// A Rust panic, which the host sees as a trap.
fn panic(_: &Context, (): ()) -> Result<(), TaskError> {
    panic!("hostile panic: boom");
}

/// An explicit `unreachable` instruction: a trap with no panic machinery.
fn trap(_: &Context, (): ()) -> Result<(), TaskError> {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

/// Reads a cache key without a cache grant; returns the error it got as a
/// `fail` (expected: `denied: …`), or the value if the host let it through.
fn denied(_: &Context, (): ()) -> Result<Value, TaskError> {
    let value = cache::get("secret")?;
    Ok(json!({ "leaked": value.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()) }))
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
    /// When set, reports progress `done/steps` at each step (host calls).
    #[serde(default)]
    steps: u64,
}

/// Busy-waits `ms` milliseconds on the monotonic clock, without any host call
/// the host could use to stop it (unless `steps` asks for progress reports):
/// for SIGKILL mid-job and shutdown tests.
fn sleep(ctx: &Context, Sleep { ms, steps }: Sleep) -> Result<Value, TaskError> {
    let until = Duration::from_millis(ms);
    let started_ms = unix_ms();
    let start = Instant::now();
    let mut reported = 0;
    while start.elapsed() < until {
        if steps > 0 {
            let done = (start.elapsed().as_millis() as u64 * steps / ms.max(1)).min(steps);
            if done > reported {
                reported = done;
                ctx.progress(done, steps);
            }
        }
        black_box(());
    }
    // The guest's own clock readings: tests use them to see which runs
    // really overlapped, independent of when the host leased the jobs.
    Ok(json!({ "slept_ms": ms, "started_ms": started_ms, "ended_ms": unix_ms() }))
}

/// Busy for `ms`, then asks for a retry: a running attempt that fails.
fn sleep_then_retry(ctx: &Context, args: Sleep) -> Result<Value, TaskError> {
    sleep(ctx, args)?;
    Err(TaskError::retry("not yet"))
}

/// Wall-clock milliseconds since the Unix epoch (WASI wall clock).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Bytes written by `hostile.print_flood`: 10 MiB.
const FLOOD_BYTES: usize = 10 << 20;

/// Writes 10 MiB to stdout, a line at a time, then returns `"ok"`. Stops
/// quietly if the host closes stdout: the point is the volume, not the text.
fn print_flood(_: &Context, (): ()) -> Result<&'static str, TaskError> {
    let mut line = [b'x'; 1024];
    line[1023] = b'\n';
    let mut out = std::io::stdout().lock();
    for _ in 0..FLOOD_BYTES / line.len() {
        if out.write_all(&line).is_err() {
            break;
        }
    }
    let _ = out.flush();
    Ok("ok")
}

/// Counts its runs in a global and leaves a secret in a zero-initialised
/// 256 KiB buffer, after looking for the previous run's: every job
/// must start from a fresh instance (the host reuses memory slots and
/// zeroes only the pages a job dirtied), so it must see 1 run and no secret.
fn remember(_: &Context, (): ()) -> Result<Value, TaskError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static SCRATCH: std::sync::Mutex<[u8; 256 * 1024]> = std::sync::Mutex::new([0; 256 * 1024]);
    const SECRET: &[u8] = b"left by an earlier job";
    let runs = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    let mut scratch = SCRATCH.lock().map_err(|_| TaskError::fail("poisoned"))?;
    let scratch_was_clean = scratch.iter().all(|b| *b == 0);
    for chunk in scratch.chunks_mut(4096) {
        chunk[..SECRET.len()].copy_from_slice(SECRET);
    }
    Ok(json!({ "runs": runs, "scratch_was_clean": scratch_was_clean }))
}

/// Works: proves the plugin loads and runs when it behaves.
fn ok(_: &Context, (): ()) -> Result<&'static str, TaskError> {
    Ok("ok")
}
