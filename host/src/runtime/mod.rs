//! The sandbox runtime: one wasmtime [`Engine`] for the process (pooling
//! allocator, epoch interruption), plugins compiled once and cached on disk
//! ([`plugin`]), a registry that hot-reloads the plugins directory
//! ([`registry`], [`watcher`]), and a fresh store per job ([`sandbox`]).

pub mod bindings;
mod guest_output;
pub mod manifest;
pub mod plugin;
pub mod registry;
pub mod sandbox;
pub mod watcher;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::capabilities::Capabilities;
use crate::config::SandboxConfig;
use sandbox::JobCtx;

/// One epoch tick: the granularity of timeouts and stop requests.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Memory of a finished instance kept mapped (and zeroed) for the next one,
/// per linear memory; what a short job dirties fits in it.
const KEEP_RESIDENT_BYTES: usize = 4 << 20;
/// The same for tables.
const KEEP_RESIDENT_TABLE_BYTES: usize = 64 << 10;
/// Memory given back to the kernel is returned in batches of this many
/// slots, one interrupt round for many instances.
const DECOMMIT_BATCH: usize = 16;

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the wasm runtime: {0}")]
pub struct RuntimeError(String);

/// The process-wide engine, linker and compiled-code cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<JobCtx>,
    capabilities: Capabilities,
    sandbox: SandboxConfig,
    cache_dir: PathBuf,
    /// Compiled code is only valid for the engine (version, settings) that
    /// made it; this names that engine in cache file names.
    engine_hash: String,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    /// Builds the engine with room for `slots` instances at once (running
    /// jobs plus loads in progress).
    pub fn new(sandbox: &SandboxConfig, capabilities: Capabilities, cache_dir: PathBuf, slots: u32) -> Result<Self, RuntimeError> {
        let err = |e: wasmtime::Error| RuntimeError(format!("{e:#}"));
        let mut pool = PoolingAllocationConfig::default();
        // A Rust wasip2 component is a handful of core instances (the
        // program, the WASI adapter, shims) with one or two memories.
        pool.total_component_instances(slots)
            .total_core_instances(slots * 8)
            .total_memories(slots * 2)
            .total_tables(slots * 8)
            .total_stacks(slots)
            .max_memory_size(usize::try_from(sandbox.max_memory_mb << 20).unwrap_or(usize::MAX))
            // Reset a finished instance's memory by zeroing the pages it
            // dirtied (found with the PAGEMAP_SCAN ioctl, Linux ≥ 6.7)
            // instead of unmapping them: the next job then takes no page
            // faults and no TLB-shootdown interrupts on the other cores,
            // which cost more than the job itself for short tasks. Beyond
            // this size, or on older kernels, memory is given back with
            // madvise as before.
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_TABLE_BYTES)
            .pagemap_scan(Enabled::Auto)
            .decommit_batch_size(DECOMMIT_BATCH);
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(err)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(err)?;
        Capabilities::add_to_linker(&mut linker).map_err(err)?;

        let engine_hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            format!("{:016x}", h.finish())
        };

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (e, stop) = (engine.weak(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("celer-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match e.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| RuntimeError(format!("cannot start the epoch thread: {e}")))?;

        Ok(Runtime { engine, linker, capabilities, sandbox: sandbox.clone(), cache_dir, engine_hash, ticker_stop })
    }

    /// The sandbox settings this runtime enforces.
    pub fn sandbox(&self) -> &SandboxConfig {
        &self.sandbox
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}
