//! The sandbox: one wasmtime engine, a cache of compiled components, and
//! plugin versions with their instance pools.
//!
//! The runtime knows wasmtime and nothing about wire formats; front-ends
//! reach it through the dispatcher.

mod backtrace;
mod bindings;
pub mod cache;
mod clock;
pub mod contract;
mod coredump;
mod engine;
pub mod error;
mod exports;
pub mod footprint;
mod imports;
mod kv_import;
mod lanes;
pub mod limits;
mod output;
pub mod plugin;
mod pool;
pub mod services;
mod spec;
mod state;
pub mod stats;
pub(crate) mod trace;

use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::component::{Component, Linker};
use wasmtime::Engine;

pub use backtrace::{Frame, GuestBacktrace};
pub use bindings::{
    Answer, CommandInfo, Event, HostError, Level, Message, MessageInfo, Origin, Packed, Peer, Reply, Request,
};
pub use cache::{CacheOutcome, ComponentCache};
pub use coredump::CoredumpSettings;
pub use engine::{config as engine_config, EngineSettings};
pub use error::{CallError, Cause, LoadError};
pub use exports::Export;
pub use limits::{Capabilities, Isolation, Limits, Preopen};
pub use plugin::{Outcome, PluginVersion};
pub use pool::CallReport;
pub use services::{FetchQuery, Services};
pub use spec::PluginSpec;
pub use stats::{Stats, StatsSnapshot};
pub use trace::{TraceSwitch, MAX_TRACED_PER_CALL};

use crate::kv::KvSpace;
use exports::ExportIndices;
use pool::Pool;
use state::{HostState, PluginCtx};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot configure the wasm engine: {0}")]
    Engine(String),
    #[error("cannot start the epoch ticker thread: {0}")]
    Ticker(std::io::Error),
    #[error(transparent)]
    SlowLane(#[from] lanes::SlowLaneError),
}

pub struct Runtime {
    engine: Engine,
    /// For plugins on a Redis kv store, whose kv calls wait.
    linker: Linker<HostState>,
    /// For plugins on an in-process store: the same, but with synchronous
    /// kv functions (see `kv_import`).
    local_linker: Linker<HostState>,
    cache: ComponentCache,
    settings: EngineSettings,
    ticker: engine::Ticker,
    coredumps: Option<Arc<coredump::Coredumps>>,
    /// Where calls that run long go (see `lanes`).
    slow_lane: lanes::SlowLane,
}

/// What a component imports and exports, by interface name.
#[derive(Debug, serde::Serialize)]
pub struct ComponentInfo {
    pub exports: Vec<String>,
    pub imports: Vec<String>,
}

/// What kind of file the bytes are, from the header alone.
fn check_header(name: &str, source: &str, wasm: &[u8]) -> Result<(), LoadError> {
    const COMPONENT_VERSION: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];
    let (plugin, path) = (name.to_string(), source.to_string());
    match (wasm.get(0..4), wasm.get(4..8)) {
        (Some(b"\0asm"), Some(version)) if version == COMPONENT_VERSION => Ok(()),
        (Some(b"\0asm"), Some([1, 0, 0, 0])) => Err(LoadError::CoreModule { plugin, path }),
        (Some(b"\0asm"), _) => Err(LoadError::Compile { plugin, path, source: "unknown wasm version".into() }),
        _ => Err(LoadError::NotWasm { plugin, path }),
    }
}

impl Runtime {
    pub fn new(settings: EngineSettings, cache_dir: Option<PathBuf>) -> Result<Arc<Runtime>, RuntimeError> {
        clock::calibrate_in_background();
        let engine = engine::build(&settings).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        bindings::HostView::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        imports::add_sleep(&mut linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut local_linker = linker.clone();
        kv_import::add_local(&mut local_linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let cache = ComponentCache::new(&engine, cache_dir);
        let ticker = engine::Ticker::start(&engine, settings.tick).map_err(RuntimeError::Ticker)?;
        let coredumps = settings.coredump.clone().map(|c| Arc::new(coredump::Coredumps::new(c)));
        let slow_lane = lanes::SlowLane::start()?;
        Ok(Arc::new(Runtime { engine, linker, local_linker, cache, settings, ticker, coredumps, slow_lane }))
    }

    /// Compiles a component, or maps it from the cache. CPU-heavy for a
    /// cache miss: call it off the async workers.
    /// `digest` is `wasm`'s blake3 hash, the plugin version's identity and
    /// the cache key's part (hashed once: an interpreter's component is
    /// tens of MB).
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        wasm: &[u8],
        digest: &blake3::Hash,
    ) -> Result<(Component, CacheOutcome), LoadError> {
        check_header(name, source, wasm)?;
        self.cache.load(&self.engine, wasm, digest).map_err(|e| {
            // Interpreter toolchains build for the async ABI unless told not to.
            if format!("{e:#}").contains("requires the component model async feature") {
                return LoadError::AsyncAbi { plugin: name.to_string(), path: source.to_string() };
            }
            LoadError::Compile { plugin: name.to_string(), path: source.to_string(), source: e.into() }
        })
    }

    /// Calls running now, keeping the epoch ticker awake (an exec task
    /// asleep in `host.sleep` is not one).
    pub fn calls_running(&self) -> usize {
        self.ticker.clock.running()
    }

    pub fn describe(&self, component: &Component) -> ComponentInfo {
        let ty = component.component_type();
        ComponentInfo {
            exports: ty.exports(&self.engine).map(|(n, _)| n.to_string()).collect(),
            imports: ty.imports(&self.engine).map(|(n, _)| n.to_string()).collect(),
        }
    }

    /// Loads a plugin version: compiles (off the async workers), links,
    /// resolves its exports, makes its first instances and reads its
    /// commands. Nothing is swapped in here: a version that fails any step
    /// is refused with the step named, and the caller keeps what it had.
    pub async fn load(
        self: &Arc<Self>,
        spec: PluginSpec,
        code: Code,
        kv: Arc<KvSpace>,
        services: Arc<dyn Services>,
        stats: Arc<Stats>,
        trace: Arc<TraceSwitch>,
    ) -> Result<Arc<PluginVersion>, LoadError> {
        let name = spec.name.clone();
        if spec.limits.memory_bytes > self.settings.max_memory_bytes {
            return Err(LoadError::Invalid {
                plugin: name,
                message: format!(
                    "memory cap of {} MiB exceeds the runtime's max_memory_mb of {}",
                    spec.limits.memory_bytes >> 20,
                    self.settings.max_memory_bytes >> 20
                ),
            });
        }
        let rt = self.clone();
        let (n, src) = (name.clone(), spec.source.clone());
        let (component, cache, hash) = tokio::task::spawn_blocking(move || match code {
            Code::Bytes(wasm) => {
                let digest = blake3::hash(&wasm);
                rt.compile(&n, &src, &wasm, &digest).map(|(c, outcome)| (c, outcome, digest.to_hex().to_string()))
            }
            Code::Known(digest) => match rt.cache.cached(&rt.engine, &digest) {
                Some(component) => Ok((component, CacheOutcome::Hit, digest.to_hex().to_string())),
                None => Err(LoadError::NotCached { plugin: n }),
            },
        })
        .await
        .map_err(|e| LoadError::Compile {
            plugin: name.clone(),
            path: spec.source.clone(),
            source: e.into(),
        })??;
        contract::check(&self.engine, &component)
            .map_err(|mismatch| LoadError::Contract { plugin: name.clone(), mismatch })?;
        let linker = if kv.is_local() { &self.local_linker } else { &self.linker };
        let pre = linker.instantiate_pre(&component).map_err(|e| link_error(&name, e))?;
        let indices = ExportIndices::new(&pre)
            .map_err(|e| LoadError::Invalid { plugin: name.clone(), message: e.to_string() })?;
        let spec = Arc::new(spec);
        let tick = self.settings.tick.as_nanos().max(1);
        let deadline_ticks = u64::try_from(spec.limits.deadline.as_nanos().div_ceil(tick)).unwrap_or(u64::MAX).max(1);
        let ticks = self.ticker.clock.clone();
        let idle_ticks = u64::try_from(spec.limits.idle_after.as_nanos() / tick).unwrap_or(u64::MAX);
        let log_budget = state::LogBudget::new(spec.limits.max_log_bytes_per_s);
        let ctx = Arc::new(PluginCtx {
            spec: spec.clone(),
            kv,
            services,
            deadline_ticks,
            ticks,
            idle_ticks,
            log_budget,
            trace,
            coredumps: self.coredumps.clone(),
            history: lanes::CallHistory::default(),
            slow_lane: self.slow_lane.handle(),
        });
        let pool = Pool::new(pre, indices.clone(), ctx, stats.clone());
        let warm = match spec.limits.isolation {
            Isolation::Reuse => spec.limits.min_instances.max(1),
            // Instantiated once to prove it can be, then dropped: per-call
            // workers are never reused.
            Isolation::PerCall => 1,
        };
        pool.warm(warm, spec.limits.isolation).await.map_err(|cause| match cause {
            Cause::MemoryCap { cap, requested } => {
                LoadError::MemoryToStart { plugin: name.clone(), needs_kib: requested >> 10, cap_kib: cap >> 10 }
            }
            cause => LoadError::Instantiate { plugin: name.clone(), source: cause },
        })?;
        let mut version = PluginVersion::new(spec, hash, cache, &indices, pool, stats);
        version.read_commands().await.map_err(|cause| LoadError::Commands { plugin: name, source: cause })?;
        Ok(Arc::new(version))
    }
}

/// A plugin's code, for [`Runtime::load`].
pub enum Code {
    /// The component's bytes.
    Bytes(bytes::Bytes),
    /// Only the blake3 hash of bytes loaded before, unchanged since: the
    /// compiled artifact is taken from the cache, or the load fails with
    /// [`LoadError::NotCached`] and the caller reads the bytes.
    Known(blake3::Hash),
}

/// A link failure, with the import the host lacks named when wasmtime's
/// message names it.
fn link_error(plugin: &str, e: wasmtime::Error) -> LoadError {
    let text = format!("{e:#}");
    let import = ["component imports instance `", "component imports func `", "component imports resource `"]
        .iter()
        .find_map(|p| text.split_once(p))
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(import, _)| import.to_string());
    match import {
        Some(import) => LoadError::MissingImport { plugin: plugin.to_string(), import, source: e.into() },
        None => LoadError::Link { plugin: plugin.to_string(), source: e.into() },
    }
}
