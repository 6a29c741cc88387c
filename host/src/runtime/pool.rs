//! The instances of one plugin version, and one call's lease on one.
//!
//! Invariants:
//! - A worker (a store plus its instance) is idle in the pool or owned by
//!   exactly one `Lease`, never both.
//! - At most `max_instances` workers exist: a lease holds a semaphore permit
//!   from before its worker is taken or made until after it is returned or
//!   dropped.
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

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};
use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::bindings::{api, route, subscriber, task, Level};
use super::error::{chain, Cause};
use super::imports::emit_log;
use super::output::OutputCapture;
use super::plugin::ExportIndices;
use super::state::{CallCtx, HostState, MemoryLimiter, PluginCtx};
use super::stats::Stats;
use super::Isolation;

/// Bytes of stdout and of stderr kept per call.
const OUTPUT_CAP: usize = 64 << 10;

/// The loaded exports of one instance.
pub(crate) struct WorkerExports {
    pub route: Option<route::Guest>,
    pub api: Option<api::Guest>,
    pub subscriber: Option<subscriber::Guest>,
    pub task: Option<task::Guest>,
}

pub(crate) struct Worker {
    store: Store<HostState>,
    exports: WorkerExports,
}

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
}

pub(crate) struct Pool {
    pre: InstancePre<HostState>,
    indices: ExportIndices,
    ctx: Arc<PluginCtx>,
    idle: Mutex<Vec<Worker>>,
    permits: Semaphore,
    stats: Arc<Stats>,
}

impl Pool {
    pub fn new(pre: InstancePre<HostState>, indices: ExportIndices, ctx: Arc<PluginCtx>, stats: Arc<Stats>) -> Self {
        let max = ctx.spec.limits.max_instances.max(1);
        Pool { pre, indices, ctx, idle: Mutex::new(Vec::new()), permits: Semaphore::new(max), stats }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        // Pushing or popping a Vec cannot be left half-done by a panic.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }

    /// Makes `n` instances ahead of traffic; in per-call isolation they
    /// only prove that the plugin instantiates, and are dropped.
    pub async fn warm(&self, n: usize, isolation: Isolation) -> Result<(), Cause> {
        for _ in 0..n {
            let worker = self.instantiate().await?;
            if isolation == Isolation::Reuse {
                self.idle().push(worker);
            }
        }
        Ok(())
    }

    /// Waits for a free instance (at most the call's deadline) and prepares
    /// it for a call of `target`.
    pub async fn acquire(&self, target: &str, depth: u32, is_task: bool) -> Result<Lease<'_>, Cause> {
        let limits = &self.ctx.spec.limits;
        let started = Instant::now();
        let permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => match tokio::time::timeout(limits.deadline, self.permits.acquire()).await {
                Ok(Ok(permit)) => permit,
                _ => return Err(Cause::Busy { waited: started.elapsed() }),
            },
        };
        let reused = match limits.isolation {
            Isolation::Reuse => self.idle().pop(),
            Isolation::PerCall => None,
        };
        let mut worker = match reused {
            Some(worker) => worker,
            None => self.instantiate().await?,
        };
        worker.begin(target, depth, is_task, limits.fuel, self.ctx.deadline_ticks)?;
        Ok(Lease { pool: self, worker: Some(worker), started, _permit: permit })
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
            limiter: MemoryLimiter { cap: spec.limits.memory_bytes, refused: None },
            plugin: self.ctx.clone(),
            call: CallCtx { target: "(instantiation)".into(), ..Default::default() },
            stdout,
            stderr,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        let host = |e: wasmtime::Error| Cause::Host { message: chain(&e) };
        store.set_fuel(spec.limits.fuel).map_err(host)?;
        store.set_epoch_deadline(self.ctx.deadline_ticks);
        let instance: Instance = match self.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            Err(e) => {
                let (stderr, _) = store.data().stderr.take();
                return Err(classify(&e, store.data(), &stderr));
            }
        };
        let exports = self.indices.load(&mut store, &instance).map_err(host)?;
        self.stats.instantiated();
        Ok(Worker { store, exports })
    }
}

impl Worker {
    fn begin(&mut self, target: &str, depth: u32, is_task: bool, fuel: u64, ticks: u64) -> Result<(), Cause> {
        self.store.set_fuel(fuel).map_err(|e| Cause::Host { message: chain(&e) })?;
        self.store.set_epoch_deadline(ticks);
        let data = self.store.data_mut();
        data.limiter.refused = None;
        data.call = CallCtx { target: target.to_string(), depth, is_task, ..Default::default() };
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

/// One call's hold on one instance.
pub(crate) struct Lease<'p> {
    pool: &'p Pool,
    worker: Option<Worker>,
    started: Instant,
    _permit: SemaphorePermit<'p>,
}

impl Lease<'_> {
    /// The store and the exports to make the call with.
    pub fn parts(&mut self) -> Option<(&mut Store<HostState>, &WorkerExports)> {
        self.worker.as_mut().map(|w| (&mut w.store, &w.exports))
    }

    /// Ends the call: classifies a failure, logs output, counts, and returns
    /// the instance to the pool or drops it.
    pub fn finish<T>(mut self, outcome: Result<T, Failure>) -> (Result<T, Cause>, CallReport) {
        let elapsed = self.started.elapsed();
        let Some(mut worker) = self.worker.take() else {
            let cause = Cause::Host { message: "lease finished twice".into() };
            return (Err(cause), CallReport { elapsed, fuel: 0 });
        };
        let pool = self.pool;
        let limits = &pool.ctx.spec.limits;
        let fuel = limits.fuel.saturating_sub(worker.store.get_fuel().unwrap_or(0));
        let stderr = worker.flush_output();
        let result = match outcome {
            Ok(value) => Ok(value),
            Err(Failure::Guest(message)) => Err(Cause::Guest { message }),
            Err(Failure::Wasm(e)) => Err(classify(&e, worker.store.data(), &stderr)),
        };
        let data = worker.store.data();
        pool.stats.record(elapsed, fuel, result.as_ref().err());
        match result.as_ref().err() {
            Some(cause) if cause.poisons_instance() => tracing::warn!(
                plugin = %pool.ctx.spec.name,
                route = %data.call.target,
                cause = %cause.kind(),
                "call failed: {cause}; instance discarded"
            ),
            Some(cause) => tracing::debug!(plugin = %pool.ctx.spec.name, route = %data.call.target, "call failed: {cause}"),
            None => {}
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
        if let Some(warn) = limits.warn_after.filter(|w| elapsed > *w) {
            tracing::warn!(
                plugin = %pool.ctx.spec.name,
                target = %data.call.target,
                elapsed_us = elapsed.as_micros() as u64,
                threshold_us = warn.as_micros() as u64,
                "call slower than its threshold"
            );
        }
        let poisoned = result.as_ref().err().is_some_and(Cause::poisons_instance);
        if poisoned {
            pool.stats.discarded();
        } else if limits.isolation == Isolation::Reuse {
            pool.idle().push(worker);
        }
        (result, CallReport { elapsed, fuel })
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.worker.take().is_some() {
            self.pool.stats.discarded();
        }
    }
}

/// Names the cause of a wasmtime error, using what the store saw.
fn classify(e: &wasmtime::Error, state: &HostState, stderr: &str) -> Cause {
    let limits = &state.plugin.spec.limits;
    if let Some(requested) = state.limiter.refused {
        return Cause::MemoryCap { cap: limits.memory_bytes, requested };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Cause::OutOfFuel { fuel: limits.fuel },
        Some(Trap::Interrupt) => Cause::Deadline { limit: limits.deadline },
        Some(Trap::StackOverflow) => Cause::StackOverflow,
        Some(Trap::UnreachableCodeReached) if stderr.contains("panicked at") => {
            Cause::Panic { message: panic_message(stderr) }
        }
        Some(trap) => Cause::Trap { message: trap.to_string() },
        None => Cause::Host { message: chain(e) },
    }
}

/// "msg (at file:line:col)" from a Rust panic report on stderr.
fn panic_message(stderr: &str) -> String {
    let Some(start) = stderr.find("panicked at ") else { return stderr.trim().to_string() };
    let rest = &stderr[start + "panicked at ".len()..];
    let mut lines = rest.lines();
    let location = lines.next().unwrap_or("").trim_end_matches(':');
    let message: Vec<&str> = lines.take_while(|l| !l.starts_with("note: ")).collect();
    format!("{} (at {location})", message.join(" ").trim())
}

#[cfg(test)]
mod tests {
    #[test]
    fn panic_message_keeps_text_and_location() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:40:24:\nboom now\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(super::panic_message(stderr), "boom now (at src/lib.rs:40:24)");
    }
}
