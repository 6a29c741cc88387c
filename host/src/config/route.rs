//! `[[route]]`: a route's handlers. Each entry binds one handler, a plugin
//! or (with `erlang`) an Erlang process; several entries with one name run
//! in ascending `priority` (as Yate orders handlers) until one replies
//! `handled`.

use std::collections::HashSet;

use serde::Deserialize;
use toml::Spanned;

use super::checker::Checker;
use super::erlang::{ErlangRoute, ErlangTarget};
use super::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteSection {
    name: Spanned<String>,
    plugin: Option<Spanned<String>>,
    /// An Erlang process instead of a plugin: `process node@host`, …
    erlang: Option<Spanned<String>>,
    #[serde(default = "default_priority")]
    priority: i32,
}

fn default_priority() -> i32 {
    100
}

/// One plugin handler of a route.
#[derive(Clone, Debug)]
pub struct RouteDef {
    pub name: String,
    pub plugin: String,
    pub priority: i32,
}

/// The plugin handlers, and the Erlang ones (which the Erlang front-end
/// registers; `has_erlang` says whether there is one to go through).
pub(super) fn check(
    ck: &Checker,
    sections: &[RouteSection],
    plugins: &HashSet<String>,
    has_erlang: bool,
) -> Result<(Vec<RouteDef>, Vec<ErlangRoute>), ConfigError> {
    let (mut routes, mut erlang) = (Vec::new(), Vec::new());
    for r in sections {
        let name = r.name.get_ref();
        if name.is_empty() || name.len() > 256 {
            return Err(ck.at(&r.name, "route.name", "must be 1 to 256 bytes"));
        }
        match (&r.plugin, &r.erlang) {
            (Some(plugin), None) => {
                let plugin_name = plugin.get_ref();
                if !plugins.contains(plugin_name.as_str()) {
                    return Err(ck.at(
                        plugin,
                        "route.plugin",
                        format!("no plugin named `{plugin_name}` is configured"),
                    ));
                }
                routes.push(RouteDef { name: name.clone(), plugin: plugin_name.clone(), priority: r.priority });
            }
            (None, Some(target)) => {
                let parsed = ErlangTarget::parse(target.get_ref()).map_err(|m| ck.at(target, "route.erlang", m.0))?;
                if !has_erlang {
                    return Err(ck.at(
                        target,
                        "route.erlang",
                        "needs an [erlang] section (the C-node it goes through)",
                    ));
                }
                erlang.push(ErlangRoute { route: name.clone(), priority: r.priority, target: parsed });
            }
            _ => return Err(ck.at(&r.name, "route", "give exactly one of `plugin` or `erlang`")),
        }
    }
    Ok((routes, erlang))
}
