//! The instances of one plugin version, and one call's lease on one.
//!
//! Invariants:
//! - A worker (a store plus its instance) is idle in the pool or owned by
//!   exactly one `Lease`, never both.
//! - At most `max_instances` workers are leased at once: `in_use` counts
//!   leases, under the same lock as the idle list, from before a lease's
//!   worker is taken or made until after it is returned or dropped; a call
//!   that finds the pool full waits (at most its deadline) to be notified.
//! - A worker returns to the pool only in `reuse` isolation and only when
//!   its call ended without poisoning it (`Cause::poisons_instance`): a trap,
//!   exhausted fuel, a missed deadline or a memory-cap hit leaves the
//!   instance unusable (wasmtime refuses to re-enter it) or in a state the
//!   guest did not expect, so it is dropped and the next call makes a fresh
//!   one from the `InstancePre`.
//! - A lease dropped without `finish` (its caller was cancelled mid-call)
//!   drops its worker, which may have stopped anywhere.
//! - Idle workers of a replaced version die with it: when the last call in
//!   flight on the old version ends, its pool is dropped.
//! - In `reuse` isolation `live` counts the instances alive; one made
//!   because none was idle scales the pool up, and `shrink_idle` drops those
//!   idle past `idle_after` down to `min_instances` (E_CORE_PROC_AUTO_SCALE
//!   either way).
//! - A call running into its second epoch tick yields to the executor on
//!   every tick after, so no guest holds a worker thread; its deadline is
//!   wall time, yielded time included.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::backtrace::GuestBacktrace;
use super::bindings::Level;
use super::clock::{self, Stamp};
use super::error::{chain, classify, Cause};
use super::exports::{ExportIndices, WorkerExports};
use super::imports::emit_log;
use super::output::OutputCapture;
use super::state::{CallCtx, HostState, MemoryLimiter, PluginCtx};
use super::stats::Stats;
use super::trace::trace_call;
use super::Isolation;
use crate::sync::lock;

/// Bytes of stdout and of stderr kept per call.
const OUTPUT_CAP: usize = 64 << 10;

pub(crate) struct Worker {
    store: Store<HostState>,
    exports: WorkerExports,
    /// The epoch tick of its last call (ticks are cheaper than a clock).
    last_used: u64,
}

/// A call's cause of failure, and where the guest was when it trapped.
pub(crate) type Fault = (Cause, Option<Arc<GuestBacktrace>>);

/// How a call went wrong before it is classified.
pub(crate) enum Failure {
    /// The handler returned `err`.
    Guest(String),
    /// wasmtime returned an error: a trap, a limit, a host import failure.
    Wasm(wasmtime::Error),
}

/// Fuel and time one call used.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallReport {
    pub elapsed: Duration,
    pub fuel: u64,
    /// What the reply must wait for to be durable.
    pub kv_ticket: crate::kv::Ticket,
}

pub(crate) struct Pool {
    pre: InstancePre<HostState>,
    indices: ExportIndices,
    ctx: Arc<PluginCtx>,
    state: Mutex<PoolState>,
    /// Woken when a lease ends, for calls waiting on a full pool.
    freed: Notify,
    stats: Arc<Stats>,
}

struct PoolState {
    idle: Vec<Worker>,
    in_use: usize,
    /// Instances alive in `reuse` isolation: idle, or leased with one.
    live: usize,
}

impl Pool {
    pub fn new(pre: InstancePre<HostState>, indices: ExportIndices, ctx: Arc<PluginCtx>, stats: Arc<Stats>) -> Self {
        let state = Mutex::new(PoolState { idle: Vec::new(), in_use: 0, live: 0 });
        Pool { pre, indices, ctx, state, freed: Notify::new(), stats }
    }

    /// The plugin's kv space (its calls' replies wait on its journal).
    pub fn kv(&self) -> &crate::kv::KvSpace {
        &self.ctx.kv
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // Each update under the lock is a push, a pop or a counter step: a
        // panic cannot leave it half-done.
        lock(&self.state)
    }

    /// Whether the plugin exports `batch` beside `route`.
    pub fn has_batch(&self) -> bool {
        self.indices.has_batch()
    }

    /// Whether the plugin exports `datagrams` beside `route`.
    pub fn has_datagrams(&self) -> bool {
        self.indices.has_datagrams()
    }

    /// Whether the plugin exports `subscriber-batch` beside `subscriber`.
    pub fn has_subscriber_batch(&self) -> bool {
        self.indices.has_subscriber_batch()
    }

    /// Whether a call of `target` belongs on the slow lane (`lanes`).
    pub fn runs_long(&self, target: &str) -> bool {
        self.ctx.history.runs_long(target)
    }

    pub fn slow_lane(&self) -> &tokio::runtime::Handle {
        &self.ctx.slow_lane
    }

    pub fn idle_count(&self) -> usize {
        self.state().idle.len()
    }

    /// Takes a lease slot if one is free: an idle worker in `reuse`
    /// isolation, or the right to make one.
    fn try_take(&self) -> Option<Option<Worker>> {
        let mut state = self.state();
        if state.in_use >= self.ctx.spec.limits.max_instances.max(1) {
            return None;
        }
        state.in_use += 1;
        Some(match self.ctx.spec.limits.isolation {
            Isolation::Reuse => state.idle.pop(),
            Isolation::PerCall => None,
        })
    }

    /// A new instance beyond the ones warmed at load: the pool scaled up.
    fn grew(&self) {
        let (live, load) = {
            let mut state = self.state();
            state.live += 1;
            (state.live, state.in_use)
        };
        self.auto_scale("up", live, load);
    }

    fn auto_scale(&self, direction: &str, live: usize, in_use: usize) {
        let max = self.ctx.spec.limits.max_instances.max(1);
        let event = super::Event {
            name: "E_CORE_PROC_AUTO_SCALE".into(),
            subclass: None,
            headers: vec![
                ("group_type".into(), "plugin".into()),
                ("group_filter".into(), self.ctx.spec.name.clone()),
                ("group_load".into(), (in_use * 100 / max).to_string()),
                ("scale".into(), direction.into()),
                ("process_id".into(), live.to_string()),
                ("pid".into(), std::process::id().to_string()),
            ],
            body: None,
        };
        self.ctx.services.raise(event);
    }

    /// Drops instances idle longer than `idle_after`, oldest first, while
    /// more than `min_instances` are alive.
    pub fn shrink_idle(&self) {
        let limits = &self.ctx.spec.limits;
        let now = self.ctx.ticks.now();
        let idle_ticks = self.ctx.idle_ticks;
        let mut dropped = Vec::new();
        let (mut live, in_use) = {
            let mut state = self.state();
            // The idle list is a stack: the least recently used are first.
            while state.live > limits.min_instances
                && state.idle.first().is_some_and(|w| now.saturating_sub(w.last_used) >= idle_ticks)
            {
                dropped.push(state.idle.remove(0));
                state.live -= 1;
            }
            (state.live + dropped.len(), state.in_use)
        };
        for worker in dropped {
            drop(worker);
            live -= 1;
            self.auto_scale("down", live, in_use);
        }
    }

    /// Ends a lease; `worker` goes back to the idle list.
    fn give_back(&self, worker: Option<Worker>) {
        let mut state = self.state();
        state.in_use -= 1;
        if let Some(worker) = worker {
            state.idle.push(worker);
        }
        drop(state);
        self.freed.notify_one();
    }

    /// Makes `n` instances ahead of traffic; in per-call isolation they
    /// only prove that the plugin instantiates, and are dropped.
    pub async fn warm(&self, n: usize, isolation: Isolation) -> Result<(), Cause> {
        // Instantiation runs guest code under a deadline: the ticker must run.
        let _active = self.ctx.ticks.enter();
        for _ in 0..n {
            let worker = self.instantiate().await?;
            if isolation == Isolation::Reuse {
                let mut state = self.state();
                state.idle.push(worker);
                state.live += 1;
            }
        }
        Ok(())
    }

    /// Waits for a free instance (at most the call's deadline) and prepares
    /// it for a call of `target`.
    pub async fn acquire(&self, target: &str, depth: u32, is_task: bool) -> Result<Lease<'_>, Cause> {
        let limits = &self.ctx.spec.limits;
        let started = clock::now();
        let mut waited = Duration::ZERO;
        let taken = match self.try_take() {
            Some(taken) => taken,
            None => {
                let now = tokio::time::Instant::now();
                let give_up = now.checked_add(limits.deadline).unwrap_or(now + Duration::from_secs(86_400));
                loop {
                    // Armed before the retry, so a lease ending in between
                    // is not missed.
                    let freed = self.freed.notified();
                    if let Some(taken) = self.try_take() {
                        waited = started.elapsed();
                        break taken;
                    }
                    if tokio::time::timeout_at(give_up, freed).await.is_err() {
                        return Err(Cause::Busy { waited: started.elapsed() });
                    }
                }
            }
        };
        // From here the lease owns the slot: dropping it gives it back.
        let active = self.ctx.ticks.enter();
        let mut lease =
            Lease { pool: self, worker: None, finished: false, requests: 1, started, waited, _active: active };
        let mut worker = match taken {
            Some(worker) => worker,
            None => {
                let worker = self.instantiate().await?;
                if limits.isolation == Isolation::Reuse {
                    self.grew();
                }
                worker
            }
        };
        worker.begin(target, depth, is_task, limits.fuel)?;
        lease.worker = Some(worker);
        Ok(lease)
    }

    async fn instantiate(&self) -> Result<Worker, Cause> {
        let spec = &self.ctx.spec;
        let stdout = OutputCapture::new(OUTPUT_CAP);
        let stderr = OutputCapture::new(OUTPUT_CAP);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for dir in &spec.preopens {
            let perms = if dir.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            wasi.preopened_dir(&dir.host, &dir.guest, perms).map_err(|e| Cause::Host {
                message: format!("cannot open directory {} for the guest: {e:#}", dir.host.display()),
            })?;
        }
        let state = HostState {
            wasi: wasi.build(),
            table: Default::default(),
            limiter: MemoryLimiter {
                cap: spec.limits.memory_bytes,
                refused: None,
                size: 0,
                threshold: spec.limits.memory_bytes / 100 * usize::from(spec.limits.pkg_threshold_pct),
                crossed: false,
            },
            plugin: self.ctx.clone(),
            call: CallCtx { target: "(instantiation)".into(), ..Default::default() },
            stdout,
            stderr,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        // A call that runs past a tick boundary gets here once per tick.
        // Past its deadline it is interrupted (`Trap::Interrupt`); the
        // deadline is a tick count from the ticker, not a count of these
        // callbacks, so time spent yielded counts too. From its second tick
        // on (it has run at least a tick) it yields to the executor each
        // tick, so a long guest call never holds a worker thread from other
        // tasks; a short call that merely straddles a boundary does not pay
        // for a yield.
        store.epoch_deadline_callback(|mut ctx| {
            let call = &mut ctx.data_mut().call;
            call.ticks_seen += 1;
            let (deadline, seen) = (call.deadline_tick, call.ticks_seen);
            if ctx.data().plugin.ticks.now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else if seen >= 2 {
                if seen == 2 {
                    // Its target's next calls take the slow lane at once.
                    let data = ctx.data();
                    data.plugin.history.mark_long(&data.call.target);
                }
                Ok(UpdateDeadline::Yield(1))
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        let host = |e: wasmtime::Error| Cause::Host { message: chain(&e) };
        store.set_fuel(spec.limits.fuel).map_err(host)?;
        store.data_mut().call.deadline_tick = self.ctx.deadline_from_now();
        store.set_epoch_deadline(1);
        let instance: Instance = match self.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            Err(e) => {
                let (stderr, _) = store.data().stderr.take();
                return Err(classify(&e, store.data(), &stderr, spec.limits.fuel));
            }
        };
        let exports = self.indices.load(&mut store, &instance).map_err(host)?;
        self.stats.instantiated();
        Ok(Worker { store, exports, last_used: self.ctx.ticks.now() })
    }
}

impl Worker {
    fn begin(&mut self, target: &str, depth: u32, is_task: bool, fuel: u64) -> Result<(), Cause> {
        self.store.set_fuel(fuel).map_err(|e| Cause::Host { message: chain(&e) })?;
        self.store.set_epoch_deadline(1);
        let data = self.store.data_mut();
        data.call.deadline_tick = data.plugin.deadline_from_now();
        data.call.ticks_seen = 0;
        data.limiter.refused = None;
        // The target's buffer is reused: this runs on every call.
        let call = &mut data.call;
        call.target.clear();
        call.target.push_str(target);
        (call.depth, call.is_task, call.log_lines, call.log_dropped, call.log_rate_dropped) = (depth, is_task, 0, 0, 0);
        call.kv_ticket = crate::kv::Ticket::NONE;
        (call.traced, call.trace_skipped) = (0, 0);
        Ok(())
    }

    /// Sends what the guest printed to the plugin's log; returns stderr.
    fn flush_output(&mut self) -> String {
        let data = self.store.data_mut();
        let (out, out_dropped) = data.stdout.take();
        let (err, err_dropped) = data.stderr.take();
        for line in out.lines().filter(|l| !l.is_empty()) {
            emit_log(data, Level::Info, line);
        }
        for line in err.lines().filter(|l| !l.is_empty()) {
            emit_log(data, Level::Warn, line);
        }
        if out_dropped + err_dropped > 0 {
            tracing::warn!(
                plugin = %data.plugin.spec.name,
                target = %data.call.target,
                bytes = out_dropped + err_dropped,
                "guest output over the cap was dropped"
            );
        }
        err
    }
}

impl Pool {
    /// E_CORE_THRESHOLD, with OpenSIPS's parameters.
    fn raise_threshold(&self, target: &str, elapsed: Duration, threshold: Duration) {
        let spec = &self.ctx.spec;
        self.ctx.services.raise(super::Event {
            name: "E_CORE_THRESHOLD".into(),
            subclass: None,
            headers: vec![
                ("source".into(), format!("plugin {} route {target}", spec.name)),
                ("time".into(), elapsed.as_micros().to_string()),
                ("extra".into(), format!("threshold {} us", threshold.as_micros())),
                ("plugin".into(), spec.name.clone()),
                ("route".into(), target.to_string()),
            ],
            body: None,
        });
    }

    /// E_CORE_PKG_THRESHOLD: an instance's linear memory passed the
    /// configured share of its cap.
    fn raise_pkg_threshold(&self, used: usize) {
        let spec = &self.ctx.spec;
        let size = spec.limits.memory_bytes.max(1);
        self.ctx.services.raise(super::Event {
            name: "E_CORE_PKG_THRESHOLD".into(),
            subclass: None,
            headers: vec![
                ("usage".into(), (used * 100 / size).to_string()),
                ("threshold".into(), spec.limits.pkg_threshold_pct.to_string()),
                ("used".into(), used.to_string()),
                ("size".into(), size.to_string()),
                ("pid".into(), std::process::id().to_string()),
                ("plugin".into(), spec.name.clone()),
            ],
            body: None,
        });
    }
}

/// One call's hold on one instance (and on one of the pool's slots).
pub(crate) struct Lease<'p> {
    pool: &'p Pool,
    worker: Option<Worker>,
    /// Set by `finish`; until then the worker is mid-call.
    finished: bool,
    /// How many requests the call carries: 1, or a batch's length.
    requests: u64,
    started: Stamp,
    /// How long it waited for a free instance (zero in the common case).
    waited: Duration,
    /// Keeps the epoch ticker awake while the call runs (it parks when no
    /// call does, so an idle daemon never wakes).
    _active: super::engine::Active<'p>,
}

impl Lease<'_> {
    /// The store and the exports to make the call with.
    pub fn parts(&mut self) -> Option<(&mut Store<HostState>, &WorkerExports)> {
        self.worker.as_mut().map(|w| (&mut w.store, &w.exports))
    }

    /// Makes the call a batch of `n` requests: its fuel is the per-call
    /// fuel times `n`, and it is counted (and judged short or long) as `n`
    /// calls of its average length.
    pub fn batch_of(&mut self, n: usize) -> Result<(), Cause> {
        let n = u64::try_from(n.max(1)).unwrap_or(u64::MAX);
        let fuel = self.pool.ctx.spec.limits.fuel.saturating_mul(n);
        if let Some(worker) = self.worker.as_mut() {
            worker.store.set_fuel(fuel).map_err(|e| Cause::Host { message: chain(&e) })?;
        }
        self.requests = n;
        Ok(())
    }

    /// Ends the call: classifies a failure, logs output, counts, and returns
    /// the instance to the pool or drops it.
    pub fn finish<T>(mut self, outcome: Result<T, Failure>) -> (Result<T, Fault>, CallReport) {
        let elapsed = self.started.elapsed();
        let Some(mut worker) = self.worker.take() else {
            // `acquire` returns a lease only with its worker in place.
            let cause = Cause::Host { message: "lease without an instance".into() };
            return (Err((cause, None)), CallReport { elapsed, ..CallReport::default() });
        };
        let pool = self.pool;
        let limits = &pool.ctx.spec.limits;
        let given = limits.fuel.saturating_mul(self.requests);
        let fuel = given.saturating_sub(worker.store.get_fuel().unwrap_or(0));
        // A batch is counted and judged as its requests, each of the
        // average length.
        let requests = u32::try_from(self.requests).unwrap_or(u32::MAX);
        let stderr = worker.flush_output();
        let mut backtrace = None;
        let result = match outcome {
            Ok(value) => Ok(value),
            Err(Failure::Guest(message)) => Err(Cause::Guest { message }),
            Err(Failure::Wasm(e)) => {
                backtrace = GuestBacktrace::of(&e).map(Arc::new);
                if let Some(dumps) = &pool.ctx.coredumps {
                    let target = worker.store.data().call.target.clone();
                    dumps.write(&e, &mut worker.store, &pool.ctx.spec.name, &target);
                }
                Err(classify(&e, worker.store.data(), &stderr, given))
            }
        };
        let data = worker.store.data();
        let kv_ticket = data.call.kv_ticket;
        pool.stats.record(self.requests, elapsed, fuel, result.as_ref().err());
        match result.as_ref().err() {
            Some(cause) if cause.poisons_instance() => tracing::warn!(
                plugin = %pool.ctx.spec.name,
                route = %data.call.target,
                cause = %cause.kind(),
                backtrace = backtrace.as_ref().map(|bt| bt.short(usize::MAX)),
                "call failed: {cause}; instance discarded"
            ),
            Some(cause) => {
                tracing::debug!(plugin = %pool.ctx.spec.name, route = %data.call.target, "call failed: {cause}")
            }
            None => {}
        }
        if pool.ctx.trace.is_on() {
            trace_call(data, &result, elapsed, fuel);
        }
        if data.call.log_rate_dropped > 0 {
            pool.stats.log_dropped(data.call.log_rate_dropped);
        }
        if let Some(dropped) = pool.ctx.log_budget.to_report() {
            tracing::warn!(
                plugin = %pool.ctx.spec.name,
                dropped,
                per_second = limits.max_log_bytes_per_s,
                "log lines over the plugin's bytes-per-second budget were dropped"
            );
        }
        if data.call.log_dropped > 0 {
            pool.stats.log_dropped(data.call.log_dropped);
            tracing::warn!(
                plugin = %pool.ctx.spec.name,
                target = %data.call.target,
                dropped = data.call.log_dropped,
                "log lines over the per-call budget were dropped"
            );
        }
        let each = elapsed / requests;
        if let Some(warn) = limits.warn_after.filter(|w| each > *w) {
            tracing::warn!(
                plugin = %pool.ctx.spec.name,
                target = %data.call.target,
                elapsed_us = each.as_micros() as u64,
                requests = self.requests,
                threshold_us = warn.as_micros() as u64,
                "call slower than its threshold"
            );
            pool.raise_threshold(&data.call.target, each, warn);
        }
        if data.limiter.crossed {
            pool.raise_pkg_threshold(data.limiter.size);
        }
        let poisoned = result.as_ref().err().is_some_and(Cause::poisons_instance);
        // A call that yielded was counted long then. Time waiting for a
        // free instance held no thread.
        if data.call.ticks_seen < 2 {
            let took = elapsed.saturating_sub(self.waited) / requests;
            pool.ctx.history.record(&data.call.target, took, fuel / self.requests, poisoned);
        }
        worker.store.data_mut().limiter.crossed = false;
        if poisoned {
            pool.stats.discarded();
            if limits.isolation == Isolation::Reuse {
                let mut state = pool.state();
                state.live = state.live.saturating_sub(1);
            }
        } else if limits.isolation == Isolation::Reuse {
            worker.last_used = pool.ctx.ticks.now();
            self.worker = Some(worker);
        }
        self.finished = true;
        (result.map_err(|cause| (cause, backtrace)), CallReport { elapsed, fuel, kv_ticket })
    }
}

impl Drop for Lease<'_> {
    /// Gives the slot back, with the worker if `finish` kept it. A lease
    /// dropped before `finish` (its call was cancelled) loses its worker.
    fn drop(&mut self) {
        let worker = match self.worker.take() {
            Some(worker) if self.finished => Some(worker),
            Some(_) => {
                self.pool.stats.discarded();
                if self.pool.ctx.spec.limits.isolation == Isolation::Reuse {
                    let mut state = self.pool.state();
                    state.live = state.live.saturating_sub(1);
                }
                None
            }
            None => None,
        };
        self.pool.give_back(worker);
    }
}
