//! The one wasmtime engine every plugin shares, and the epoch ticker that
//! enforces call deadlines.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
    // `perf` can name guest functions: /tmp/perf-<pid>.map.
    if std::env::var_os("EVRHOST_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

pub fn build(settings: &EngineSettings) -> wasmtime::Result<Engine> {
    Engine::new(&config(settings))
}

/// Quiet ticks after which the ticker parks.
const LINGER: u32 = 20;
/// Ticks the ticker sleeps at once while no call runs at its wake-ups.
const COARSE: u32 = 4;

/// Advances the engine's epoch once per tick while calls run, and
/// sleeps (parked, no wake-up at all) once none has run for `LINGER`
/// ticks. Parking at once would cost, under steady traffic of short
/// calls, a park and an unpark (a syscall on the calling thread) per
/// burst: several thousand a second at 50k datagrams/s, each dearer than
/// a tick. Lingering, it ticks at most once per tick however many calls
/// come, and an idle daemon still never wakes. It counts ticks
/// from a fixed start, so a deadline of N ticks is N ticks of wall time,
/// not N sleeps (a naive sleep loop drifts ~20%), and a late or parked
/// ticker catches up at once.
///
/// Under traffic of short calls, none is running at most of its wake-ups:
/// there is nothing to interrupt then, so it sleeps `COARSE` ticks at once
/// (each wake-up costs tens of µs of CPU on a VM: at 50k calls/s, ticking
/// every tick was 0.4 µs a call), and ticks every tick again from the
/// first wake-up that finds a call running. A call that starts in a coarse
/// sleep is seen by the epoch at most `COARSE` ticks late (a runaway call
/// is interrupted that much later, and marked long as much later); its
/// deadline is not: the clock reads wall time meanwhile.
///
/// It publishes the tick count in its [`EpochClock`], so a call's deadline
/// can be checked against wall time while the call yields (see `pool`).
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub clock: Arc<EpochClock>,
}

/// Ticks since start, and whether any call runs (one that does holds an
/// [`Active`]).
///
/// Invariant: `now` lags wall time by at most a tick: while the ticker
/// ticks every tick it reads the published ticks; in a coarse sleep, and
/// once none has run for `LINGER` ticks and the ticker is parked, it
/// reads the wall clock. `enter` and the ticker's
/// decision to park are ordered (SeqCst on `active` and `parked`), so a
/// call never runs with the ticker parked.
pub struct EpochClock {
    start: Instant,
    tick_ns: u128,
    ticks: AtomicU64,
    active: AtomicUsize,
    /// Calls entered so far: the ticker sees calls that began and ended
    /// between two of its ticks.
    entered: AtomicU64,
    parked: AtomicBool,
    /// The ticker sleeps `COARSE` ticks at once: `ticks` may lag.
    coarse: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

impl EpochClock {
    fn wall(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos() / self.tick_ns).unwrap_or(u64::MAX)
    }

    /// Ticks since start.
    pub fn now(&self) -> u64 {
        if self.parked.load(Ordering::Acquire) || self.coarse.load(Ordering::Acquire) {
            return self.wall();
        }
        self.ticks.load(Ordering::Acquire)
    }

    /// Marks a call running until the guard drops; wakes a parked ticker.
    pub fn enter(&self) -> Active<'_> {
        self.hold();
        Active(self)
    }

    /// Lets the ticker park while a running call waits outside wasm (an
    /// exec task in `host.sleep`, most of its life); the call holds it
    /// again, the ticks brought up to date, when the guard drops. Only the
    /// holder of an [`Active`] may pause.
    pub fn pause(&self) -> Paused<'_> {
        self.active.fetch_sub(1, Ordering::SeqCst);
        Paused(self)
    }

    /// Calls holding the ticker awake now.
    pub fn running(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    fn hold(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.entered.fetch_add(1, Ordering::Relaxed);
        if self.parked.load(Ordering::SeqCst) {
            self.ticks.fetch_max(self.wall(), Ordering::AcqRel);
            if let Some(thread) = self.thread.get() {
                thread.unpark();
            }
        }
    }
}

/// A running call's hold on the ticker.
pub struct Active<'c>(&'c EpochClock);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running call's hold, given up for a while (see [`EpochClock::pause`]).
pub struct Paused<'c>(&'c EpochClock);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.hold();
    }
}

impl Ticker {
    pub fn start(engine: &Engine, tick: Duration) -> std::io::Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let clock = Arc::new(EpochClock {
            start: Instant::now(),
            tick_ns: tick.as_nanos().max(1),
            ticks: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            entered: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            coarse: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let weak = engine.weak();
        let (flag, c) = (stop.clone(), clock.clone());
        let thread = std::thread::Builder::new().name("evrhost-epoch".into()).spawn(move || {
            // Ticks in a row with no call running nor entered.
            let (mut quiet, mut seen) = (0u32, 0u64);
            while !flag.load(Ordering::Relaxed) {
                let entered = c.entered.load(Ordering::Relaxed);
                let idle = c.active.load(Ordering::SeqCst) == 0;
                quiet = if idle && entered == seen { quiet.saturating_add(1) } else { 0 };
                seen = entered;
                if idle && quiet > LINGER / COARSE {
                    quiet = 0;
                    c.parked.store(true, Ordering::SeqCst);
                    if c.active.load(Ordering::SeqCst) == 0 && !flag.load(Ordering::Relaxed) {
                        std::thread::park();
                    }
                    c.ticks.fetch_max(c.wall(), Ordering::AcqRel);
                    c.parked.store(false, Ordering::SeqCst);
                    c.coarse.store(false, Ordering::SeqCst);
                    continue;
                }
                // Set before the sleep, cleared after the ticks caught up.
                c.coarse.store(idle, Ordering::SeqCst);
                std::thread::sleep(if idle { tick * COARSE } else { tick });
                let Some(engine) = weak.upgrade() else { break };
                // One increment however late: stores' epoch deadlines are
                // one tick ahead, and a call's deadline is checked against
                // the published ticks, not the engine's epoch.
                let due = c.wall();
                if due > c.ticks.load(Ordering::Acquire) {
                    engine.increment_epoch();
                    c.ticks.fetch_max(due, Ordering::AcqRel);
                }
            }
        })?;
        let _ = clock.thread.set(thread.thread().clone());
        Ok(Ticker { stop, thread: Some(thread), clock })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// Idle, the ticker parks and the clock still reads wall time; a call
    /// wakes it, and its ticks then keep pace.
    #[test]
    fn the_ticker_parks_when_no_call_runs_and_keeps_time() {
        let engine = wasmtime::Engine::default();
        let ticker = super::Ticker::start(&engine, Duration::from_millis(1)).expect("a ticker");
        let clock = ticker.clock.clone();
        let wait_for = |want: bool| {
            let started = Instant::now();
            while clock.parked.load(std::sync::atomic::Ordering::SeqCst) != want {
                assert!(started.elapsed() < Duration::from_secs(5), "parked never became {want}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_for(true);
        std::thread::sleep(Duration::from_millis(50));
        let idle = clock.now();
        assert!(idle >= 50, "parked, the clock reads the wall: {idle}");
        let published = clock.ticks.load(std::sync::atomic::Ordering::SeqCst);
        assert!(published < idle, "and nothing published meanwhile: {published} vs {idle}");

        let active = clock.enter();
        assert!(clock.ticks.load(std::sync::atomic::Ordering::SeqCst) >= idle, "enter brings the ticks up to date");
        wait_for(false);
        let before = clock.now();
        std::thread::sleep(Duration::from_millis(30));
        let ran = clock.now() - before;
        assert!((20..=60).contains(&ran), "running, ticks keep pace with wall time: {ran}");
        drop(active);
        wait_for(true);
    }
}
