//! The data a plugin instance's store carries, and the limiter that turns
//! a memory-cap hit into a named cause.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::output::OutputCapture;
use super::services::Services;
use super::spec::PluginSpec;
use crate::kv::KvSpace;

/// Shared by every instance of one plugin version.
pub struct PluginCtx {
    pub spec: Arc<PluginSpec>,
    pub kv: Arc<KvSpace>,
    pub services: Arc<dyn Services>,
    /// The call deadline in epoch ticks.
    pub deadline_ticks: u64,
    /// Epoch ticks so far, and the calls running (which keep the ticker
    /// awake).
    pub ticks: Arc<super::engine::EpochClock>,
    /// `limits.idle_after` in epoch ticks.
    pub idle_ticks: u64,
    /// What the plugin may still log this second.
    pub log_budget: LogBudget,
    /// Whether calls log each import they make (kept across versions).
    pub trace: Arc<super::trace::TraceSwitch>,
    /// Where traps are dumped; None off.
    pub(crate) coredumps: Option<Arc<super::coredump::Coredumps>>,
    /// Which of its targets ran long lately, and where those run.
    pub(crate) history: super::lanes::CallHistory,
    pub(crate) slow_lane: tokio::runtime::Handle,
}

/// A plugin's log bytes per second: every call and instance of the version
/// draws on it, so a plugin called in a loop cannot flood the log.
pub struct LogBudget {
    started: std::time::Instant,
    per_second: u64,
    second: std::sync::atomic::AtomicU64,
    used: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
    /// The second a drop was last reported (+1; 0 never).
    reported: std::sync::atomic::AtomicU64,
}

impl LogBudget {
    pub fn new(per_second: u64) -> LogBudget {
        LogBudget {
            started: std::time::Instant::now(),
            per_second,
            second: Default::default(),
            used: Default::default(),
            dropped: Default::default(),
            reported: Default::default(),
        }
    }

    /// Whether `bytes` more may be logged now. Racing callers may overshoot
    /// the budget by a line each, never more.
    pub fn take(&self, bytes: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.started.elapsed().as_secs();
        if self.second.swap(now, Relaxed) != now {
            self.used.store(0, Relaxed);
        }
        let ok = self.used.fetch_add(bytes, Relaxed) + bytes <= self.per_second;
        if !ok {
            self.dropped.fetch_add(1, Relaxed);
        }
        ok
    }

    /// Lines dropped since the last report, at most once a second.
    pub fn to_report(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.started.elapsed().as_secs() + 1;
        if self.dropped.load(Relaxed) == 0 || self.reported.swap(now, Relaxed) == now {
            return None;
        }
        Some(self.dropped.swap(0, Relaxed))
    }
}

impl PluginCtx {
    /// The tick at which a call (or a task's slice) starting now must end.
    pub fn deadline_from_now(&self) -> u64 {
        self.ticks.now().saturating_add(self.deadline_ticks)
    }
}

/// What the current call is; reset before each call.
#[derive(Default)]
pub struct CallCtx {
    /// The route, command or event being handled (for logs).
    pub target: String,
    /// Nesting of command calls (plugin → command → plugin …).
    pub depth: u32,
    /// Exec tasks may sleep; nothing else may.
    pub is_task: bool,
    /// The epoch tick past which the call is interrupted.
    pub deadline_tick: u64,
    /// Epoch ticks the call has run into (see the pool's epoch callback).
    pub ticks_seen: u32,
    pub log_lines: usize,
    pub log_dropped: usize,
    /// Lines dropped by the plugin's per-second budget in this call.
    pub log_rate_dropped: usize,
    /// The last kv write the call made or saw: its reply waits until that
    /// is durable.
    pub kv_ticket: crate::kv::Ticket,
    /// Imports traced in this call, and those past the cap that were not.
    pub traced: u32,
    pub trace_skipped: u32,
}

pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) plugin: Arc<PluginCtx>,
    pub(crate) call: CallCtx,
    pub(crate) stdout: OutputCapture,
    pub(crate) stderr: OutputCapture,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Caps linear memory and remembers a refused growth, so the call's error
/// says "memory cap" rather than whatever the guest's allocator did next.
pub struct MemoryLimiter {
    pub cap: usize,
    /// The size a refused `memory.grow` asked for, during the current call.
    pub refused: Option<usize>,
    /// Linear memory now, as the last growth left it.
    pub size: usize,
    /// Bytes past which growth is reported (E_CORE_PKG_THRESHOLD); 0 never.
    pub threshold: usize,
    /// Set when a growth crossed `threshold`; taken after the call.
    pub crossed: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.refused = Some(desired);
            wasmtime::bail!("memory cap of {} bytes exceeded (asked for {desired})", self.cap);
        }
        if self.threshold > 0 && self.size <= self.threshold && desired > self.threshold {
            self.crossed = true;
        }
        self.size = desired;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold function references; 100k is far beyond any real
        // plugin and keeps a table bomb from eating host memory.
        Ok(desired <= 100_000)
    }
}
