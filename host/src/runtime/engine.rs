//! The one wasmtime engine every plugin shares, and the epoch ticker that
//! enforces call deadlines.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Engine-wide settings; they are part of the compiled-code cache key.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// One epoch tick; deadlines are rounded up to whole ticks.
    pub tick: Duration,
    /// Instances alive at once, over all plugins.
    pub total_instances: u32,
    /// No plugin's memory cap may exceed this.
    pub max_memory_bytes: usize,
    /// Coredumps on traps; None off.
    pub coredump: Option<super::coredump::CoredumpSettings>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            tick: Duration::from_millis(1),
            total_instances: 1000,
            max_memory_bytes: 1 << 30,
            coredump: None,
        }
    }
}

/// The wasmtime configuration evrhost runs plugins with (the benchmarks'
/// plain-wasmtime baselines use it too, so they pay for the same things).
pub fn config(settings: &EngineSettings) -> Config {
    let n = settings.total_instances;
    let mut pool = PoolingAllocationConfig::default();
    // A Rust wasip2 component has 4 core instances (the program, the WASI
    // adapter and two shims), one memory and two tables; leave room.
    pool.total_component_instances(n)
        .total_core_instances(n * 8)
        .total_memories(n * 2)
        .total_tables(n * 4)
        .total_stacks(n)
        .max_memory_size(settings.max_memory_bytes)
        // Pages kept resident (not returned to the kernel) when an instance
        // is dropped: a fresh instance then costs ~10 µs instead of ~45.
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(64 << 10)
        .pagemap_scan(Enabled::Auto);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .memory_init_cow(true)
        // Traps name the guest's functions, with file:line from DWARF
        // when the component has it (parsed at compile time only).
        .wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Enable)
        .coredump_on_trap(settings.coredump.is_some())
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

pub fn build(settings: &EngineSettings) -> wasmtime::Result<Engine> {
    Engine::new(&config(settings))
}

/// Advances the engine's epoch once per tick. It counts ticks from a fixed
/// start and catches up after a late wake-up, so a deadline of N ticks is
/// N ticks of wall time, not N sleeps (a naive sleep loop drifts ~20%).
///
/// It also publishes the tick count, so a call's deadline can be checked
/// against wall time while the call yields (see `pool`).
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub ticks: Arc<AtomicU64>,
}

impl Ticker {
    pub fn start(engine: &Engine, tick: Duration) -> std::io::Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicU64::new(0));
        let weak = engine.weak();
        let (flag, published) = (stop.clone(), ticks.clone());
        let thread = std::thread::Builder::new().name("evrhost-epoch".into()).spawn(move || {
            let start = Instant::now();
            let mut ticks: u128 = 0;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                let Some(engine) = weak.upgrade() else { break };
                let due = start.elapsed().as_nanos() / tick.as_nanos().max(1);
                while ticks < due {
                    engine.increment_epoch();
                    ticks += 1;
                }
                published.store(u64::try_from(ticks).unwrap_or(u64::MAX), Ordering::Release);
            }
        })?;
        Ok(Ticker { stop, thread: Some(thread), ticks })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
