//! `[yate]`: evrhost as a Yate external module — where the engine is, the
//! messages to install (each bound to a route) and watch, the `setlocal`
//! settings sent at start, and the bounds of the connection.
//!
//! ```toml
//! [yate]
//! connect = "tcp:127.0.0.1:5040"   # or "unix:/run/yate/ext.sock", or "stdio"
//! watch = ["call.cdr"]
//! [yate.setlocal]
//! timeout = 2000
//! [[yate.install]]
//! message = "call.route"
//! priority = 90
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::checker::Checker;
use super::ConfigError;

/// The engine's default input buffer (`extmodule.cpp:45-50`).
pub const YATE_DEFAULT_BUFSIZE: usize = 8192;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct YateSection {
    connect: Spanned<String>,
    role: Option<Spanned<String>>,
    bufsize: Option<Spanned<usize>>,
    timeout_ms: Option<Spanned<u64>>,
    max_in_flight: Option<Spanned<usize>>,
    max_line_bytes: Option<Spanned<usize>>,
    reconnect_min_ms: Option<Spanned<u64>>,
    reconnect_max_ms: Option<Spanned<u64>>,
    #[serde(default)]
    watch: Vec<Spanned<String>>,
    #[serde(default)]
    setlocal: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    install: Vec<InstallSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallSection {
    message: Spanned<String>,
    priority: Option<Spanned<u32>>,
    route: Option<Spanned<String>>,
    filter_name: Option<Spanned<String>>,
    filter_value: Option<Spanned<String>>,
}

/// Where the engine is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum YateConnect {
    /// Spawned by Yate (`extmodule.conf` `[scripts]`): the protocol on
    /// stdin/stdout, logs on stderr.
    Stdio,
    /// A client of a Yate `[listener]` of `type=tcp`.
    Tcp(SocketAddr),
    /// A client of a Yate `[listener]` of `type=unix`.
    Unix(PathBuf),
}

/// One `%%>install`: a message name bound to a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YateInstall {
    pub message: String,
    /// None: the engine's default (100).
    pub priority: Option<u32>,
    pub route: String,
    pub filter: Option<(String, Option<String>)>,
}

/// The checked `[yate]` section.
#[derive(Clone, Debug)]
pub struct YateSettings {
    pub connect: YateConnect,
    /// `%%>connect:ROLE` as the first line on a socket; None when the
    /// listener has a role of its own (`role = ""`).
    pub role: Option<String>,
    /// The engine's input buffer, set with `setlocal bufsize` at start: no
    /// line evrhost sends is as long.
    pub bufsize: usize,
    /// How long a plugin's `messages.dispatch` waits for the answer.
    pub timeout: Duration,
    /// Engine messages handled at once; past it they are answered
    /// `processed=false` at once. Also bounds plugins' waiting dispatches.
    pub max_in_flight: usize,
    /// The longest line read from the engine; longer ones are skipped.
    pub max_line_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub installs: Vec<YateInstall>,
    pub watch: Vec<String>,
    /// `setlocal` name and value, sent in this order after `bufsize`.
    pub setlocal: Vec<(String, String)>,
}

/// Names the engine accepts in `setlocal` that a module may set, with
/// what kind of value (`extmodule.cpp:1572-1694`). `bufsize` is the
/// section's own key.
const SETLOCAL: &[(&str, Kind)] = &[
    ("id", Kind::Text),
    ("disconnected", Kind::Bool),
    ("trackparam", Kind::Text),
    ("reason", Kind::Text),
    ("timeout", Kind::Int),
    ("timebomb", Kind::Bool),
    ("maxqueue", Kind::Int),
    ("restart", Kind::Bool),
    ("reenter", Kind::Bool),
    ("selfwatch", Kind::Bool),
    ("setdata", Kind::Bool),
    ("settime", Kind::Bool),
    ("debuglevel", Kind::Int),
    ("debugname", Kind::Text),
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Bool,
    Int,
}

/// A name the engine takes raw on an `install` or `watch` line: it cannot
/// hold `:` (the field separator) nor a control byte.
fn raw_name_ok(name: &str) -> bool {
    name.len() <= 256 && !name.bytes().any(|b| b < 0x20 || b == b':')
}

/// A setlocal value: raw and trimmed by the engine.
fn setlocal_value(ck: &Checker, name: &str, v: &Spanned<toml::Value>) -> Result<String, ConfigError> {
    let key = format!("yate.setlocal.{name}");
    let Some((_, kind)) = SETLOCAL.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = SETLOCAL.iter().map(|(n, _)| *n).collect();
        let hint = if name == "bufsize" { "; set `bufsize` in [yate]".to_string() } else { String::new() };
        return Err(ck.at(v, &key, format!("not a setlocal a module may set (one of {}){hint}", known.join(", "))));
    };
    let text = match (kind, v.get_ref()) {
        (Kind::Bool, toml::Value::Boolean(b)) => b.to_string(),
        (Kind::Int, toml::Value::Integer(i)) if *i >= 0 => i.to_string(),
        (Kind::Text, toml::Value::String(s)) => s.clone(),
        (Kind::Bool, _) => return Err(ck.at(v, &key, "expected true or false")),
        (Kind::Int, _) => return Err(ck.at(v, &key, "expected a number, 0 or more")),
        (Kind::Text, _) => return Err(ck.at(v, &key, "expected a string")),
    };
    if text.is_empty() || text.len() > 1024 || text.trim() != text || text.bytes().any(|b| b < 0x20) {
        return Err(ck.at(
            v,
            &key,
            "1 to 1024 bytes, no control bytes, no blanks around it (an empty value would be a query)",
        ));
    }
    Ok(text)
}

fn parse_connect(text: &str, base: &Path) -> Result<YateConnect, String> {
    if text == "stdio" {
        return Ok(YateConnect::Stdio);
    }
    if let Some(addr) = text.strip_prefix("tcp:") {
        return addr.parse().map(YateConnect::Tcp).map_err(|_| format!("`{addr}`: expected tcp:IP:PORT"));
    }
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a socket path".into());
        }
        return Ok(YateConnect::Unix(base.join(path)));
    }
    Err(format!("`{text}`: expected \"stdio\", \"tcp:IP:PORT\" or \"unix:PATH\""))
}

pub(super) fn check(
    ck: &Checker,
    y: &YateSection,
    base: &Path,
    served: &HashSet<&str>,
) -> Result<YateSettings, ConfigError> {
    let connect = parse_connect(y.connect.get_ref(), base).map_err(|m| ck.at(&y.connect, "yate.connect", m))?;
    let role = match &y.role {
        None => Some("global".to_string()),
        Some(r) if r.get_ref().is_empty() => None,
        Some(r) if matches!(r.get_ref().as_str(), "global" | "channel") => Some(r.get_ref().clone()),
        Some(r) => return Err(ck.at(r, "yate.role", "`global`, `channel`, or \"\" for a listener with a role")),
    };
    if let (YateConnect::Stdio, Some(r)) = (&connect, &y.role) {
        if !r.get_ref().is_empty() {
            return Err(ck.at(r, "yate.role", "only for sockets: a script Yate spawns has no connect line"));
        }
    }
    let mut installs = Vec::new();
    let mut messages = HashSet::new();
    for i in &y.install {
        let message = i.message.get_ref();
        if message.is_empty() || !raw_name_ok(message) {
            return Err(ck.at(&i.message, "yate.install.message", "1 to 256 bytes, no `:` and no control bytes"));
        }
        if !messages.insert(message.clone()) {
            return Err(ck.at(&i.message, "yate.install.message", format!("`{message}` is installed twice")));
        }
        let route = i.route.as_ref().map_or(message, |r| r.get_ref());
        if !served.contains(route.as_str()) {
            let message = format!("no route named `{route}` is configured ([[route]] name = \"{route}\")");
            return Err(match &i.route {
                Some(r) => ck.at(r, "yate.install.route", message),
                None => ck.at(&i.message, "yate.install.message", message),
            });
        }
        let filter = match (&i.filter_name, &i.filter_value) {
            (None, None) => None,
            (None, Some(v)) => return Err(ck.at(v, "yate.install.filter_value", "needs `filter_name`")),
            (Some(n), v) => {
                if n.get_ref().is_empty() || n.get_ref().len() > 256 {
                    return Err(ck.at(n, "yate.install.filter_name", "1 to 256 bytes"));
                }
                Some((n.get_ref().clone(), v.as_ref().map(|v| v.get_ref().clone())))
            }
        };
        installs.push(YateInstall {
            message: message.clone(),
            priority: i.priority.as_ref().map(|p| *p.get_ref()),
            route: route.clone(),
            filter,
        });
    }
    let mut watch = Vec::new();
    for w in &y.watch {
        if !raw_name_ok(w.get_ref()) {
            return Err(ck.at(w, "yate.watch", "at most 256 bytes, no `:` and no control bytes (\"\" watches all)"));
        }
        if watch.contains(w.get_ref()) {
            return Err(ck.at(w, "yate.watch", format!("`{}` is watched twice", w.get_ref())));
        }
        watch.push(w.get_ref().clone());
    }
    let mut setlocal = Vec::new();
    for (name, value) in &y.setlocal {
        setlocal.push((name.clone(), setlocal_value(ck, name, value)?));
    }
    let reconnect_min = ck.millis(&y.reconnect_min_ms, "yate.reconnect_min_ms")?.unwrap_or(100);
    let reconnect_max = match &y.reconnect_max_ms {
        Some(max) if *max.get_ref() < reconnect_min => {
            return Err(ck.at(max, "yate.reconnect_max_ms", "must be at least reconnect_min_ms"))
        }
        given => ck.millis(given, "yate.reconnect_max_ms")?.unwrap_or(reconnect_min.max(5000)),
    };
    Ok(YateSettings {
        connect,
        role,
        bufsize: ck.range(&y.bufsize, "yate.bufsize", 2048, 65536)?.unwrap_or(YATE_DEFAULT_BUFSIZE),
        timeout: Duration::from_millis(ck.millis(&y.timeout_ms, "yate.timeout_ms")?.unwrap_or(10_000)),
        max_in_flight: ck.range(&y.max_in_flight, "yate.max_in_flight", 1, 100_000)?.unwrap_or(1024),
        max_line_bytes: ck.range(&y.max_line_bytes, "yate.max_line_bytes", 2048, 16 << 20)?.unwrap_or(1 << 20),
        reconnect_min: Duration::from_millis(reconnect_min),
        reconnect_max: Duration::from_millis(reconnect_max),
        installs,
        watch,
        setlocal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str =
        "[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\n[[route]]\nname = \"call.route\"\nplugin = \"p\"\n";

    fn parse(yate: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}[yate]\n{yate}"), "t.toml", Path::new("/etc/evrhost"))
    }

    fn error(yate: &str) -> String {
        parse(yate).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn a_full_section_is_stored_parsed() {
        let c = parse(
            "connect = \"unix:run/yate.sock\"\nwatch = [\"call.cdr\", \"\"]\nbufsize = 16384\n\
             [yate.setlocal]\ntimeout = 2000\nreenter = true\ntrackparam = \"evrhost\"\n\
             [[yate.install]]\nmessage = \"call.route\"\npriority = 90\nfilter_name = \"called\"\nfilter_value = \"^9\"\n",
        )
        .unwrap();
        let y = c.yate.unwrap();
        assert_eq!(y.connect, YateConnect::Unix(PathBuf::from("/etc/evrhost/run/yate.sock")));
        assert_eq!(y.role.as_deref(), Some("global"));
        assert_eq!(y.bufsize, 16384);
        assert_eq!(y.watch, ["call.cdr", ""]);
        let asked: Vec<(&str, &str)> = y.setlocal.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(asked, [("reenter", "true"), ("timeout", "2000"), ("trackparam", "evrhost")]);
        let install = &y.installs[0];
        assert_eq!(
            (install.message.as_str(), install.route.as_str(), install.priority),
            ("call.route", "call.route", Some(90))
        );
        assert_eq!(install.filter, Some(("called".to_string(), Some("^9".to_string()))));
    }

    #[test]
    fn bad_values_are_named_with_their_line() {
        assert_eq!(
            error("connect = \"tcp:localhost\"\n"),
            "t.toml:8:11: `yate.connect`: `localhost`: expected tcp:IP:PORT"
        );
        assert!(error("connect = \"stdio\"\nport = 1\n").contains("unknown field `port`"));
        assert!(error("connect = \"stdio\"\nrole = \"global\"\n").contains("only for sockets"));
        assert!(error("connect = \"stdio\"\nbufsize = 100\n").contains("must be 2048 to 65536"));
        let e = error("connect = \"stdio\"\n[[yate.install]]\nmessage = \"engine.timer\"\n");
        assert!(e.starts_with("t.toml:10:") && e.contains("no route named `engine.timer`"), "{e}");
        let e = error("connect = \"stdio\"\n[[yate.install]]\nmessage = \"a:b\"\nroute = \"call.route\"\n");
        assert!(e.contains("`yate.install.message`") && e.contains("no `:`"), "{e}");
        let e = error("connect = \"stdio\"\n[[yate.install]]\nmessage = \"call.route\"\n[[yate.install]]\nmessage = \"call.route\"\n");
        assert!(e.contains("installed twice"), "{e}");
        assert!(error("connect = \"stdio\"\n[yate.setlocal]\nbufsize = 9000\n").contains("set `bufsize` in [yate]"));
        assert!(error("connect = \"stdio\"\n[yate.setlocal]\nreenter = \"yes\"\n").contains("expected true or false"));
        assert!(error("connect = \"stdio\"\n[yate.setlocal]\nmystery = 1\n").contains("not a setlocal"));
        assert!(error("connect = \"stdio\"\n[yate.setlocal]\nreason = \" x\"\n").contains("no blanks around it"));
    }
}
