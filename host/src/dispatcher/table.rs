//! The routing table: what every route, command and need is bound to. It
//! is immutable: an admin change builds a new one from the old one's
//! [`Spec`] and swaps it in whole.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::commands::HostCommand;
use super::routes::RemoteHandler;
use super::{DispatchError, Slot};
use crate::config::RouteDef;
use crate::runtime::{Export, LoadError, PluginVersion};

/// An export some part of the configuration relies on, besides routes
/// (which need `route`): exec tasks need `task`.
#[derive(Clone, Debug)]
pub struct Need {
    pub plugin: String,
    pub export: Export,
    /// What needs it, for the error: "exec task `evrexec:timer`".
    pub by: String,
}

/// A route handled by something other than a plugin: a process behind a
/// front-end, registered by that front-end.
#[derive(Clone)]
pub struct RemoteRoute {
    pub route: String,
    pub priority: i32,
    pub handler: Arc<dyn RemoteHandler>,
}

/// What runs one route's requests.
#[derive(Clone)]
pub(super) enum Target {
    Plugin(Arc<Slot>),
    Remote(Arc<dyn RemoteHandler>),
}

impl Target {
    pub(super) fn name(&self) -> Arc<str> {
        match self {
            Target::Plugin(slot) => slot.name.clone(),
            Target::Remote(handler) => handler.name().into(),
        }
    }
}

pub(super) struct Handler {
    pub priority: i32,
    pub target: Target,
}

/// What a table is built from.
#[derive(Clone, Default)]
pub(super) struct Spec {
    pub plugins: BTreeMap<String, Arc<Slot>>,
    pub route_defs: Vec<RouteDef>,
    pub remote_routes: Vec<RemoteRoute>,
    pub needs: Vec<Need>,
    /// Commands the host and its front-ends answer themselves.
    pub host_commands: BTreeMap<String, HostCommand>,
}

#[derive(Default)]
pub(super) struct Table {
    pub spec: Spec,
    pub routes: BTreeMap<String, Vec<Handler>>,
    /// Plugins' commands.
    pub commands: BTreeMap<String, Arc<Slot>>,
}

impl Table {
    /// Binds routes and commands. Refuses a route or need whose plugin
    /// lacks the export, and a command two providers offer. `candidate`
    /// stands in for one plugin's current version, so that a reload is
    /// checked before anything is swapped.
    pub fn build(spec: Spec, candidate: Option<(&str, &Arc<PluginVersion>)>) -> Result<Table, DispatchError> {
        let version = |slot: &Slot| match candidate {
            Some((name, v)) if *name == *slot.name => v.clone(),
            _ => slot.current(),
        };
        let route_needs = spec.route_defs.iter().map(|def| Need {
            plugin: def.plugin.clone(),
            export: Export::Route,
            by: format!("route `{}`", def.name),
        });
        for need in route_needs.chain(spec.needs.iter().cloned()) {
            let slot =
                spec.plugins.get(&need.plugin).ok_or_else(|| DispatchError::PluginNotFound(need.plugin.clone()))?;
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
        for def in &spec.route_defs {
            if let Some(slot) = spec.plugins.get(&def.plugin) {
                let handler = Handler { priority: def.priority, target: Target::Plugin(slot.clone()) };
                routes.entry(def.name.clone()).or_default().push(handler);
            }
        }
        for remote in &spec.remote_routes {
            let handler = Handler { priority: remote.priority, target: Target::Remote(remote.handler.clone()) };
            routes.entry(remote.route.clone()).or_default().push(handler);
        }
        for handlers in routes.values_mut() {
            // Stable: at one priority, plugins first, in config order.
            handlers.sort_by_key(|h| h.priority);
        }
        let mut commands: BTreeMap<String, Arc<Slot>> = BTreeMap::new();
        for slot in spec.plugins.values() {
            for info in version(slot).commands() {
                let taken_by = match spec.host_commands.get(&info.name) {
                    Some(_) => Some("evrhost (built-in)".to_string()),
                    None => commands.get(&info.name).map(|other| other.name.to_string()),
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
        Ok(Table { spec, routes, commands })
    }
}
