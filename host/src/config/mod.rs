//! The configuration file: TOML, parsed into typed values and checked as a
//! whole before anything runs. Every error names the file, the line and
//! the key at fault.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod erlang;

pub use erlang::{Cidr, ErlangSettings, ErlangTarget, DEFAULT_ERLANG_PORT};

use crate::kv::KvLimits;
use crate::runtime::{Capabilities, EngineSettings, Isolation, Limits, PluginSpec, Preopen};

/// The configuration `evrhost run` uses when given no file.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// Plugins compiled into the binary, usable as `path = "builtin:NAME"`.
pub const BUILTINS: [(&str, &[u8]); 2] = [
    ("echo", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/echo.wasm"))),
    ("counter", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/counter.wasm"))),
];

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

/// Where a plugin's code comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeSource {
    File(PathBuf),
    Builtin(&'static str),
}

impl CodeSource {
    pub fn describe(&self) -> String {
        match self {
            CodeSource::File(path) => path.display().to_string(),
            CodeSource::Builtin(name) => format!("builtin:{name}"),
        }
    }

    /// `builtin:NAME` or a path, relative paths taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<CodeSource, String> {
        if let Some(name) = text.strip_prefix("builtin:") {
            return BUILTINS.iter().find(|(n, _)| *n == name).map(|(n, _)| CodeSource::Builtin(n)).ok_or_else(|| {
                let known: Vec<&str> = BUILTINS.iter().map(|(n, _)| *n).collect();
                format!("no builtin plugin `{name}`; there are: {}", known.join(", "))
            });
        }
        if text.is_empty() {
            return Err("empty path".into());
        }
        Ok(CodeSource::File(base.join(text)))
    }

    pub async fn read(&self) -> std::io::Result<std::sync::Arc<[u8]>> {
        match self {
            CodeSource::File(path) => Ok(tokio::fs::read(path).await?.into()),
            CodeSource::Builtin(name) => BUILTINS
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, bytes)| std::sync::Arc::from(*bytes))
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no builtin `{name}`"))),
        }
    }
}

/// A plugin as configured.
#[derive(Clone, Debug)]
pub struct PluginDef {
    pub spec: PluginSpec,
    pub code: CodeSource,
}

impl PluginDef {
    /// A plugin with default limits and every capability, as `plugin.load`
    /// over RPC and `evrhost call` make one; relative paths are taken from
    /// the working directory.
    pub fn with_defaults(name: &str, path: &str) -> Result<PluginDef, String> {
        if !valid_name(name) {
            return Err(format!("plugin name `{name}`: use 1-64 letters, digits, `_`, `-` or `.`"));
        }
        let code = CodeSource::parse(path, Path::new(""))?;
        let spec = PluginSpec {
            name: name.to_string(),
            tenant: "default".to_string(),
            source: code.describe(),
            limits: Limits::default(),
            capabilities: Capabilities::all(),
            config: BTreeMap::new(),
            preopens: Vec::new(),
            profiling: false,
        };
        Ok(PluginDef { spec, code })
    }
}

/// One handler of a route. Several entries with one name are tried in
/// ascending `priority` (as Yate orders handlers) until one replies
/// `handled`.
#[derive(Clone, Debug)]
pub struct RouteDef {
    pub name: String,
    pub plugin: String,
    pub priority: i32,
}

/// An exec task, as Kamailio's evrexec `exec` parameter defines one.
#[derive(Clone, Debug)]
pub struct ExecDef {
    pub name: String,
    pub kind: ExecKind,
}

#[derive(Clone, Debug)]
pub enum ExecKind {
    /// After `wait`, `plugin`'s task export runs in each of `workers`
    /// workers, with the worker index as a string. A task that fails is
    /// restarted after a backoff that doubles from `backoff_min` to
    /// `backoff_max`.
    Task { plugin: String, workers: u32, wait: Duration, backoff_min: Duration, backoff_max: Duration },
    /// Each datagram on `addr` is a call of the route `name`.
    Udp(UdpDef),
}

#[derive(Clone, Debug)]
pub struct UdpDef {
    pub addr: SocketAddr,
    /// Calls in flight at once.
    pub workers: u32,
    /// Datagrams waiting for a worker; past this they are dropped and counted.
    pub queue: usize,
    /// SO_RCVBUF in bytes; None keeps the system default.
    pub recv_buffer: Option<usize>,
    /// Send the reply's data back to the source.
    pub reply: bool,
    /// E_PROFILING_PROC records for each datagram.
    pub profiling: bool,
    /// Under load (a read found more than one datagram but not a full
    /// batch), the receiver waits this long before reading again, so that
    /// each hand-over to a worker carries more datagrams. Zero: never.
    pub coalesce: Duration,
}

#[derive(Clone, Debug)]
pub struct RpcSettings {
    /// None disables the listener.
    pub listen: Option<SocketAddr>,
    /// A UNIX stream socket serving JSON-RPC documents back to back.
    pub unix: Option<PathBuf>,
    /// Required as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub engine: EngineSettings,
    /// None: no compiled-code cache.
    pub cache_dir: Option<PathBuf>,
    pub tenants: HashMap<String, Tenant>,
    pub plugins: Vec<PluginDef>,
    pub routes: Vec<RouteDef>,
    pub exec: Vec<ExecDef>,
    pub rpc: RpcSettings,
    pub events: EventsSettings,
    /// None: no Erlang front-end.
    pub erlang: Option<ErlangSettings>,
    /// Routes whose requests go to an Erlang process: (route, target).
    pub remote_routes: Vec<(String, ErlangTarget)>,
}

/// A tenant: its kv limits and which events its plugins may fire and
/// subscribe to.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub kv: KvLimits,
    pub fire: EventAcl,
    pub subscribe: EventAcl,
}

impl Tenant {
    /// The default tenant may fire and subscribe to anything.
    fn default_tenant() -> Tenant {
        Tenant {
            kv: KvLimits::default(),
            fire: EventAcl::new(vec!["ALL".into()]),
            subscribe: EventAcl::new(vec!["ALL".into()]),
        }
    }

    /// A named tenant, unless configured otherwise, only its own CUSTOM
    /// subclasses: `CUSTOM:<tenant>::…`.
    fn named(name: &str) -> Tenant {
        let own = EventAcl::new(vec![format!("CUSTOM:{name}::")]);
        Tenant { kv: KvLimits::default(), fire: own.clone(), subscribe: own }
    }
}

/// Event names a tenant may use: `ALL`, an exact `NAME`, or
/// `CUSTOM:PREFIX` for CUSTOM events whose subclass starts with PREFIX.
#[derive(Clone, Debug)]
pub struct EventAcl {
    entries: Vec<String>,
}

impl EventAcl {
    pub fn new(entries: Vec<String>) -> EventAcl {
        EventAcl { entries }
    }

    /// Whether `name` (with `subclass`) is allowed. Subscribing to `ALL`,
    /// or to CUSTOM without a subclass, needs `ALL`.
    pub fn allows(&self, name: &str, subclass: Option<&str>) -> bool {
        self.entries.iter().any(|e| {
            e == "ALL"
                || (e == name && name != "CUSTOM" && name != "ALL")
                || match (e.strip_prefix("CUSTOM:"), subclass) {
                    (Some(prefix), Some(sub)) => name == "CUSTOM" && sub.starts_with(prefix),
                    _ => false,
                }
        })
    }
}

/// `[events]`.
#[derive(Clone, Debug)]
pub struct EventsSettings {
    /// HEARTBEAT every so often; None never.
    pub heartbeat: Option<Duration>,
    /// E_CORE_LOG for log lines at this level and above; None off.
    pub log: Option<tracing::Level>,
    /// E_CORE_SHM_THRESHOLD when the daemon's resident memory passes
    /// `shm_threshold` percent of this; None off.
    pub shm_limit_bytes: Option<u64>,
    pub shm_threshold: u8,
    /// The default of every plugin's `pkg_threshold`.
    pub pkg_threshold: u8,
    /// Events waiting per subscriber; past this they are dropped and counted.
    pub queue: usize,
    /// External subscribers from the start: (event, socket).
    pub subscribe: Vec<(String, String)>,
}

// ---- the file's shape -------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    runtime: RuntimeSection,
    #[serde(default)]
    tenant: Vec<TenantSection>,
    #[serde(default)]
    plugin: Vec<PluginSection>,
    #[serde(default)]
    route: Vec<RouteSection>,
    #[serde(default)]
    exec: Vec<ExecSection>,
    #[serde(default)]
    rpc: RpcSection,
    #[serde(default)]
    events: EventsSection,
    erlang: Option<erlang::ErlangSection>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventsSection {
    heartbeat_s: Option<u64>,
    log: Option<Spanned<String>>,
    shm_limit_mb: Option<u64>,
    shm_threshold: Option<Spanned<u8>>,
    pkg_threshold: Option<Spanned<u8>>,
    queue: Option<Spanned<usize>>,
    #[serde(default)]
    subscribe: Vec<SubscribeSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeSection {
    event: String,
    socket: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecSection {
    name: Spanned<String>,
    plugin: Option<Spanned<String>>,
    workers: Option<u32>,
    /// Microseconds, as evrexec's `wait`.
    wait: Option<u64>,
    sockaddr: Option<Spanned<String>>,
    queue: Option<Spanned<usize>>,
    recv_buffer: Option<usize>,
    reply: Option<bool>,
    restart_min_ms: Option<Spanned<u64>>,
    restart_max_ms: Option<u64>,
    #[serde(default)]
    profiling: bool,
    coalesce_us: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuntimeSection {
    /// false disables the compiled-code cache.
    cache: Option<bool>,
    cache_dir: Option<String>,
    epoch_tick_ms: Option<Spanned<u64>>,
    max_instances: Option<Spanned<u32>>,
    max_memory_mb: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantSection {
    name: Spanned<String>,
    kv_max_keys: Option<usize>,
    kv_max_key_bytes: Option<usize>,
    kv_max_value_bytes: Option<usize>,
    events_fire: Option<Vec<String>>,
    events_subscribe: Option<Vec<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum IsolationName {
    Reuse,
    PerCall,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginSection {
    name: Spanned<String>,
    path: Spanned<String>,
    tenant: Option<Spanned<String>>,
    isolation: Option<IsolationName>,
    fuel: Option<Spanned<u64>>,
    deadline_ms: Option<Spanned<u64>>,
    warn_ms: Option<Spanned<u64>>,
    memory_mb: Option<Spanned<u64>>,
    min_instances: Option<Spanned<usize>>,
    max_instances: Option<Spanned<usize>>,
    max_reply_bytes: Option<usize>,
    max_log_line_bytes: Option<usize>,
    max_log_lines: Option<usize>,
    max_event_bytes: Option<usize>,
    /// Percent of memory_mb; E_CORE_PKG_THRESHOLD when an instance passes it.
    pkg_threshold: Option<Spanned<u8>>,
    /// Idle instances above min_instances live this long.
    idle_ms: Option<u64>,
    /// E_PROFILING_SCRIPT records for each route call.
    #[serde(default)]
    profiling: bool,
    capabilities: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    preopen: Vec<PreopenSection>,
    #[serde(default)]
    config: BTreeMap<String, Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreopenSection {
    host: Spanned<String>,
    guest: String,
    #[serde(default = "yes")]
    read_only: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RpcSection {
    /// "IP:PORT", or "" to disable.
    listen: Option<Spanned<String>>,
    token: Option<String>,
    unix: Option<String>,
}

pub const DEFAULT_RPC_LISTEN: &str = "127.0.0.1:7080";
/// `[[exec]] coalesce_us` by default: on this 2-core machine 100 µs cut
/// the CPU per datagram by a third under load (cargo bench --bench udp).
pub const DEFAULT_COALESCE_US: u64 = 100;

/// The longest duration a config value may give: a day.
const MAX_MS: u64 = 86_400_000;

// ---- checking ---------------------------------------------------------------

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
}

impl Checker<'_> {
    fn at<T>(&self, spanned: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        let offset = spanned.span().start.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        ConfigError::Invalid {
            file: self.file.to_string(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A positive number of milliseconds, at most a day.
    fn millis(&self, v: &Option<Spanned<u64>>, key: &str) -> Result<Option<u64>, ConfigError> {
        match v {
            Some(ms) if *ms.get_ref() > MAX_MS => Err(self.at(ms, key, "at most a day (86400000)")),
            _ => self.positive(v, key),
        }
    }

    fn positive<T: Copy + PartialOrd + Default>(
        &self,
        v: &Option<Spanned<T>>,
        key: &str,
    ) -> Result<Option<T>, ConfigError> {
        match v {
            Some(s) if *s.get_ref() <= T::default() => Err(self.at(s, key, "must be greater than 0")),
            Some(s) => Ok(Some(*s.get_ref())),
            None => Ok(None),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, "(embedded default)", Path::new("."))
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Config::parse(&text, &file, base)
    }

    /// Parses and checks a configuration; relative plugin paths are taken
    /// from `base`.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: File =
            toml::from_str(text).map_err(|e| ConfigError::Syntax { file: file.to_string(), message: e.to_string() })?;
        let ck = Checker { file, text };

        let defaults = EngineSettings::default();
        let rt = &raw.runtime;
        let tick_ms = ck.positive(&rt.epoch_tick_ms, "runtime.epoch_tick_ms")?.unwrap_or(1);
        let max_memory_mb = ck.positive(&rt.max_memory_mb, "runtime.max_memory_mb")?;
        let engine = EngineSettings {
            tick: Duration::from_millis(tick_ms),
            total_instances: ck
                .positive(&rt.max_instances, "runtime.max_instances")?
                .unwrap_or(defaults.total_instances),
            max_memory_bytes: max_memory_mb.map_or(defaults.max_memory_bytes, |mb| (mb as usize) << 20),
        };
        let cache_dir = match (rt.cache, &rt.cache_dir) {
            (Some(false), _) => None,
            (_, Some(dir)) => Some(base.join(dir)),
            _ => crate::runtime::ComponentCache::default_dir(),
        };

        let mut tenants = HashMap::new();
        tenants.insert("default".to_string(), Tenant::default_tenant());
        for t in &raw.tenant {
            let name = t.name.get_ref();
            if !valid_name(name) {
                return Err(ck.at(&t.name, "tenant.name", "use 1-64 letters, digits, `_`, `-` or `.`"));
            }
            let d = KvLimits::default();
            let kv = KvLimits {
                max_keys: t.kv_max_keys.unwrap_or(d.max_keys),
                max_key_bytes: t.kv_max_key_bytes.unwrap_or(d.max_key_bytes),
                max_value_bytes: t.kv_max_value_bytes.unwrap_or(d.max_value_bytes),
            };
            let fallback = if name == "default" { Tenant::default_tenant() } else { Tenant::named(name) };
            let tenant = Tenant {
                kv,
                fire: t.events_fire.clone().map_or(fallback.fire, EventAcl::new),
                subscribe: t.events_subscribe.clone().map_or(fallback.subscribe, EventAcl::new),
            };
            if tenants.insert(name.clone(), tenant).is_some() && name != "default" {
                return Err(ck.at(&t.name, "tenant.name", format!("tenant `{name}` is defined twice")));
            }
        }

        let events = check_events(&ck, &raw.events)?;

        let mut plugins = Vec::new();
        let mut names = HashSet::new();
        for p in &raw.plugin {
            plugins.push(check_plugin(&ck, p, base, &tenants, &engine, &events, &mut names)?);
        }

        let mut routes = Vec::new();
        let mut remote_routes: Vec<(String, ErlangTarget)> = Vec::new();
        for r in &raw.route {
            let name = r.name.get_ref();
            if name.is_empty() || name.len() > 256 {
                return Err(ck.at(&r.name, "route.name", "must be 1 to 256 bytes"));
            }
            let plugin = match (&r.plugin, &r.erlang) {
                (Some(plugin), None) => plugin,
                (None, Some(target)) => {
                    let parsed = ErlangTarget::parse(target.get_ref()).map_err(|m| ck.at(target, "route.erlang", m))?;
                    if raw.erlang.is_none() {
                        return Err(ck.at(
                            target,
                            "route.erlang",
                            "needs an [erlang] section (the C-node it goes through)",
                        ));
                    }
                    if remote_routes.iter().any(|(n, _)| n == name) {
                        return Err(ck.at(&r.name, "route.name", format!("route `{name}` has two Erlang targets")));
                    }
                    remote_routes.push((name.clone(), parsed));
                    continue;
                }
                _ => return Err(ck.at(&r.name, "route", "give exactly one of `plugin` or `erlang`")),
            };
            let plugin_name = plugin.get_ref();
            if !names.contains(plugin_name.as_str()) {
                return Err(ck.at(plugin, "route.plugin", format!("no plugin named `{plugin_name}` is configured")));
            }
            routes.push(RouteDef { name: name.clone(), plugin: plugin_name.clone(), priority: r.priority });
        }

        let listen = match &raw.rpc.listen {
            None => Some(DEFAULT_RPC_LISTEN.parse().expect("the default listen address is valid")),
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => Some(
                s.get_ref().parse::<SocketAddr>().map_err(|e| ck.at(s, "rpc.listen", format!("not IP:PORT ({e})")))?,
            ),
        };
        let rpc = RpcSettings {
            listen,
            unix: raw.rpc.unix.as_ref().filter(|p| !p.is_empty()).map(|p| base.join(p)),
            token: raw.rpc.token.clone().filter(|t| !t.is_empty()),
        };

        let mut exec = Vec::new();
        for e in &raw.exec {
            exec.push(check_exec(&ck, e, &names, &routes, &remote_routes)?);
        }
        let mut addrs = HashSet::new();
        for (def, section) in exec.iter().zip(&raw.exec) {
            if let (ExecKind::Udp(udp), Some(sockaddr)) = (&def.kind, &section.sockaddr) {
                if !addrs.insert(udp.addr) {
                    return Err(ck.at(sockaddr, "exec.sockaddr", format!("{} is used by two exec entries", udp.addr)));
                }
            }
        }

        if let Some((name, _)) = remote_routes.iter().find(|(n, _)| routes.iter().any(|r| &r.name == n)) {
            return Err(ConfigError::Erlang(format!("route `{name}` names both plugins and an Erlang process")));
        }
        let erlang = raw.erlang.as_ref().map(|e| erlang::check(&ck, e, base)).transpose()?;

        Ok(Config { engine, cache_dir, tenants, plugins, routes, exec, rpc, events, erlang, remote_routes })
    }
}

fn check_events(ck: &Checker, e: &EventsSection) -> Result<EventsSettings, ConfigError> {
    let percent = |v: &Option<Spanned<u8>>, key: &str, default: u8| match v {
        Some(p) if *p.get_ref() > 100 => Err(ck.at(p, key, "a percentage, 0 to 100")),
        Some(p) => Ok(*p.get_ref()),
        None => Ok(default),
    };
    let log = match &e.log {
        None => None,
        Some(level) if level.get_ref() == "off" || level.get_ref().is_empty() => None,
        Some(level) => Some(
            level
                .get_ref()
                .parse::<tracing::Level>()
                .map_err(|_| ck.at(level, "events.log", "one of off, error, warn, info, debug, trace"))?,
        ),
    };
    let mut subscribe = Vec::new();
    for s in &e.subscribe {
        crate::bus::Target::parse(s.socket.get_ref()).map_err(|m| ck.at(&s.socket, "events.subscribe.socket", m))?;
        subscribe.push((s.event.clone(), s.socket.get_ref().clone()));
    }
    Ok(EventsSettings {
        heartbeat: match e.heartbeat_s {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s.min(MAX_MS / 1000))),
            None => Some(Duration::from_secs(20)),
        },
        log,
        shm_limit_bytes: e.shm_limit_mb.filter(|mb| *mb > 0).map(|mb| mb << 20),
        shm_threshold: percent(&e.shm_threshold, "events.shm_threshold", 80)?,
        pkg_threshold: percent(&e.pkg_threshold, "events.pkg_threshold", 0)?,
        queue: ck.positive(&e.queue, "events.queue")?.unwrap_or(1024),
        subscribe,
    })
}

/// `udp:IP:PORT`, with IPv6 as `udp:[::1]:5060` or, as Kamailio writes
/// it, `udp:::1:5060`.
pub fn parse_sockaddr(text: &str) -> Result<SocketAddr, String> {
    let rest = text.strip_prefix("udp:").ok_or_else(|| format!("`{text}`: expected udp:IP:PORT"))?;
    if let Ok(addr) = rest.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (ip, port) = rest.rsplit_once(':').ok_or_else(|| format!("`{text}`: expected udp:IP:PORT"))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|e| format!("`{text}`: bad IP address `{ip}` ({e})"))?;
    let port: u16 = port.parse().map_err(|e| format!("`{text}`: bad port `{port}` ({e})"))?;
    Ok(SocketAddr::new(ip, port))
}

fn check_exec(
    ck: &Checker,
    e: &ExecSection,
    plugins: &HashSet<String>,
    routes: &[RouteDef],
    remote_routes: &[(String, ErlangTarget)],
) -> Result<ExecDef, ConfigError> {
    let name = e.name.get_ref().clone();
    if name.is_empty() {
        return Err(ck.at(&e.name, "exec.name", "must not be empty"));
    }
    // evrexec: 0 workers means 1.
    let workers = e.workers.unwrap_or(1).max(1);
    let kind = match &e.sockaddr {
        Some(sockaddr) => {
            let addr = parse_sockaddr(sockaddr.get_ref()).map_err(|m| ck.at(sockaddr, "exec.sockaddr", m))?;
            if !routes.iter().any(|r| r.name == name) && !remote_routes.iter().any(|(r, _)| *r == name) {
                return Err(ck.at(
                    &e.name,
                    "exec.name",
                    format!("no route named `{name}`: each datagram runs that route; add a [[route]] for it"),
                ));
            }
            if let Some(plugin) = &e.plugin {
                return Err(ck.at(
                    plugin,
                    "exec.plugin",
                    "a UDP exec runs its route; bind the plugin with a [[route]]",
                ));
            }
            let queue = match &e.queue {
                Some(q) if *q.get_ref() == 0 => return Err(ck.at(q, "exec.queue", "must be greater than 0")),
                Some(q) => *q.get_ref(),
                None => 8192,
            };
            ExecKind::Udp(UdpDef {
                addr,
                workers,
                queue,
                recv_buffer: e.recv_buffer,
                reply: e.reply.unwrap_or(true),
                profiling: e.profiling,
                coalesce: Duration::from_micros(match &e.coalesce_us {
                    Some(us) if *us.get_ref() > 10_000 => {
                        return Err(ck.at(us, "exec.coalesce_us", "at most 10000 (10 ms)"))
                    }
                    Some(us) => *us.get_ref(),
                    None => DEFAULT_COALESCE_US,
                }),
            })
        }
        None => {
            let Some(plugin) = &e.plugin else {
                return Err(ck.at(
                    &e.name,
                    "exec.plugin",
                    "a startup task needs the plugin whose `task` export it runs",
                ));
            };
            if !plugins.contains(plugin.get_ref()) {
                return Err(ck.at(
                    plugin,
                    "exec.plugin",
                    format!("no plugin named `{}` is configured", plugin.get_ref()),
                ));
            }
            let min = ck.millis(&e.restart_min_ms, "exec.restart_min_ms")?.unwrap_or(100);
            ExecKind::Task {
                plugin: plugin.get_ref().clone(),
                workers,
                wait: Duration::from_micros(e.wait.unwrap_or(0).min(MAX_MS * 1000)),
                backoff_min: Duration::from_millis(min),
                backoff_max: Duration::from_millis(e.restart_max_ms.unwrap_or(30_000).clamp(min, MAX_MS)),
            }
        }
    };
    Ok(ExecDef { name, kind })
}

fn check_plugin(
    ck: &Checker,
    p: &PluginSection,
    base: &Path,
    tenants: &HashMap<String, Tenant>,
    engine: &EngineSettings,
    events: &EventsSettings,
    names: &mut HashSet<String>,
) -> Result<PluginDef, ConfigError> {
    let name = p.name.get_ref();
    if !valid_name(name) {
        return Err(ck.at(&p.name, "plugin.name", "use 1-64 letters, digits, `_`, `-` or `.`"));
    }
    if !names.insert(name.clone()) {
        return Err(ck.at(&p.name, "plugin.name", format!("plugin `{name}` is defined twice")));
    }
    let code = CodeSource::parse(p.path.get_ref(), base).map_err(|m| ck.at(&p.path, "plugin.path", m))?;
    let tenant = match &p.tenant {
        Some(t) if !tenants.contains_key(t.get_ref()) => {
            return Err(ck.at(t, "plugin.tenant", format!("no tenant named `{}` is defined", t.get_ref())))
        }
        Some(t) => t.get_ref().clone(),
        None => "default".to_string(),
    };

    let d = Limits::default();
    let mut limits = Limits {
        fuel: ck.positive(&p.fuel, "plugin.fuel")?.unwrap_or(d.fuel),
        deadline: ck.millis(&p.deadline_ms, "plugin.deadline_ms")?.map_or(d.deadline, Duration::from_millis),
        warn_after: ck.millis(&p.warn_ms, "plugin.warn_ms")?.map(Duration::from_millis),
        memory_bytes: ck.positive(&p.memory_mb, "plugin.memory_mb")?.map_or(d.memory_bytes, |mb| (mb as usize) << 20),
        min_instances: p.min_instances.as_ref().map_or(d.min_instances, |s| *s.get_ref()),
        max_instances: ck.positive(&p.max_instances, "plugin.max_instances")?.unwrap_or(d.max_instances),
        isolation: match p.isolation {
            Some(IsolationName::PerCall) => Isolation::PerCall,
            Some(IsolationName::Reuse) | None => Isolation::Reuse,
        },
        max_reply_bytes: p.max_reply_bytes.unwrap_or(d.max_reply_bytes),
        max_log_line_bytes: p.max_log_line_bytes.unwrap_or(d.max_log_line_bytes).max(16),
        max_log_lines_per_call: p.max_log_lines.unwrap_or(d.max_log_lines_per_call),
        max_event_bytes: p.max_event_bytes.unwrap_or(d.max_event_bytes),
        pkg_threshold_pct: match &p.pkg_threshold {
            Some(t) if *t.get_ref() > 100 => return Err(ck.at(t, "plugin.pkg_threshold", "a percentage, 0 to 100")),
            Some(t) => *t.get_ref(),
            None => events.pkg_threshold,
        },
        idle_after: p.idle_ms.map_or(d.idle_after, |ms| Duration::from_millis(ms.min(MAX_MS))),
    };
    if let Some(m) = &p.memory_mb {
        if limits.memory_bytes > engine.max_memory_bytes {
            return Err(ck.at(
                m,
                "plugin.memory_mb",
                format!("exceeds runtime.max_memory_mb ({} MiB)", engine.max_memory_bytes >> 20),
            ));
        }
    }
    if let Some(min) = &p.min_instances {
        if *min.get_ref() > limits.max_instances {
            return Err(ck.at(
                min,
                "plugin.min_instances",
                format!("is more than max_instances ({})", limits.max_instances),
            ));
        }
    }
    if limits.isolation == Isolation::PerCall {
        limits.min_instances = 0;
    }

    let capabilities = match &p.capabilities {
        None => Capabilities::all(),
        Some(list) => {
            let mut caps = Capabilities::none();
            for c in list {
                if !caps.grant(c.get_ref()) {
                    return Err(ck.at(
                        c,
                        "plugin.capabilities",
                        format!("unknown capability `{}`; known: {}", c.get_ref(), Capabilities::NAMES.join(", ")),
                    ));
                }
            }
            caps
        }
    };

    let mut config = BTreeMap::new();
    for (key, value) in &p.config {
        let text = match value.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            _ => return Err(ck.at(value, &format!("plugin.config.{key}"), "must be a string, number or boolean")),
        };
        config.insert(key.clone(), text);
    }

    let mut preopens = Vec::new();
    for dir in &p.preopen {
        let host = base.join(dir.host.get_ref());
        if !host.is_dir() {
            return Err(ck.at(&dir.host, "plugin.preopen.host", format!("{} is not a directory", host.display())));
        }
        preopens.push(Preopen { host, guest: dir.guest.clone(), read_only: dir.read_only });
    }

    let spec = PluginSpec {
        name: name.clone(),
        tenant,
        source: code.describe(),
        limits,
        capabilities,
        config,
        preopens,
        profiling: p.profiling,
    };
    Ok(PluginDef { spec, code })
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
        match &ok.exec[0].kind {
            ExecKind::Udp(udp) => assert_eq!(udp.addr, "[::1]:5060".parse().unwrap()),
            other => panic!("{other:?}"),
        }
        let task =
            parse(&format!("{base}[[exec]]\nname = \"evrexec:timer\"\nplugin = \"p\"\nworkers = 0\nwait = 1000\n"))
                .unwrap();
        match &task.exec[0].kind {
            ExecKind::Task { workers, wait, .. } => assert_eq!((*workers, *wait), (1, Duration::from_micros(1000))),
            other => panic!("{other:?}"),
        }
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
        assert_eq!(p.spec.limits.isolation, Isolation::PerCall);
        assert_eq!(p.spec.config.get("n").map(String::as_str), Some("3"));
    }
}
