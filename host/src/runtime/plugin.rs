//! A plugin version: one compiled component, what it exports, its pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use wasmtime::component::{Instance, InstancePre};
use wasmtime::AsContextMut;

use super::bindings::{api, route, subscriber, task, CommandInfo, Event, Reply, Request};
use super::cache::CacheOutcome;
use super::error::{CallError, Cause};
use super::limits::{Capabilities, Limits, Preopen};
use super::pool::{CallReport, Failure, Pool, WorkerExports};
use super::state::HostState;
use super::stats::Stats;

/// Everything configured about a plugin but its code.
#[derive(Clone, Debug)]
pub struct PluginSpec {
    pub name: String,
    pub tenant: String,
    /// Where the code comes from: a path, or `builtin:NAME`.
    pub source: String,
    pub limits: Limits,
    pub capabilities: Capabilities,
    /// The `[plugin.config]` table, read through the `config` import.
    pub config: BTreeMap<String, String>,
    pub preopens: Vec<Preopen>,
    /// E_PROFILING_SCRIPT records for each route call.
    pub profiling: bool,
}

/// The four export interfaces a plugin may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    Route,
    Api,
    Subscriber,
    Task,
}

impl Export {
    pub const ALL: [Export; 4] = [Export::Route, Export::Api, Export::Subscriber, Export::Task];

    pub fn name(self) -> &'static str {
        match self {
            Export::Route => "route",
            Export::Api => "api",
            Export::Subscriber => "subscriber",
            Export::Task => "task",
        }
    }

    pub fn interface(self) -> &'static str {
        match self {
            Export::Route => "evrhost:plugin/route@0.1.0",
            Export::Api => "evrhost:plugin/api@0.1.0",
            Export::Subscriber => "evrhost:plugin/subscriber@0.1.0",
            Export::Task => "evrhost:plugin/task@0.1.0",
        }
    }
}

/// Where each export a plugin has lives, resolved once per version.
#[derive(Clone)]
pub(crate) struct ExportIndices {
    route: Option<route::GuestIndices>,
    api: Option<api::GuestIndices>,
    subscriber: Option<subscriber::GuestIndices>,
    task: Option<task::GuestIndices>,
}

impl ExportIndices {
    /// Looks each interface up by name; one present with another shape (a
    /// plugin built against an incompatible contract) is an error.
    pub fn new(pre: &InstancePre<HostState>) -> Result<Self, String> {
        let engine = pre.engine();
        let exported: Vec<String> =
            pre.component().component_type().exports(engine).map(|(name, _)| name.to_string()).collect();
        let has = |e: Export| exported.iter().any(|n| n == e.interface());
        fn lookup<T>(present: bool, e: Export, r: wasmtime::Result<T>) -> Result<Option<T>, String> {
            match (present, r) {
                (false, _) => Ok(None),
                (true, Ok(indices)) => Ok(Some(indices)),
                (true, Err(err)) => Err(format!("export `{}` does not match the contract: {err:#}", e.interface())),
            }
        }
        Ok(ExportIndices {
            route: lookup(has(Export::Route), Export::Route, route::GuestIndices::new(pre))?,
            api: lookup(has(Export::Api), Export::Api, api::GuestIndices::new(pre))?,
            subscriber: lookup(has(Export::Subscriber), Export::Subscriber, subscriber::GuestIndices::new(pre))?,
            task: lookup(has(Export::Task), Export::Task, task::GuestIndices::new(pre))?,
        })
    }

    pub fn has(&self, e: Export) -> bool {
        match e {
            Export::Route => self.route.is_some(),
            Export::Api => self.api.is_some(),
            Export::Subscriber => self.subscriber.is_some(),
            Export::Task => self.task.is_some(),
        }
    }

    pub(crate) fn load(&self, mut store: impl AsContextMut, instance: &Instance) -> wasmtime::Result<WorkerExports> {
        Ok(WorkerExports {
            route: self.route.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            api: self.api.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            subscriber: self.subscriber.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            task: self.task.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
        })
    }
}

/// One loaded version of a plugin. Calls in flight hold an `Arc` to the
/// version they started on, so a reload never cuts them short.
pub struct PluginVersion {
    pub spec: Arc<PluginSpec>,
    /// BLAKE3 of the wasm bytes, hex.
    pub hash: String,
    pub cache: CacheOutcome,
    pub loaded_at: SystemTime,
    exports: Vec<Export>,
    commands: Vec<CommandInfo>,
    pub(crate) pool: Pool,
    pub stats: Arc<Stats>,
}

/// A call's result and what it cost.
pub type Outcome<T> = (Result<T, CallError>, CallReport);

impl PluginVersion {
    pub(crate) fn new(
        spec: Arc<PluginSpec>,
        hash: String,
        cache: CacheOutcome,
        indices: &ExportIndices,
        pool: Pool,
        stats: Arc<Stats>,
    ) -> Self {
        let exports = Export::ALL.into_iter().filter(|e| indices.has(*e)).collect();
        PluginVersion { spec, hash, cache, loaded_at: SystemTime::now(), exports, commands: Vec::new(), pool, stats }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The first 16 hex digits of the hash, to name a version in logs.
    pub fn short_hash(&self) -> &str {
        self.hash.get(..16).unwrap_or(&self.hash)
    }

    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    pub fn has_export(&self, e: Export) -> bool {
        self.exports.contains(&e)
    }

    /// The commands the plugin offered when it loaded.
    pub fn commands(&self) -> &[CommandInfo] {
        &self.commands
    }

    pub fn idle_instances(&self) -> usize {
        self.pool.idle_count()
    }

    /// Drops instances idle longer than `idle_after`, down to the minimum.
    pub fn shrink_idle(&self) {
        self.pool.shrink_idle();
    }

    fn error(&self, what: &'static str, target: &str, cause: Cause) -> CallError {
        CallError { plugin: self.spec.name.clone(), what, target: target.to_string(), cause }
    }

    fn missing(e: Export) -> Failure {
        Failure::Wasm(wasmtime::format_err!("the plugin does not export `{}`", e.interface()))
    }

    /// Calls the route handler. `depth` counts nested command calls.
    pub async fn handle(&self, request: &Request, depth: u32) -> Outcome<Reply> {
        let route = &request.route;
        let mut lease = match self.pool.acquire(route, depth, false).await {
            Ok(lease) => lease,
            Err(cause) => return (Err(self.error("route", route, cause)), CallReport::default()),
        };
        let outcome = match lease.parts() {
            Some((store, WorkerExports { route: Some(guest), .. })) => match guest.call_handle(store, request).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(message)) => Err(Failure::Guest(message)),
                Err(e) => Err(Failure::Wasm(e)),
            },
            _ => Err(Self::missing(Export::Route)),
        };
        let (result, report) = lease.finish(outcome);
        let result = result.and_then(|reply| {
            let size = reply.retval.len()
                + reply.params.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                + reply.data.as_ref().map_or(0, Vec::len);
            let cap = self.spec.limits.max_reply_bytes;
            if size > cap {
                let cause = Cause::ReplyTooLarge { size, cap };
                self.stats.error(&cause);
                return Err(cause);
            }
            Ok(reply)
        });
        (result.map_err(|cause| self.error("route", route, cause)), report)
    }

    /// Runs one of the plugin's API commands.
    pub async fn execute(&self, command: &str, args: &str, depth: u32) -> Outcome<String> {
        let mut lease = match self.pool.acquire(command, depth, false).await {
            Ok(lease) => lease,
            Err(cause) => return (Err(self.error("command", command, cause)), CallReport::default()),
        };
        let outcome = match lease.parts() {
            Some((store, WorkerExports { api: Some(guest), .. })) => {
                match guest.call_execute(store, command, args).await {
                    Ok(Ok(text)) => Ok(text),
                    Ok(Err(message)) => Err(Failure::Guest(message)),
                    Err(e) => Err(Failure::Wasm(e)),
                }
            }
            _ => Err(Self::missing(Export::Api)),
        };
        let (result, report) = lease.finish(outcome);
        (result.map_err(|cause| self.error("command", command, cause)), report)
    }

    /// Delivers an event to the subscriber export.
    pub async fn on_event(&self, event: &Event) -> Outcome<()> {
        let name = &event.name;
        let mut lease = match self.pool.acquire(name, 0, false).await {
            Ok(lease) => lease,
            Err(cause) => return (Err(self.error("event", name, cause)), CallReport::default()),
        };
        let outcome = match lease.parts() {
            Some((store, WorkerExports { subscriber: Some(guest), .. })) => {
                guest.call_on_event(store, event).await.map_err(Failure::Wasm)
            }
            _ => Err(Self::missing(Export::Subscriber)),
        };
        let (result, report) = lease.finish(outcome);
        (result.map_err(|cause| self.error("event", name, cause)), report)
    }

    /// Runs the task export for one exec worker.
    pub async fn run_task(&self, name: &str, worker: &str) -> Outcome<()> {
        let mut lease = match self.pool.acquire(name, 0, true).await {
            Ok(lease) => lease,
            Err(cause) => return (Err(self.error("task", name, cause)), CallReport::default()),
        };
        let outcome = match lease.parts() {
            Some((store, WorkerExports { task: Some(guest), .. })) => match guest.call_run(store, worker).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(message)) => Err(Failure::Guest(message)),
                Err(e) => Err(Failure::Wasm(e)),
            },
            _ => Err(Self::missing(Export::Task)),
        };
        let (result, report) = lease.finish(outcome);
        (result.map_err(|cause| self.error("task", name, cause)), report)
    }

    /// Asks the api export for its commands; called once, at load.
    pub(crate) async fn read_commands(&mut self) -> Result<(), Cause> {
        if !self.has_export(Export::Api) {
            return Ok(());
        }
        let mut lease = self.pool.acquire("(commands)", 0, false).await?;
        let outcome = match lease.parts() {
            Some((store, WorkerExports { api: Some(guest), .. })) => {
                guest.call_commands(store).await.map_err(Failure::Wasm)
            }
            _ => Err(Self::missing(Export::Api)),
        };
        let (result, _) = lease.finish(outcome);
        self.commands = result?;
        Ok(())
    }
}
