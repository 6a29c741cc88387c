//! Plugin admin: load, reload and unload, and the routes front-ends add.
//! Each change is serialised on the admin lock, checked whole against a
//! new table, and swapped in only when every check passed.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::link::plugin_sink_id;
use super::table::{RemoteRoute, Table};
use super::{DispatchError, Dispatcher, Slot};
use crate::bus::Caller;
use crate::config::{CodeSource, PluginDef, RouteDef};
use crate::error::chain;
use crate::runtime::{Code, LoadError, PluginSpec, PluginVersion, Stats, TraceSwitch};
use crate::sync::lock;

/// Files whose hash is remembered; past it the memory starts afresh.
const MAX_KNOWN_FILES: usize = 1024;

impl Dispatcher {
    pub(super) async fn load_version(
        &self,
        def: &PluginDef,
        stats: Arc<Stats>,
        trace: Arc<TraceSwitch>,
    ) -> Result<Arc<PluginVersion>, LoadError> {
        let name = &def.spec.name;
        let limits = self.tenants.get(&def.spec.tenant).map(|t| t.kv).unwrap_or_default();
        let kv = self.kv.space(&def.spec.tenant, limits);
        // A file unchanged since it was last loaded is neither read nor
        // hashed again: its compiled artifact is found by the hash it had.
        let identity = def.code.identity().await;
        let known = identity.and_then(|id| lock(&self.digests).get(&id).copied());
        if let Some(digest) = known {
            let load = self.runtime.load(
                def.spec.clone(),
                Code::Known(digest),
                kv.clone(),
                self.link.clone(),
                stats.clone(),
                trace.clone(),
            );
            match load.await {
                Err(LoadError::NotCached { .. }) => {}
                done => return done,
            }
        }
        let wasm = def.code.read().await.map_err(|source| LoadError::Read {
            plugin: name.clone(),
            path: def.code.describe(),
            source,
        })?;
        let version =
            self.runtime.load(def.spec.clone(), Code::Bytes(wasm), kv, self.link.clone(), stats, trace).await?;
        if let (Some(id), Ok(digest)) = (identity, blake3::Hash::from_hex(&version.hash)) {
            let mut digests = lock(&self.digests);
            if digests.len() >= MAX_KNOWN_FILES {
                digests.clear();
            }
            digests.insert(id, digest);
        }
        Ok(version)
    }

    /// PLUGIN_LOAD, PLUGIN_RELOAD or PLUGIN_FAIL.
    pub(super) fn plugin_event(&self, name: &str, plugin: &str, detail: &str) {
        let detail_header = if name == "PLUGIN_FAIL" { "Error" } else { "Plugin-Hash" };
        self.bus.raise(
            name,
            vec![("Plugin", plugin.to_string()), (detail_header, detail.to_string())],
            Caller::host("plugin admin"),
        );
    }

    /// Loads a new version of a plugin (from `code`, or from where the
    /// current one came from) and swaps it in. On any failure the current
    /// version keeps serving and the error says why.
    pub async fn reload(&self, name: &str, code: Option<CodeSource>) -> Result<Arc<PluginVersion>, DispatchError> {
        let _admin = self.admin.lock().await;
        let started = Instant::now();
        let table = self.table.load_full();
        let slot = table.spec.plugins.get(name).ok_or_else(|| DispatchError::PluginNotFound(name.to_string()))?;
        let old = slot.current();
        let code = code.unwrap_or_else(|| slot.code());
        let def = PluginDef { spec: PluginSpec { source: code.describe(), ..(*old.spec).clone() }, code: code.clone() };
        let refused = |e: &(dyn std::error::Error + 'static)| {
            let why = chain(e);
            tracing::error!(plugin = %name, error = %why, "reload refused; the old version serves on");
            self.plugin_event("PLUGIN_FAIL", name, &why);
        };
        let new = self.load_version(&def, slot.stats.clone(), slot.trace.clone()).await.inspect_err(|e| refused(e))?;
        // The whole table is checked against the new version first: what
        // routes and tasks need, and command names.
        let rebuilt = Table::build(table.spec.clone(), Some((name, &new))).inspect_err(|e| refused(e))?;
        slot.current.store(new.clone());
        self.publish(rebuilt);
        slot.swapped.notify_waiters();
        *lock(&slot.code) = code;
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
        if table.spec.plugins.contains_key(&name) {
            return Err(DispatchError::PluginExists(name));
        }
        let stats = Arc::new(Stats::default());
        let trace = Arc::new(TraceSwitch::new(def.spec.trace));
        let version = self
            .load_version(&def, stats.clone(), trace.clone())
            .await
            .inspect_err(|e| self.plugin_event("PLUGIN_FAIL", &name, &chain(e)))?;
        self.plugin_event("PLUGIN_LOAD", &name, version.short_hash());
        let mut spec = table.spec.clone();
        spec.plugins.insert(name.clone(), Arc::new(Slot::new(&name, version.clone(), def.code.clone(), stats, trace)));
        self.publish(Table::build(spec, None)?);
        tracing::info!(plugin = %name, source = %def.code.describe(), "plugin loaded");
        Ok(version)
    }

    /// Removes a plugin and the routes bound to it; returns those routes.
    /// Calls in flight finish on it.
    pub async fn unload(&self, name: &str) -> Result<Vec<String>, DispatchError> {
        let _admin = self.admin.lock().await;
        let table = self.table.load_full();
        if !table.spec.plugins.contains_key(name) {
            return Err(DispatchError::PluginNotFound(name.to_string()));
        }
        if let Some(need) = table.spec.needs.iter().find(|n| n.plugin == name) {
            return Err(DispatchError::InUse { plugin: name.to_string(), by: need.by.clone() });
        }
        let mut spec = table.spec.clone();
        let removed = spec.plugins.remove(name);
        let (dropped, kept): (Vec<RouteDef>, Vec<RouteDef>) =
            spec.route_defs.iter().cloned().partition(|r| r.plugin == name);
        spec.route_defs = kept;
        self.publish(Table::build(spec, None)?);
        if let Some(slot) = removed {
            slot.swapped.notify_waiters();
        }
        self.bus.remove(&plugin_sink_id(name));
        let routes: Vec<String> = dropped.into_iter().map(|r| r.name).collect();
        tracing::info!(plugin = %name, routes = ?routes, "plugin unloaded");
        Ok(routes)
    }

    /// Binds a plugin to a route (a new route, or one more handler of one),
    /// as a `[[route]]` entry does; refused if the plugin lacks `route`.
    pub async fn add_route(&self, def: RouteDef) -> Result<(), DispatchError> {
        let _admin = self.admin.lock().await;
        let mut spec = self.table.load().spec.clone();
        if spec.route_defs.iter().any(|r| r.name == def.name && r.plugin == def.plugin) {
            return Err(DispatchError::RouteExists { route: def.name, plugin: def.plugin });
        }
        tracing::info!(route = %def.name, plugin = %def.plugin, priority = def.priority, "route added");
        spec.route_defs.push(def);
        self.publish(Table::build(spec, None)?);
        Ok(())
    }

    /// Unbinds a plugin from a route; the route goes when its last
    /// handler does.
    pub async fn remove_route(&self, route: &str, plugin: &str) -> Result<(), DispatchError> {
        let _admin = self.admin.lock().await;
        let mut spec = self.table.load().spec.clone();
        let before = spec.route_defs.len();
        spec.route_defs.retain(|r| !(r.name == route && r.plugin == plugin));
        if spec.route_defs.len() == before {
            return Err(DispatchError::RouteHandlerNotFound { route: route.into(), plugin: plugin.into() });
        }
        self.publish(Table::build(spec, None)?);
        tracing::info!(route, plugin, "route removed");
        Ok(())
    }

    /// Adds a handler of a route that a front-end owns: it runs in
    /// priority order with the route's plugins, as they do.
    pub async fn add_remote_route(&self, route: RemoteRoute) -> Result<(), DispatchError> {
        let _admin = self.admin.lock().await;
        let mut spec = self.table.load().spec.clone();
        spec.remote_routes.push(route);
        self.publish(Table::build(spec, None)?);
        Ok(())
    }
}
