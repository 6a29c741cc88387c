//! The dispatcher: route name → handlers (plugins, or remote targets a
//! front-end registered), API command → provider (the host, a front-end or
//! a plugin); loading, reloading and unloading plugins.
//!
//! A request's way: a front-end builds a [`Request`] and calls
//! [`Dispatcher::run_route`] (`routes.rs`); the route's handlers run in
//! priority order, a plugin's through its current version's pool
//! (`runtime::PluginVersion::handle`, where it becomes a wasm call); the
//! [`RouteOutcome`] goes back to the front-end, which answers on its wire.
//!
//! Invariants:
//! - The routing table is immutable and swapped whole: a call sees one
//!   consistent table from its start to its end.
//! - A plugin's current version lives in its slot and is swapped
//!   atomically; a call holds the version it started on, so calls in flight
//!   during a reload finish on the old version and none is lost.
//! - Admin changes (load, reload, unload, a front-end's routes and
//!   commands) are serialised; one that fails any check (compile,
//!   instantiate, exports the routes need, command names) changes nothing,
//!   and the old version keeps serving.
//! - Plugins reach the dispatcher (commands, events) through a weak link,
//!   so the dispatcher and its plugins do not keep each other alive.
//! - The dispatcher names no wire protocol: remote targets, commands and
//!   fetchers are traits the front-ends implement.

mod admin;
mod commands;
mod link;
mod routes;
mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Instant, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;

pub use commands::{Command, CommandError, HostCommand};
pub use link::{Fetcher, MessageEngine};
pub use routes::{RemoteError, RemoteHandler};
pub use table::{Need, RemoteRoute};

use crate::bus::{Bus, BusError};
use crate::config::{CodeSource, Config, Tenant};
use crate::kv::KvStore;
use crate::runtime::{
    CallError, CallReport, Export, LoadError, PluginVersion, Reply, Runtime, Services, Stats, StatsSnapshot,
    TraceSwitch,
};
use crate::sync::lock;
use table::{Spec, Table};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// Kamailio's text for an unknown `evrexec.run` route.
    #[error("Event route not found")]
    RouteNotFound(String),
    #[error("no command `{0}`")]
    CommandNotFound(String),
    #[error("no plugin `{0}`")]
    PluginNotFound(String),
    #[error("a plugin named `{0}` is already loaded")]
    PluginExists(String),
    #[error("route `{route}` has plugin `{plugin}` as a handler already")]
    RouteExists { route: String, plugin: String },
    #[error("route `{route}` has no handler `{plugin}`")]
    RouteHandlerNotFound { route: String, plugin: String },
    #[error("plugin `{plugin}` is in use by {by}")]
    InUse { plugin: String, by: String },
    #[error("command `{command}` of plugin `{plugin}` is already offered by `{other}`")]
    CommandConflict { command: String, plugin: String, other: String },
    #[error("command `{0}` is offered twice by the host")]
    HostCommandConflict(String),
    /// Boxed: a failed call is the rare case, and a small `Result` keeps
    /// the hot path's moves cheap.
    #[error(transparent)]
    Call(Box<CallError>),
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A route handled by a remote target failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A plugin's place in the dispatcher; outlives its versions.
pub struct Slot {
    pub name: Arc<str>,
    current: ArcSwap<PluginVersion>,
    code: Mutex<CodeSource>,
    stats: Arc<Stats>,
    /// `plugin.trace`: kept across versions, as the stats are.
    trace: Arc<TraceSwitch>,
    reloads: AtomicU64,
    /// Woken when the current version is replaced or the plugin unloaded,
    /// so long-running exec tasks move to the new version.
    pub swapped: tokio::sync::Notify,
}

impl Slot {
    fn new(
        name: &str,
        version: Arc<PluginVersion>,
        code: CodeSource,
        stats: Arc<Stats>,
        trace: Arc<TraceSwitch>,
    ) -> Slot {
        Slot {
            name: name.into(),
            current: ArcSwap::new(version),
            code: Mutex::new(code),
            stats,
            trace,
            reloads: AtomicU64::new(0),
            swapped: tokio::sync::Notify::new(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn current(&self) -> Arc<PluginVersion> {
        self.current.load_full()
    }

    fn code(&self) -> CodeSource {
        lock(&self.code).clone()
    }
}

/// What `run_route` returns: the deciding reply and who gave it.
pub struct RouteOutcome {
    pub reply: Reply,
    /// The plugin, or the remote target's name.
    pub plugin: Arc<str>,
    pub report: CallReport,
    /// The plugin version that replied (None: a remote target), whose kv
    /// journal `saved` waits on.
    pub(crate) version: Option<Arc<PluginVersion>>,
}

impl std::fmt::Debug for RouteOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteOutcome")
            .field("reply", &self.reply)
            .field("plugin", &self.plugin)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl RouteOutcome {
    /// Whether the reply must wait for `saved` before it leaves.
    pub fn unsaved(&self) -> bool {
        self.report.kv_ticket != crate::kv::Ticket::NONE
    }

    /// Waits until the kv writes the call made (or read) are durable; an
    /// error if they cannot be, and then the reply must not be sent.
    pub async fn saved(self, route: &str) -> Result<RouteOutcome, DispatchError> {
        let Some(version) = self.version.clone().filter(|_| self.unsaved()) else {
            return Ok(self);
        };
        let RouteOutcome { reply, plugin, report, version: v } = self;
        match version.acknowledge("route", route, (Ok(reply), report)).await {
            (Ok(reply), report) => Ok(RouteOutcome { reply, plugin, report, version: v }),
            (Err(e), _) => Err(DispatchError::Call(Box::new(e))),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub tenant: String,
    pub source: String,
    pub hash: String,
    pub exports: Vec<&'static str>,
    pub commands: Vec<String>,
    pub isolation: &'static str,
    pub idle_instances: usize,
    pub max_instances: usize,
    pub reloads: u64,
    /// Whether its calls log each import they make (`plugin.trace`).
    pub trace: bool,
    pub loaded_at: u64,
    pub stats: StatsSnapshot,
}

#[derive(Debug, Serialize)]
pub struct RouteInfo {
    pub name: String,
    /// (plugin or remote target, priority), in the order they run.
    pub handlers: Vec<(String, i32)>,
}

pub struct Dispatcher {
    runtime: Arc<Runtime>,
    kv: KvStore,
    tenants: HashMap<String, Tenant>,
    table: ArcSwap<Table>,
    admin: tokio::sync::Mutex<()>,
    bus: Arc<Bus>,
    link: Arc<dyn Services>,
    started: Instant,
    fetcher: OnceLock<Arc<dyn Fetcher>>,
    engine: OnceLock<Arc<dyn MessageEngine>>,
    /// Bumped each time a table is published.
    generation: tokio::sync::watch::Sender<u64>,
    /// The blake3 hash of each plugin file as it was when last loaded.
    digests: std::sync::Mutex<HashMap<crate::config::FileIdentity, blake3::Hash>>,
}

impl Dispatcher {
    /// `start_with` on a kv store in memory.
    pub async fn start(runtime: Arc<Runtime>, config: &Config) -> Result<Arc<Dispatcher>, DispatchError> {
        Dispatcher::start_with(runtime, config, KvStore::default()).await
    }

    /// Loads every configured plugin and binds the routes; exec tasks need
    /// their plugin's `task` export. Must run inside a tokio runtime
    /// (subscriptions spawn delivery tasks).
    pub async fn start_with(
        runtime: Arc<Runtime>,
        config: &Config,
        kv: KvStore,
    ) -> Result<Arc<Dispatcher>, DispatchError> {
        let bus = Bus::new(config.events.queue);
        let dispatcher = Arc::new_cyclic(|me: &Weak<Dispatcher>| Dispatcher {
            runtime,
            kv,
            tenants: config.tenants.clone(),
            table: ArcSwap::from_pointee(Table::default()),
            admin: tokio::sync::Mutex::new(()),
            bus,
            link: Arc::new(link::Link(me.clone())),
            started: Instant::now(),
            fetcher: OnceLock::new(),
            engine: OnceLock::new(),
            generation: tokio::sync::watch::Sender::new(0),
            digests: Default::default(),
        });
        let mut spec = Spec::default();
        for def in &config.plugins {
            let stats = Arc::new(Stats::default());
            let trace = Arc::new(TraceSwitch::new(def.spec.trace));
            let version = dispatcher
                .load_version(def, stats.clone(), trace.clone())
                .await
                .inspect_err(|e| dispatcher.plugin_event("PLUGIN_FAIL", &def.spec.name, &crate::error::chain(e)))?;
            dispatcher.plugin_event("PLUGIN_LOAD", &def.spec.name, version.short_hash());
            let slot = Slot::new(&def.spec.name, version, def.code.clone(), stats, trace);
            spec.plugins.insert(def.spec.name.clone(), Arc::new(slot));
        }
        spec.needs = config
            .exec
            .iter()
            .map(|e| Need { plugin: e.plugin.clone(), export: Export::Task, by: format!("exec task `{}`", e.name) })
            .collect();
        spec.route_defs = config.routes.clone();
        dispatcher.publish(Table::build(spec, None)?);
        Ok(dispatcher)
    }

    /// The front-end that answers plugins' `fetch` import.
    pub fn set_fetcher(&self, fetcher: Arc<dyn Fetcher>) {
        let _ = self.fetcher.set(fetcher);
    }

    /// The front-end that carries plugins' `messages` import to an engine.
    pub fn set_message_engine(&self, engine: Arc<dyn MessageEngine>) {
        let _ = self.engine.set(engine);
    }

    /// Swaps in a new table and tells those watching.
    fn publish(&self, table: Table) {
        self.table.store(Arc::new(table));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes each time routes, plugins or commands change (a load,
    /// reload or unload), for front-ends that mirror the routes elsewhere.
    pub fn watch_routes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether `route` has at least one handler now.
    pub fn has_route(&self, route: &str) -> bool {
        self.table.load().routes.get(route).is_some_and(|h| !h.is_empty())
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// A configured tenant's kv space (made with its limits if no plugin
    /// of the tenant's has used it yet).
    pub fn kv_space(&self, tenant: &str) -> Option<Arc<crate::kv::KvSpace>> {
        let limits = self.tenants.get(tenant)?.kv;
        Some(self.kv.space(tenant, limits))
    }

    /// Periodic work: idle instances past their time are dropped (pools
    /// scale down) and expired subscriptions removed.
    pub fn housekeeping(&self) {
        for slot in self.slots() {
            slot.current().shrink_idle();
        }
        self.bus.housekeeping();
    }

    pub fn plugin(&self, name: &str) -> Option<Arc<PluginVersion>> {
        self.table.load().spec.plugins.get(name).map(|s| s.current())
    }

    pub fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.table.load().spec.plugins.get(name).cloned()
    }

    /// Switches a plugin's call tracing; its next call sees it.
    pub fn set_trace(&self, name: &str, on: bool) -> Result<(), DispatchError> {
        let slot = self.slot(name).ok_or_else(|| DispatchError::PluginNotFound(name.to_string()))?;
        slot.trace.set(on);
        tracing::info!(plugin = %name, on, "trace switched");
        Ok(())
    }

    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.table.load().spec.plugins.values().cloned().collect()
    }

    pub fn plugins(&self) -> Vec<PluginInfo> {
        self.slots()
            .into_iter()
            .map(|slot| {
                let v = slot.current();
                PluginInfo {
                    name: slot.name.to_string(),
                    tenant: v.spec.tenant.clone(),
                    source: v.spec.source.clone(),
                    hash: v.short_hash().to_string(),
                    exports: v.exports().iter().map(|e| e.name()).collect(),
                    commands: v.commands().iter().map(|c| c.name.clone()).collect(),
                    isolation: v.spec.limits.isolation.as_str(),
                    idle_instances: v.idle_instances(),
                    max_instances: v.spec.limits.max_instances,
                    reloads: slot.reloads.load(Relaxed),
                    trace: slot.trace.is_on(),
                    loaded_at: v.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    stats: slot.stats.snapshot(),
                }
            })
            .collect()
    }

    pub fn routes(&self) -> Vec<RouteInfo> {
        self.table
            .load()
            .routes
            .iter()
            .map(|(name, handlers)| RouteInfo {
                name: name.clone(),
                handlers: handlers.iter().map(|h| (h.target.name().to_string(), h.priority)).collect(),
            })
            .collect()
    }

    fn tenant(&self, plugin: &str) -> Option<Tenant> {
        let version = self.plugin(plugin)?;
        self.tenants.get(&version.spec.tenant).cloned()
    }
}
