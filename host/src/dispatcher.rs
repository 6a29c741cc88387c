//! Routes and commands to plugins; loading, reloading and unloading them.
//!
//! Invariants:
//! - The routing table is immutable and swapped whole: a call sees one
//!   consistent table from its start to its end.
//! - A plugin's current version lives in its slot and is swapped
//!   atomically; a call holds the version it started on, so calls in flight
//!   during a reload finish on the old version and none is lost.
//! - Admin changes (load, reload, unload) are serialised; one that fails any
//!   check (compile, instantiate, exports the routes need, command names)
//!   changes nothing, and the old version keeps serving.
//! - Plugins reach the dispatcher (commands, events) through a weak link,
//!   so the dispatcher and its plugins do not keep each other alive.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::bus::{self, Bus, Caller, Profiler, Target};
use crate::config::{CodeSource, Config, ErlangTarget, ExecKind, PluginDef, RouteDef, Tenant};
use crate::kv::KvStore;
use crate::runtime::{
    CallError, CallReport, Event, Export, FetchQuery, HostError, LoadError, PluginSpec, PluginVersion, Reply, Request,
    Runtime, Services, Stats, StatsSnapshot,
};

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
    #[error("plugin `{plugin}` is in use by {by}")]
    InUse { plugin: String, by: String },
    #[error("command `{command}` of plugin `{plugin}` is already offered by `{other}`")]
    CommandConflict { command: String, plugin: String, other: String },
    /// Boxed: a failed call is the rare case, and a small `Result` keeps
    /// the hot path's moves cheap.
    #[error(transparent)]
    Call(Box<CallError>),
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A route handled by an Erlang process failed.
    #[error("{0}")]
    Remote(String),
    #[error("{0}")]
    Command(String),
}

/// Answers plugins' `fetch` import: the Erlang front-end, asking the
/// processes bound to a section.
#[async_trait::async_trait]
pub trait Fetcher: Send + Sync + 'static {
    async fn fetch(&self, query: &FetchQuery) -> Result<String, HostError>;
}

/// Runs routes whose handler is an Erlang process.
#[async_trait::async_trait]
pub trait RemoteRoutes: Send + Sync + 'static {
    async fn run(&self, route: &str, target: &ErlangTarget, request: &Request) -> Result<Reply, String>;
}

/// An API command a front-end adds (`erlang listeners`, …): args → text.
pub type CommandFn = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// A plugin's place in the dispatcher; outlives its versions.
pub struct Slot {
    pub name: Arc<str>,
    current: ArcSwap<PluginVersion>,
    code: Mutex<CodeSource>,
    stats: Arc<Stats>,
    reloads: AtomicU64,
    /// Woken when the current version is replaced or the plugin unloaded,
    /// so long-running exec tasks move to the new version.
    pub swapped: tokio::sync::Notify,
}

impl Slot {
    fn new(name: &str, version: Arc<PluginVersion>, code: CodeSource, stats: Arc<Stats>) -> Slot {
        Slot {
            name: name.into(),
            current: ArcSwap::new(version),
            code: Mutex::new(code),
            stats,
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
        self.code.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Handler {
    priority: i32,
    slot: Arc<Slot>,
}

/// An export some part of the configuration relies on, besides routes
/// (which need `route`): exec tasks need `task`.
#[derive(Clone, Debug)]
pub struct Need {
    pub plugin: String,
    pub export: Export,
    /// What needs it, for the error: "exec task `evrexec:timer`".
    pub by: String,
}

#[derive(Default)]
struct Table {
    plugins: BTreeMap<String, Arc<Slot>>,
    routes: BTreeMap<String, Vec<Handler>>,
    commands: BTreeMap<String, Arc<Slot>>,
    route_defs: Vec<RouteDef>,
    needs: Vec<Need>,
}

/// Built-in API commands, answered by the host itself.
const BUILTINS: [(&str, &str, &str); 5] = [
    ("version", "", "evrhost and wasmtime versions"),
    ("status", "", "uptime, plugins, routes"),
    ("plugin.list", "", "the loaded plugins, one a line"),
    ("plugin.reload", "NAME", "reload a plugin from where it came from"),
    ("route.list", "", "the routes and their handlers, one a line"),
];

impl Table {
    /// Binds routes and commands to slots. Refuses a route or need whose
    /// plugin lacks the export, and two plugins offering one command.
    /// `candidate` stands in for one plugin's current version, so that a
    /// reload is checked before anything is swapped.
    fn build(
        plugins: BTreeMap<String, Arc<Slot>>,
        route_defs: Vec<RouteDef>,
        needs: Vec<Need>,
        candidate: Option<(&str, &Arc<PluginVersion>)>,
    ) -> Result<Table, DispatchError> {
        let version = |slot: &Slot| match candidate {
            Some((name, v)) if *name == *slot.name => v.clone(),
            _ => slot.current(),
        };
        let route_needs = route_defs.iter().map(|def| Need {
            plugin: def.plugin.clone(),
            export: Export::Route,
            by: format!("route `{}`", def.name),
        });
        for need in route_needs.chain(needs.iter().cloned()) {
            let slot = plugins.get(&need.plugin).ok_or_else(|| DispatchError::PluginNotFound(need.plugin.clone()))?;
            if !version(slot).has_export(need.export) {
                return Err(LoadError::MissingExport {
                    plugin: need.plugin.clone(),
                    export: need.export.interface(),
                    needed_by: need.by.clone(),
                }
                .into());
            }
        }
        let mut routes: BTreeMap<String, Vec<Handler>> = BTreeMap::new();
        for def in &route_defs {
            if let Some(slot) = plugins.get(&def.plugin) {
                routes
                    .entry(def.name.clone())
                    .or_default()
                    .push(Handler { priority: def.priority, slot: slot.clone() });
            }
        }
        for handlers in routes.values_mut() {
            handlers.sort_by_key(|h| h.priority);
        }
        let mut commands: BTreeMap<String, Arc<Slot>> = BTreeMap::new();
        for slot in plugins.values() {
            for info in version(slot).commands() {
                let taken_by = if BUILTINS.iter().any(|(n, _, _)| *n == info.name) {
                    Some("evrhost (built-in)".to_string())
                } else {
                    commands.get(&info.name).map(|other| other.name.to_string())
                };
                if let Some(other) = taken_by {
                    return Err(DispatchError::CommandConflict {
                        command: info.name.clone(),
                        plugin: slot.name.to_string(),
                        other,
                    });
                }
                commands.insert(info.name.clone(), slot.clone());
            }
        }
        Ok(Table { plugins, routes, commands, route_defs, needs })
    }
}

/// What `run_route` returns: the deciding reply and who gave it.
#[derive(Debug)]
pub struct RouteOutcome {
    pub reply: Reply,
    pub plugin: Arc<str>,
    pub report: CallReport,
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
    pub loaded_at: u64,
    pub stats: StatsSnapshot,
}

#[derive(Debug, Serialize)]
pub struct RouteInfo {
    pub name: String,
    /// (plugin, priority), in the order they run.
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
    /// Routes whose handler is an Erlang process.
    remote_routes: BTreeMap<String, ErlangTarget>,
    remote: std::sync::OnceLock<Arc<dyn RemoteRoutes>>,
    fetcher: std::sync::OnceLock<Arc<dyn Fetcher>>,
    /// Commands front-ends add: name → (usage, description, run).
    extensions: Mutex<BTreeMap<String, (String, String, CommandFn)>>,
}

impl Dispatcher {
    /// Loads every configured plugin and binds the routes; exec tasks need
    /// their plugin's `task` export. Must run inside a tokio runtime
    /// (subscriptions spawn delivery tasks).
    pub async fn start(runtime: Arc<Runtime>, config: &Config) -> Result<Arc<Dispatcher>, DispatchError> {
        let bus = Bus::new(config.events.queue);
        let dispatcher = Arc::new_cyclic(|me: &Weak<Dispatcher>| Dispatcher {
            runtime,
            kv: KvStore::default(),
            tenants: config.tenants.clone(),
            table: ArcSwap::from_pointee(Table::default()),
            admin: tokio::sync::Mutex::new(()),
            bus: bus.clone(),
            link: Arc::new(Link(me.clone())),
            started: Instant::now(),
            remote_routes: config.remote_routes.iter().cloned().collect(),
            remote: std::sync::OnceLock::new(),
            fetcher: std::sync::OnceLock::new(),
            extensions: Mutex::new(BTreeMap::new()),
        });
        bus.attach(Arc::downgrade(&dispatcher));
        let mut plugins = BTreeMap::new();
        for def in &config.plugins {
            let stats = Arc::new(Stats::default());
            let version = dispatcher
                .load_version(def, stats.clone())
                .await
                .inspect_err(|e| dispatcher.plugin_event("PLUGIN_FAIL", &def.spec.name, &e.to_string()))?;
            dispatcher.plugin_event("PLUGIN_LOAD", &def.spec.name, version.short_hash());
            plugins
                .insert(def.spec.name.clone(), Arc::new(Slot::new(&def.spec.name, version, def.code.clone(), stats)));
        }
        let needs = config
            .exec
            .iter()
            .filter_map(|e| match &e.kind {
                ExecKind::Task { plugin, .. } => {
                    Some(Need { plugin: plugin.clone(), export: Export::Task, by: format!("exec task `{}`", e.name) })
                }
                ExecKind::Udp(_) => None,
            })
            .collect();
        dispatcher.table.store(Arc::new(Table::build(plugins, config.routes.clone(), needs, None)?));
        Ok(dispatcher)
    }

    async fn load_version(&self, def: &PluginDef, stats: Arc<Stats>) -> Result<Arc<PluginVersion>, LoadError> {
        let name = &def.spec.name;
        let wasm = def.code.read().await.map_err(|source| LoadError::Read {
            plugin: name.clone(),
            path: def.code.describe(),
            source,
        })?;
        let limits = self.tenants.get(&def.spec.tenant).map(|t| t.kv).unwrap_or_default();
        let kv = self.kv.space(&def.spec.tenant, limits);
        self.runtime.load(def.spec.clone(), wasm, kv, self.link.clone(), stats).await
    }

    /// The Erlang front-end, once it runs: fetches and Erlang routes.
    pub fn set_fetcher(&self, fetcher: Arc<dyn Fetcher>) {
        let _ = self.fetcher.set(fetcher);
    }

    pub fn set_remote_routes(&self, remote: Arc<dyn RemoteRoutes>) {
        let _ = self.remote.set(remote);
    }

    /// Adds a front-end's API command (built-in names and plugins' commands
    /// are looked up first).
    pub fn add_command(&self, name: &str, usage: &str, description: &str, run: CommandFn) {
        self.extensions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (usage.to_string(), description.to_string(), run));
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

    /// PLUGIN_LOAD, PLUGIN_RELOAD or PLUGIN_FAIL.
    fn plugin_event(&self, name: &str, plugin: &str, detail: &str) {
        let detail_header = if name == "PLUGIN_FAIL" { "Error" } else { "Plugin-Hash" };
        self.bus.raise(
            name,
            vec![("Plugin", plugin.to_string()), (detail_header, detail.to_string())],
            &Caller::host("plugin admin"),
        );
    }

    /// Periodic work: idle instances past their time are dropped (pools
    /// scale down) and expired subscriptions removed.
    pub fn housekeeping(&self) {
        for slot in self.slots() {
            slot.current().shrink_idle();
        }
        self.bus.housekeeping();
    }

    /// Runs the route `request.route`: its handlers in priority order until
    /// one replies `handled`. A handler that fails is logged and the next
    /// one runs; the error is returned only when no handler replied at all.
    pub async fn run_route(&self, request: &Request) -> Result<RouteOutcome, DispatchError> {
        let route = request.route.as_str();
        let handlers: Vec<Arc<Slot>> = {
            // A guard, not an Arc: no shared count to bounce between cores.
            let table = self.table.load();
            let Some(handlers) = table.routes.get(route) else {
                drop(table);
                return self.run_remote(request).await;
            };
            if let [only] = handlers.as_slice() {
                let slot = only.slot.clone();
                drop(table);
                return self.run_one(&slot, request).await;
            }
            handlers.iter().map(|h| h.slot.clone()).collect()
        };
        let mut declined: Option<RouteOutcome> = None;
        let mut failed: Option<CallError> = None;
        for slot in &handlers {
            let (result, report) = slot.current().handle(request, 0).await;
            match result {
                Ok(reply) if reply.handled => return Ok(RouteOutcome { reply, plugin: slot.name.clone(), report }),
                Ok(reply) => declined = Some(RouteOutcome { reply, plugin: slot.name.clone(), report }),
                Err(e) => {
                    tracing::warn!(error = %e, "route handler failed; trying the next");
                    failed = Some(e);
                }
            }
        }
        match (declined, failed) {
            (Some(outcome), _) => Ok(outcome),
            (None, Some(e)) => Err(DispatchError::Call(Box::new(e))),
            (None, None) => Err(DispatchError::RouteNotFound(route.to_string())),
        }
    }

    /// A route whose handler is an Erlang process.
    async fn run_remote(&self, request: &Request) -> Result<RouteOutcome, DispatchError> {
        let route = request.route.as_str();
        let target = self.remote_routes.get(route).ok_or_else(|| DispatchError::RouteNotFound(route.to_string()))?;
        let remote =
            self.remote.get().ok_or_else(|| DispatchError::Remote("the Erlang front-end is not running".into()))?;
        let started = Instant::now();
        let reply = remote.run(route, target, request).await.map_err(|e| {
            tracing::warn!(route, target = %target, error = %e, "Erlang route failed");
            DispatchError::Remote(e)
        })?;
        let report = CallReport { elapsed: started.elapsed(), fuel: 0 };
        Ok(RouteOutcome { reply, plugin: format!("erlang:{target}").into(), report })
    }

    /// A route with one handler, the common case: its reply, handled or not.
    async fn run_one(&self, slot: &Arc<Slot>, request: &Request) -> Result<RouteOutcome, DispatchError> {
        let version = slot.current();
        let (result, report) = if version.spec.profiling && self.bus.wanted("E_PROFILING_SCRIPT") {
            let mut profiler = Profiler::start(&self.bus, "E_PROFILING_SCRIPT", &request.route);
            profiler.enter(&request.route, &slot.name, 0);
            let outcome = version.handle(request, 0).await;
            let status = match &outcome.0 {
                Ok(reply) if reply.handled => 1,
                Ok(_) => 0,
                Err(_) => -1,
            };
            profiler.exit(&request.route, &slot.name, 0, status);
            profiler.end(&request.route, status);
            outcome
        } else {
            version.handle(request, 0).await
        };
        match result {
            Ok(reply) => Ok(RouteOutcome { reply, plugin: slot.name.clone(), report }),
            Err(e) => Err(DispatchError::Call(Box::new(e))),
        }
    }

    /// Runs an API command: a built-in or one a plugin exports.
    pub async fn run_command(&self, command: &str, args: &str, depth: u32) -> Result<String, DispatchError> {
        if let Some(text) = self.builtin(command) {
            return Ok(text);
        }
        if command == "plugin.reload" {
            let version = self.reload(args.trim(), None).await?;
            return Ok(format!("+OK {} reloaded: {}", args.trim(), version.short_hash()));
        }
        let slot = self.table.load().commands.get(command).cloned();
        let Some(slot) = slot else {
            let extension = self.extensions.lock().unwrap_or_else(|p| p.into_inner()).get(command).map(|e| e.2.clone());
            return match extension {
                Some(run) => run(args).map_err(DispatchError::Command),
                None => Err(DispatchError::CommandNotFound(command.to_string())),
            };
        };
        let (result, _) = slot.current().execute(command, args, depth).await;
        result.map_err(|e| DispatchError::Call(Box::new(e)))
    }

    fn builtin(&self, command: &str) -> Option<String> {
        let table = self.table.load();
        Some(match command {
            "version" => format!("evrhost {} (wasmtime 48.0.8)", env!("CARGO_PKG_VERSION")),
            "status" => format!(
                "UP {} s, {} plugins, {} routes, {} commands",
                self.uptime().as_secs(),
                table.plugins.len(),
                table.routes.len(),
                table.commands.len() + BUILTINS.len()
            ),
            "plugin.list" => self
                .plugins()
                .iter()
                .map(|p| format!("{} {} {}", p.name, p.hash, p.source))
                .collect::<Vec<_>>()
                .join("\n"),
            "route.list" => self
                .routes()
                .iter()
                .map(|r| {
                    let handlers: Vec<String> = r.handlers.iter().map(|(p, prio)| format!("{p}:{prio}")).collect();
                    format!("{} {}", r.name, handlers.join(","))
                })
                .collect::<Vec<_>>()
                .join("\n"),
            _ => return None,
        })
    }

    /// Runs a command in the background as a job (`bgapi`, `api.bgrun`):
    /// fires BACKGROUND_JOB with its output when done, and returns
    /// (succeeded, output).
    pub async fn run_background(&self, job: &str, command: &str, args: &str, caller: &Caller) -> (bool, String) {
        let (ok, output) = match self.run_command(command, args, 0).await {
            Ok(text) => (true, text),
            Err(e) => (false, format!("-ERR {e}")),
        };
        let mut headers = vec![
            ("Job-UUID".to_string(), job.to_string()),
            ("Job-Command".to_string(), command.to_string()),
            ("Job-Successful".to_string(), ok.to_string()),
        ];
        if !args.is_empty() {
            headers.push(("Job-Command-Arg".to_string(), args.to_string()));
        }
        let event = Event { name: "BACKGROUND_JOB".into(), subclass: None, headers, body: Some(output.clone()) };
        self.bus.fire(event, caller);
        (ok, output)
    }

    /// Every command: built-ins first, then front-ends', then the plugins'.
    pub fn commands(&self) -> Vec<(String, String, String)> {
        let mut all: Vec<(String, String, String)> =
            BUILTINS.iter().map(|(n, u, d)| (n.to_string(), u.to_string(), d.to_string())).collect();
        for (name, (usage, description, _)) in self.extensions.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            all.push((name.clone(), usage.clone(), description.clone()));
        }
        for slot in self.table.load().plugins.values() {
            for c in slot.current().commands() {
                all.push((c.name.clone(), c.usage.clone(), c.description.clone()));
            }
        }
        all
    }

    pub fn plugin(&self, name: &str) -> Option<Arc<PluginVersion>> {
        self.table.load().plugins.get(name).map(|s| s.current())
    }

    pub fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.table.load().plugins.get(name).cloned()
    }

    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.table.load().plugins.values().cloned().collect()
    }

    pub fn plugins(&self) -> Vec<PluginInfo> {
        self.table
            .load()
            .plugins
            .values()
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
                    loaded_at: v.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    stats: slot.stats.snapshot(),
                }
            })
            .collect()
    }

    pub fn routes(&self) -> Vec<RouteInfo> {
        let mut routes: Vec<RouteInfo> = self
            .table
            .load()
            .routes
            .iter()
            .map(|(name, handlers)| RouteInfo {
                name: name.clone(),
                handlers: handlers.iter().map(|h| (h.slot.name.to_string(), h.priority)).collect(),
            })
            .collect();
        routes.extend(
            self.remote_routes.iter().map(|(name, target)| RouteInfo {
                name: name.clone(),
                handlers: vec![(format!("erlang:{target}"), 0)],
            }),
        );
        routes
    }

    /// Loads a new version of a plugin (from `code`, or from where the
    /// current one came from) and swaps it in. On any failure the current
    /// version keeps serving and the error says why.
    pub async fn reload(&self, name: &str, code: Option<CodeSource>) -> Result<Arc<PluginVersion>, DispatchError> {
        let _admin = self.admin.lock().await;
        let started = Instant::now();
        let table = self.table.load_full();
        let slot = table.plugins.get(name).ok_or_else(|| DispatchError::PluginNotFound(name.to_string()))?;
        let old = slot.current();
        let code = code.unwrap_or_else(|| slot.code());
        let def = PluginDef { spec: PluginSpec { source: code.describe(), ..(*old.spec).clone() }, code: code.clone() };
        let new = self.load_version(&def, slot.stats.clone()).await.inspect_err(|e| {
            tracing::error!(plugin = %name, error = %e, "reload refused; the old version serves on");
            self.plugin_event("PLUGIN_FAIL", name, &e.to_string());
        })?;
        // The whole table is checked against the new version first: what
        // routes and tasks need, and command names.
        let rebuilt =
            Table::build(table.plugins.clone(), table.route_defs.clone(), table.needs.clone(), Some((name, &new)))
                .inspect_err(|e| {
                    tracing::error!(plugin = %name, error = %e, "reload refused; the old version serves on");
                    self.plugin_event("PLUGIN_FAIL", name, &e.to_string());
                })?;
        slot.current.store(new.clone());
        self.table.store(Arc::new(rebuilt));
        slot.swapped.notify_waiters();
        *slot.code.lock().unwrap_or_else(|p| p.into_inner()) = code;
        slot.reloads.fetch_add(1, Relaxed);
        self.plugin_event("PLUGIN_RELOAD", name, new.short_hash());
        tracing::info!(
            plugin = %name,
            hash = %new.short_hash(),
            cache = ?new.cache,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "plugin reloaded"
        );
        Ok(new)
    }

    /// Adds a plugin that is not loaded yet.
    pub async fn load(&self, def: PluginDef) -> Result<Arc<PluginVersion>, DispatchError> {
        let _admin = self.admin.lock().await;
        let table = self.table.load_full();
        let name = def.spec.name.clone();
        if table.plugins.contains_key(&name) {
            return Err(DispatchError::PluginExists(name));
        }
        let stats = Arc::new(Stats::default());
        let version = self
            .load_version(&def, stats.clone())
            .await
            .inspect_err(|e| self.plugin_event("PLUGIN_FAIL", &name, &e.to_string()))?;
        self.plugin_event("PLUGIN_LOAD", &name, version.short_hash());
        let mut plugins = table.plugins.clone();
        plugins.insert(name.clone(), Arc::new(Slot::new(&name, version.clone(), def.code.clone(), stats)));
        self.table.store(Arc::new(Table::build(plugins, table.route_defs.clone(), table.needs.clone(), None)?));
        tracing::info!(plugin = %name, source = %def.code.describe(), "plugin loaded");
        Ok(version)
    }

    /// Removes a plugin and the routes bound to it; returns those routes.
    /// Calls in flight finish on it.
    pub async fn unload(&self, name: &str) -> Result<Vec<String>, DispatchError> {
        let _admin = self.admin.lock().await;
        let table = self.table.load_full();
        if !table.plugins.contains_key(name) {
            return Err(DispatchError::PluginNotFound(name.to_string()));
        }
        if let Some(need) = table.needs.iter().find(|n| n.plugin == name) {
            return Err(DispatchError::InUse { plugin: name.to_string(), by: need.by.clone() });
        }
        let mut plugins = table.plugins.clone();
        let removed = plugins.remove(name);
        let (dropped, kept): (Vec<RouteDef>, Vec<RouteDef>) =
            table.route_defs.iter().cloned().partition(|r| r.plugin == name);
        self.table.store(Arc::new(Table::build(plugins, kept, table.needs.clone(), None)?));
        if let Some(slot) = removed {
            slot.swapped.notify_waiters();
        }
        self.bus.remove(&Target::Plugin(name.to_string()));
        let routes: Vec<String> = dropped.into_iter().map(|r| r.name).collect();
        tracing::info!(plugin = %name, routes = ?routes, "plugin unloaded");
        Ok(routes)
    }

    fn tenant(&self, plugin: &str) -> Option<Tenant> {
        let version = self.plugin(plugin)?;
        self.tenants.get(&version.spec.tenant).cloned()
    }
}

/// The dispatcher as plugins' imports see it.
struct Link(Weak<Dispatcher>);

impl Link {
    fn get(&self) -> Result<Arc<Dispatcher>, HostError> {
        self.0.upgrade().ok_or_else(|| HostError::Failed("evrhost is shutting down".into()))
    }
}

#[async_trait::async_trait]
impl Services for Link {
    async fn call_command(&self, _plugin: &str, command: &str, args: &str, depth: u32) -> Result<String, HostError> {
        let d = self.get()?;
        d.run_command(command, args, depth).await.map_err(|e| match e {
            DispatchError::CommandNotFound(c) => HostError::NotFound(format!("no command `{c}`")),
            other => HostError::Failed(other.to_string()),
        })
    }

    fn fire(&self, plugin: &str, route: &str, event: Event) -> Result<(), HostError> {
        let d = self.get()?;
        if event.name.is_empty() || event.name.contains(char::is_whitespace) {
            return Err(HostError::Invalid("an event needs a name without spaces".into()));
        }
        if event.name == "CUSTOM" && event.subclass.as_deref().is_none_or(str::is_empty) {
            return Err(HostError::Invalid("a CUSTOM event needs a subclass".into()));
        }
        if bus::reserved(&event.name) {
            return Err(HostError::Denied(format!("`{}` is raised by evrhost only", event.name)));
        }
        let tenant = d.tenant(plugin).ok_or_else(|| HostError::Failed("the plugin is not loaded".into()))?;
        if !tenant.fire.allows(&event.name, event.subclass.as_deref()) {
            return Err(HostError::Denied(format!(
                "the tenant may not fire {}",
                describe(&event.name, event.subclass.as_deref())
            )));
        }
        d.bus.fire(event, &Caller { file: plugin.to_string(), function: route.to_string(), line: 0 });
        Ok(())
    }

    fn subscribe(&self, plugin: &str, name: &str, subclass: Option<&str>) -> Result<(), HostError> {
        let d = self.get()?;
        if name.is_empty() {
            return Err(HostError::Invalid("an event name is needed (ALL for every event)".into()));
        }
        if !d.plugin(plugin).is_some_and(|v| v.has_export(Export::Subscriber)) {
            return Err(HostError::Invalid(format!(
                "plugin `{plugin}` does not export `{}`; events would have nowhere to go",
                Export::Subscriber.interface()
            )));
        }
        let tenant = d.tenant(plugin).ok_or_else(|| HostError::Failed("the plugin is not loaded".into()))?;
        if !tenant.subscribe.allows(name, subclass) {
            return Err(HostError::Denied(format!("the tenant may not subscribe to {}", describe(name, subclass))));
        }
        d.bus.subscribe(Target::Plugin(plugin.to_string()), name, subclass, None).map_err(HostError::Invalid)
    }

    fn unsubscribe(&self, plugin: &str, name: &str, subclass: Option<&str>) -> Result<bool, HostError> {
        let d = self.get()?;
        Ok(d.bus.unsubscribe(&Target::Plugin(plugin.to_string()), name, subclass))
    }

    fn filter(&self, plugin: &str, command: &str) -> Result<String, HostError> {
        let d = self.get()?;
        d.bus.filter(&Target::Plugin(plugin.to_string()), command).map_err(HostError::Invalid)
    }

    async fn fetch(&self, query: FetchQuery) -> Result<String, HostError> {
        let d = self.get()?;
        let fetcher = d
            .fetcher
            .get()
            .cloned()
            .ok_or_else(|| HostError::NotFound("no Erlang front-end: nothing can be bound to a section".into()))?;
        fetcher.fetch(&query).await
    }

    fn raise(&self, event: Event) {
        if let Ok(d) = self.get() {
            d.bus.fire(event, &Caller::host("runtime"));
        }
    }
}

fn describe(name: &str, subclass: Option<&str>) -> String {
    match subclass {
        Some(sub) => format!("`{name}` `{sub}`"),
        None => format!("`{name}`"),
    }
}
