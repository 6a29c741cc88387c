//! The configuration file: TOML, parsed into typed values and checked as a
//! whole before anything runs. Every error names the file, the line and
//! the key at fault. One file per section: `runtime.rs`, `tenant.rs`,
//! `plugin.rs`, `route.rs`, `exec.rs` (tasks and UDP sockets), `rpc.rs`,
//! `events.rs`, `erlang.rs`, `yate.rs`; `checker.rs` says where a bad value is.
//!
//! Config types sit below the parts that use them: the runtime's types
//! are filled in here, and the bus, the dispatcher and the front-ends read
//! what is checked here, stored parsed.
//!
//! ```toml
//! [[plugin]]
//! name = "echo"
//! path = "plugins/echo.wasm"     # relative to this file; or "builtin:echo"
//! deadline_ms = 100
//!
//! [[route]]
//! name = "evrexec:test"
//! plugin = "echo"
//! ```

mod checker;
mod erlang;
mod events;
mod exec;
mod kv;
mod plugin;
mod route;
mod rpc;
mod runtime;
mod tenant;
mod yate;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use erlang::{Cidr, Encoding, ErlangRoute, ErlangSettings, ErlangTarget, DEFAULT_ERLANG_PORT};
pub use events::{EventSocket, EventsSettings};
pub use exec::{parse_sockaddr, ExecDef, UdpDef, DEFAULT_COALESCE_US};
pub use plugin::{CodeSource, FileIdentity, PluginDef, BUILTIN_PLUGINS, MAX_PLUGIN_BYTES};
pub use route::RouteDef;
pub use rpc::{RpcSettings, DEFAULT_RPC_LISTEN};
pub use tenant::{EventAcl, NameAcl, Tenant};
pub use yate::{YateConnect, YateInstall, YateSettings, YATE_DEFAULT_BUFSIZE};

use crate::runtime::EngineSettings;
use checker::Checker;

/// The largest config file read.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The configuration `evrhost run` uses when given no file.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}:{line}:{column}: `{key}`: {message}")]
    Invalid { file: String, line: usize, column: usize, key: String, message: String },
    #[error("[erlang]: {0}")]
    Erlang(String),
}

/// A value that does not parse: what it is and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(pub String);

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub engine: EngineSettings,
    /// None: no compiled-code cache.
    pub cache_dir: Option<PathBuf>,
    pub tenants: HashMap<String, Tenant>,
    pub plugins: Vec<PluginDef>,
    /// Routes' plugin handlers (Erlang handlers are in `erlang`).
    pub routes: Vec<RouteDef>,
    /// Startup tasks.
    pub exec: Vec<ExecDef>,
    /// UDP sockets (`[[exec]]` entries with a `sockaddr`).
    pub udp: Vec<UdpDef>,
    pub rpc: RpcSettings,
    pub events: EventsSettings,
    /// None: no Erlang front-end.
    pub erlang: Option<ErlangSettings>,
    /// None: not a Yate module.
    pub yate: Option<YateSettings>,
    /// Where tenants' keys live.
    pub kv: crate::kv::KvBackend,
}

/// The file's shape; each section is checked in its own module.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    runtime: runtime::RuntimeSection,
    #[serde(default)]
    tenant: Vec<tenant::TenantSection>,
    #[serde(default)]
    plugin: Vec<plugin::PluginSection>,
    #[serde(default)]
    route: Vec<route::RouteSection>,
    #[serde(default)]
    exec: Vec<exec::ExecSection>,
    #[serde(default)]
    rpc: rpc::RpcSection,
    #[serde(default)]
    events: events::EventsSection,
    erlang: Option<erlang::ErlangSection>,
    yate: Option<yate::YateSection>,
    kv: Option<kv::KvSection>,
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, "(embedded default)", Path::new("."))
    }

    /// A configuration with nothing in it: no plugins, no listeners.
    pub fn empty() -> Config {
        let mut config = Config::parse("", "(empty)", Path::new(".")).unwrap_or_else(|e| unreachable!("{e}"));
        config.rpc = RpcSettings::none();
        config
    }

    /// Reads and checks a config file (a regular file of at most 16 MiB).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let read = |source| ConfigError::Read { file: file.clone(), source };
        let meta = std::fs::metadata(path).map_err(read)?;
        if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
            let why = format!("not a regular file of at most {MAX_CONFIG_BYTES} bytes");
            return Err(read(std::io::Error::new(std::io::ErrorKind::InvalidData, why)));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Config::parse(&text, &file, base)
    }

    /// Parses and checks a configuration; relative plugin paths are taken
    /// from `base`.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: File =
            toml::from_str(text).map_err(|e| ConfigError::Syntax { file: file.to_string(), message: e.to_string() })?;
        let ck = Checker { file, text };
        let (engine, cache_dir) = runtime::check(&ck, &raw.runtime, base)?;
        let tenants = tenant::check(&ck, &raw.tenant)?;
        let events = events::check(&ck, &raw.events)?;

        let mut plugins = Vec::new();
        let mut names = HashSet::new();
        let cx = plugin::PluginContext { base, tenants: &tenants, engine: &engine, events: &events };
        for p in &raw.plugin {
            plugins.push(plugin::check(&ck, p, &cx, &mut names)?);
        }
        let (routes, erlang_routes) = route::check(&ck, &raw.route, &names, raw.erlang.is_some())?;
        let served: HashSet<&str> =
            routes.iter().map(|r| r.name.as_str()).chain(erlang_routes.iter().map(|r| r.route.as_str())).collect();
        let (exec, udp) = exec::check(&ck, &raw.exec, &names, &served)?;
        let yate = match &raw.yate {
            Some(section) => Some(yate::check(&ck, section, base, &served)?),
            None => None,
        };
        let plugin_paths: Vec<&Path> = plugins
            .iter()
            .filter_map(|p| match &p.code {
                CodeSource::File(path) => Some(path.as_path()),
                CodeSource::Builtin(_) => None,
            })
            .collect();
        let rpc = rpc::check(&ck, &raw.rpc, base, &plugin_paths)?;
        let erlang = match &raw.erlang {
            Some(section) => Some(erlang::check(&ck, section, base, erlang_routes)?),
            None => None,
        };
        let kv = kv::check(&ck, &raw.kv, base)?;
        Ok(Config { engine, cache_dir, tenants, plugins, routes, exec, udp, rpc, events, erlang, yate, kv })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/evrhost"))
    }

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::embedded_default().unwrap();
        assert!(config.plugins.iter().any(|p| p.code == CodeSource::Builtin("echo")));
        assert!(config.routes.iter().any(|r| r.name == "evrexec:test"));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse("[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\nfuel_max = 3\n").unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("fuel_max"), "{err}");
    }

    #[test]
    fn route_to_unknown_plugin_points_at_the_key() {
        let err = parse("[[route]]\nname = \"r\"\nplugin = \"ghost\"\n").unwrap_err().to_string();
        assert_eq!(err, "test.toml:3:10: `route.plugin`: no plugin named `ghost` is configured");
    }

    #[test]
    fn limits_are_checked() {
        let err = parse("[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\ndeadline_ms = 0\n").unwrap_err().to_string();
        assert!(err.starts_with("test.toml:4:15: `plugin.deadline_ms`"), "{err}");
        let err = parse("[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\ndeadline_ms = 9000000000000\n").unwrap_err();
        assert!(err.to_string().contains("at most a day"), "{err}");
        let err = parse("[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\ncapabilities = [\"kv\", \"net\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown capability `net`"), "{err}");
        let err = parse("[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\n[[plugin]]\nname = \"a\"\npath = \"b.wasm\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:5:8") && err.contains("defined twice"), "{err}");
    }

    #[test]
    fn exec_entries_are_checked() {
        let base = "[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\n[[route]]\nname = \"evrexec:udp\"\nplugin = \"p\"\n";
        let ok = parse(&format!("{base}[[exec]]\nname = \"evrexec:udp\"\nsockaddr = \"udp:::1:5060\"\n")).unwrap();
        assert_eq!(ok.udp[0].addr, "[::1]:5060".parse().unwrap());
        assert_eq!(ok.udp[0].route, "evrexec:udp");
        let task =
            parse(&format!("{base}[[exec]]\nname = \"evrexec:timer\"\nplugin = \"p\"\nworkers = 0\nwait = 1000\n"))
                .unwrap();
        assert_eq!((task.exec[0].workers, task.exec[0].wait), (1, std::time::Duration::from_micros(1000)));
        let err = parse(&format!("{base}[[exec]]\nname = \"nope\"\nsockaddr = \"udp:127.0.0.1:5060\"\n")).unwrap_err();
        assert!(err.to_string().contains("no route named `nope`"), "{err}");
        let err =
            parse(&format!("{base}[[exec]]\nname = \"evrexec:udp\"\nsockaddr = \"tcp:127.0.0.1:5060\"\n")).unwrap_err();
        assert!(err.to_string().contains("expected udp:IP:PORT"), "{err}");
        let err = parse(&format!("{base}[[exec]]\nname = \"t\"\n")).unwrap_err();
        assert!(err.to_string().contains("needs the plugin"), "{err}");
    }

    #[test]
    fn relative_paths_and_config_values() {
        let config = parse(
            "[[plugin]]\nname = \"a\"\npath = \"p/a.wasm\"\nisolation = \"per-call\"\n[plugin.config]\nn = 3\ns = \"x\"\n",
        )
        .unwrap();
        let p = &config.plugins[0];
        assert_eq!(p.code, CodeSource::File(PathBuf::from("/etc/evrhost/p/a.wasm")));
        assert_eq!(p.spec.limits.isolation, crate::runtime::Isolation::PerCall);
        assert_eq!(p.spec.config.get("n").map(String::as_str), Some("3"));
    }
}
