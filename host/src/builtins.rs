//! The API commands evrhost answers itself, with FreeSWITCH's text
//! conventions (`+OK …` on success; a text starting with `-` is an
//! error), so that a client written for FreeSWITCH's API finds its stock
//! commands: `version`, `status`, `echo`, `log`, and the admin ones
//! (`plugin.list`, `plugin.reload`, `route.list`). They are registered on
//! the dispatcher like any front-end's command. Plugins reach none of them
//! unless their config grants it (`host_commands`).

use std::sync::{Arc, Weak};

use crate::dispatcher::{Command, CommandError, DispatchError, Dispatcher, HostCommand};
use crate::runtime::CommandInfo;

#[derive(Clone, Copy)]
enum Builtin {
    Version,
    Status,
    Echo,
    Log,
    PluginList,
    PluginReload,
    RouteList,
}

const BUILTINS: [(Builtin, &str, &str, &str); 7] = [
    (Builtin::Version, "version", "", "evrhost and wasmtime versions"),
    (Builtin::Status, "status", "", "uptime, plugins, routes"),
    (Builtin::Echo, "echo", "TEXT", "answers its arguments"),
    (Builtin::Log, "log", "LEVEL TEXT", "writes a log line (console, alert, crit, err, warning, notice, info, debug)"),
    (Builtin::PluginList, "plugin.list", "", "the loaded plugins, one a line"),
    (Builtin::PluginReload, "plugin.reload", "NAME", "reload a plugin from where it came from"),
    (Builtin::RouteList, "route.list", "", "the routes and their handlers, one a line"),
];

struct Host {
    which: Builtin,
    d: Weak<Dispatcher>,
}

/// Registers every built-in command on `d`.
pub async fn install(d: &Arc<Dispatcher>) -> Result<(), DispatchError> {
    for (which, name, usage, description) in BUILTINS {
        let info = CommandInfo { name: name.into(), usage: usage.into(), description: description.into() };
        let run = Arc::new(Host { which, d: Arc::downgrade(d) });
        d.add_command(HostCommand { info, run, admin: matches!(which, Builtin::PluginReload) }).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Command for Host {
    async fn run(&self, args: &str) -> Result<String, CommandError> {
        let d = self.d.upgrade().ok_or_else(|| CommandError("-ERR shutting down".into()))?;
        Ok(match self.which {
            Builtin::Version => format!("evrhost {} (wasmtime 48.0.8)", env!("CARGO_PKG_VERSION")),
            Builtin::Status => format!(
                "UP {} s, {} plugins, {} routes, {} commands",
                d.uptime().as_secs(),
                d.plugins().len(),
                d.routes().len(),
                d.commands().len()
            ),
            Builtin::Echo => args.to_string(),
            Builtin::Log => log(args)?,
            Builtin::PluginList => {
                d.plugins().iter().map(|p| format!("{} {} {}", p.name, p.hash, p.source)).collect::<Vec<_>>().join("\n")
            }
            Builtin::PluginReload => {
                let name = args.trim();
                let version = d.reload(name, None).await.map_err(|e| CommandError(crate::error::chain(&e)))?;
                format!("+OK {name} reloaded: {}", version.short_hash())
            }
            Builtin::RouteList => d
                .routes()
                .iter()
                .map(|r| {
                    let handlers: Vec<String> = r.handlers.iter().map(|(p, prio)| format!("{p}:{prio}")).collect();
                    format!("{} {}", r.name, handlers.join(","))
                })
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }
}

/// FreeSWITCH's `log LEVEL TEXT`: one log line at that level, which log
/// handlers (an Erlang node's) receive as any other.
fn log(args: &str) -> Result<String, CommandError> {
    let args = args.trim();
    let (level, text) = args.split_once(' ').map_or((args, ""), |(l, t)| (l, t.trim()));
    match level.to_ascii_lowercase().as_str() {
        "debug" | "7" => tracing::debug!(target: "api", "{text}"),
        "info" | "notice" | "6" | "5" => tracing::info!(target: "api", "{text}"),
        "warning" | "warn" | "4" => tracing::warn!(target: "api", "{text}"),
        "err" | "error" | "crit" | "alert" | "console" | "emerg" | "3" | "2" | "1" | "0" => {
            tracing::error!(target: "api", "{text}")
        }
        _ => {
            return Err(CommandError(format!(
                "-ERR log: unknown level `{level}` (console, alert, crit, err, warning, notice, info, debug)"
            )))
        }
    }
    Ok("+OK".to_string())
}
