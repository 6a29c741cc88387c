//! What is configured about a plugin, apart from its code.

use std::collections::BTreeMap;

use super::limits::{Capabilities, Limits, Preopen};

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
    /// Whether calls start out logging each import they make (app_lua's
    /// `log_mode`); `plugin.trace` switches it at run time.
    pub trace: bool,
    /// The host's own commands (`echo`, `status`, …) this plugin may call
    /// through `commands.call`; none unless granted. Plugins' commands it
    /// may call are its own tenant's, always.
    pub host_commands: Vec<String>,
}
