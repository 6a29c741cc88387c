//! `[[plugin]]`: where a plugin's code comes from, its tenant, limits,
//! capabilities, config table and preopened directories.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::checker::{valid_name, Checker, MAX_MS};
use super::events::EventsSettings;
use super::tenant::Tenant;
use super::{BadValue, ConfigError};
use crate::runtime::{Capabilities, EngineSettings, Isolation, Limits, PluginSpec, Preopen};

/// Plugins compiled into the binary, usable as `path = "builtin:NAME"`:
/// the examples of `plugins/` (not the hostile fixtures), so that the
/// embedded default and every config in `examples/` run from any directory.
pub const BUILTIN_PLUGINS: [(&str, &[u8]); 10] = [
    ("echo", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/echo.wasm"))),
    ("counter", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/counter.wasm"))),
    ("kvcount", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/kvcount.wasm"))),
    ("timer", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/timer.wasm"))),
    ("listener", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/listener.wasm"))),
    ("xlog", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/xlog.wasm"))),
    ("directory", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/directory.wasm"))),
    ("sipoptions", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/sipoptions.wasm"))),
    ("yateauth", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/yateauth.wasm"))),
    ("yateroute", include_bytes!(concat!(env!("EVRHOST_PLUGINS_DIR"), "/yateroute.wasm"))),
];

/// The largest plugin file read: components built by componentize-py carry
/// a Python runtime (tens of MiB); past this a file is refused unread.
pub const MAX_PLUGIN_BYTES: u64 = 128 << 20;

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
    pub fn parse(text: &str, base: &Path) -> Result<CodeSource, BadValue> {
        if let Some(name) = text.strip_prefix("builtin:") {
            return BUILTIN_PLUGINS.iter().find(|(n, _)| *n == name).map(|(n, _)| CodeSource::Builtin(n)).ok_or_else(
                || {
                    let known: Vec<&str> = BUILTIN_PLUGINS.iter().map(|(n, _)| *n).collect();
                    BadValue(format!("no builtin plugin `{name}`; there are: {}", known.join(", ")))
                },
            );
        }
        if text.is_empty() {
            return Err(BadValue("empty path".into()));
        }
        Ok(CodeSource::File(base.join(text)))
    }

    /// The code, at most [`MAX_PLUGIN_BYTES`]; a path that is not a regular
    /// file (a device, a FIFO) is refused before anything is read. Read in
    /// one blocking read into a buffer of the file's size and kept without
    /// another copy: an interpreter's component is tens of MB, read at each
    /// reload.
    pub async fn read(&self) -> std::io::Result<bytes::Bytes> {
        match self {
            CodeSource::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file(&path)).await.map_err(std::io::Error::other)?
            }
            CodeSource::Builtin(name) => BUILTIN_PLUGINS
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, bytes)| bytes::Bytes::from_static(bytes))
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no builtin `{name}`"))),
        }
    }
}

/// What tells one state of a file from another without reading it: a
/// rewrite changes the size, the times or the inode, and the change time
/// cannot be set back by the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl CodeSource {
    /// The file's identity now; None for a builtin or a file that cannot be
    /// stat'ed (reading it then says why).
    pub async fn identity(&self) -> Option<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let CodeSource::File(path) = self else { return None };
        let meta = tokio::fs::metadata(path).await.ok().filter(|m| m.is_file())?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }
}

fn read_file(path: &std::path::Path) -> std::io::Result<bytes::Bytes> {
    use std::io::Read;
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() > MAX_PLUGIN_BYTES {
        return Err(invalid(format!("{} bytes, over the limit of {MAX_PLUGIN_BYTES}", meta.len())));
    }
    // One byte of room past the size, so a file that grew since is noticed
    // without a second allocation.
    let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
    file.take(MAX_PLUGIN_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_PLUGIN_BYTES {
        return Err(invalid(format!("over the limit of {MAX_PLUGIN_BYTES} bytes")));
    }
    Ok(bytes.into())
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
    pub fn with_defaults(name: &str, path: &str) -> Result<PluginDef, BadValue> {
        if !valid_name(name) {
            return Err(BadValue(format!("plugin name `{name}`: use 1-64 letters, digits, `_`, `-` or `.`")));
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
            trace: false,
            host_commands: Vec::new(),
        };
        Ok(PluginDef { spec, code })
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum IsolationName {
    Reuse,
    PerCall,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PluginSection {
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
    max_reply_bytes: Option<Spanned<usize>>,
    max_log_line_bytes: Option<Spanned<usize>>,
    max_log_lines: Option<Spanned<usize>>,
    max_log_bytes_per_s: Option<Spanned<u64>>,
    max_event_bytes: Option<Spanned<usize>>,
    /// Percent of memory_mb; E_CORE_PKG_THRESHOLD when an instance passes it.
    pkg_threshold: Option<Spanned<u8>>,
    /// Idle instances above min_instances live this long.
    idle_ms: Option<Spanned<u64>>,
    /// E_PROFILING_SCRIPT records for each route call.
    #[serde(default)]
    profiling: bool,
    /// Log each host import the plugin's calls make (app_lua's log_mode).
    #[serde(default)]
    trace: bool,
    /// Host commands the plugin may call (`commands.call`).
    #[serde(default)]
    host_commands: Vec<Spanned<String>>,
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

/// What a plugin section is checked against.
pub(super) struct PluginContext<'a> {
    pub base: &'a Path,
    pub tenants: &'a HashMap<String, Tenant>,
    pub engine: &'a EngineSettings,
    pub events: &'a EventsSettings,
}

pub(super) fn check(
    ck: &Checker,
    p: &PluginSection,
    cx: &PluginContext,
    names: &mut HashSet<String>,
) -> Result<PluginDef, ConfigError> {
    let name = p.name.get_ref();
    if !valid_name(name) {
        return Err(ck.at(&p.name, "plugin.name", "use 1-64 letters, digits, `_`, `-` or `.`"));
    }
    if !names.insert(name.clone()) {
        return Err(ck.at(&p.name, "plugin.name", format!("plugin `{name}` is defined twice")));
    }
    let code = CodeSource::parse(p.path.get_ref(), cx.base).map_err(|m| ck.at(&p.path, "plugin.path", m.0))?;
    let tenant = match &p.tenant {
        Some(t) if !cx.tenants.contains_key(t.get_ref()) => {
            return Err(ck.at(t, "plugin.tenant", format!("no tenant named `{}` is defined", t.get_ref())))
        }
        Some(t) => t.get_ref().clone(),
        None => "default".to_string(),
    };
    let limits = limits(ck, p, cx)?;
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

    let mut host_commands = Vec::new();
    for c in &p.host_commands {
        let name = c.get_ref();
        if name.is_empty() || name.len() > 64 || name.contains(char::is_whitespace) {
            return Err(ck.at(c, "plugin.host_commands", "a command name: 1-64 bytes, no spaces"));
        }
        host_commands.push(name.clone());
    }

    let mut preopens = Vec::new();
    for dir in &p.preopen {
        let host = cx.base.join(dir.host.get_ref());
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
        trace: p.trace,
        host_commands,
    };
    Ok(PluginDef { spec, code })
}

fn limits(ck: &Checker, p: &PluginSection, cx: &PluginContext) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let mut limits = Limits {
        fuel: ck.positive(&p.fuel, "plugin.fuel")?.unwrap_or(d.fuel),
        deadline: ck.millis(&p.deadline_ms, "plugin.deadline_ms")?.map_or(d.deadline, Duration::from_millis),
        warn_after: ck.millis(&p.warn_ms, "plugin.warn_ms")?.map(Duration::from_millis),
        memory_bytes: ck
            .range(&p.memory_mb, "plugin.memory_mb", 1, super::runtime::MAX_MEMORY_MB)?
            .map_or(d.memory_bytes, |mb| (mb as usize) << 20),
        min_instances: p.min_instances.as_ref().map_or(d.min_instances, |s| *s.get_ref()),
        max_instances: ck
            .range(&p.max_instances, "plugin.max_instances", 1, super::runtime::MAX_INSTANCES as usize)?
            .unwrap_or(d.max_instances),
        isolation: match p.isolation {
            Some(IsolationName::PerCall) => Isolation::PerCall,
            Some(IsolationName::Reuse) | None => Isolation::Reuse,
        },
        max_reply_bytes: ck
            .range(&p.max_reply_bytes, "plugin.max_reply_bytes", 1, 64 << 20)?
            .unwrap_or(d.max_reply_bytes),
        max_log_line_bytes: ck
            .range(&p.max_log_line_bytes, "plugin.max_log_line_bytes", 16, 1 << 20)?
            .unwrap_or(d.max_log_line_bytes),
        max_log_lines_per_call: ck
            .range(&p.max_log_lines, "plugin.max_log_lines", 0, 1_000_000)?
            .unwrap_or(d.max_log_lines_per_call),
        max_log_bytes_per_s: ck
            .range(&p.max_log_bytes_per_s, "plugin.max_log_bytes_per_s", 1024, 1 << 30)?
            .unwrap_or(d.max_log_bytes_per_s),
        max_event_bytes: ck
            .range(&p.max_event_bytes, "plugin.max_event_bytes", 1, 16 << 20)?
            .unwrap_or(d.max_event_bytes),
        pkg_threshold_pct: ck.percent(&p.pkg_threshold, "plugin.pkg_threshold", cx.events.pkg_threshold)?,
        idle_after: ck.range(&p.idle_ms, "plugin.idle_ms", 0, MAX_MS)?.map_or(d.idle_after, Duration::from_millis),
    };
    if let Some(m) = &p.memory_mb {
        if limits.memory_bytes > cx.engine.max_memory_bytes {
            return Err(ck.at(
                m,
                "plugin.memory_mb",
                format!("exceeds runtime.max_memory_mb ({} MiB)", cx.engine.max_memory_bytes >> 20),
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
    Ok(limits)
}
