//! `[erlang]`: the C-node front-end, with mod_erlang_event's parameter
//! names (`listen-ip`, `listen-port`, `nodename`, `cookie`, `cookie-file`,
//! `shortname`, `encoding`, `apply-inbound-acl`), and the Erlang targets a
//! `[[route]]` may name instead of a plugin (`route.rs` reads those; they
//! travel here, to the front-end that registers them).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::checker::Checker;
use super::{BadValue, ConfigError};

pub const DEFAULT_ERLANG_PORT: u16 = 8031;

/// How text goes out to Erlang: as strings (lists of bytes, what
/// mod_erlang_event sends by default) or as binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    String,
    Binary,
}

/// A route handler that is an Erlang process.
#[derive(Clone, Debug)]
pub struct ErlangRoute {
    pub route: String,
    pub priority: i32,
    pub target: ErlangTarget,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ErlangSection {
    listen_ip: Option<Spanned<String>>,
    listen_port: Option<u16>,
    nodename: Option<Spanned<String>>,
    cookie: Option<Spanned<String>>,
    cookie_file: Option<Spanned<String>>,
    #[serde(default = "yes")]
    shortname: bool,
    encoding: Option<Spanned<String>>,
    #[serde(default)]
    apply_inbound_acl: Vec<Spanned<String>>,
    max_frame_kb: Option<Spanned<usize>>,
    route_timeout_ms: Option<Spanned<u64>>,
    fetch_timeout_ms: Option<Spanned<u64>>,
    write_timeout_ms: Option<Spanned<u64>>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug)]
pub struct ErlangSettings {
    pub listen: SocketAddr,
    /// `name` or `name@host`.
    pub nodename: String,
    pub shortname: bool,
    pub cookie: String,
    pub encoding: Encoding,
    /// Empty: any address (the cookie still applies).
    pub acl: Vec<Cidr>,
    /// A frame larger than this ends the connection.
    pub max_frame: usize,
    /// How long an outbound route waits for get_pid, rpc and its reply.
    pub route_timeout: Duration,
    /// How long a fetch waits for the first `fetch_reply` (FreeSWITCH: 5 s).
    pub fetch_timeout: Duration,
    /// A peer that reads nothing for this long is disconnected.
    pub write_timeout: Duration,
    /// Routes handled by Erlang processes.
    pub routes: Vec<ErlangRoute>,
}

/// An IP network, `10.0.0.0/8` or `::1/128`; a bare address is one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, BadValue> {
        let (ip, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let net: IpAddr = ip.trim().parse().map_err(|_| BadValue(format!("`{s}`: not an IP address or CIDR")))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| BadValue(format!("`{s}`: the prefix length must be 0 to {max}")))?,
        };
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An Erlang process a route hands its requests to, as the `erlang`
/// dialplan application names one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErlangTarget {
    /// `myhandler node@host`: a registered process.
    Registered { name: String, node: String },
    /// `myhandler:! node@host`: ask the registered process for a pid
    /// (`{get_pid, UUID, Ref, Pid}` answered `{Ref, NewPid}`).
    GetPid { name: String, node: String },
    /// `mod:fun node@host`: `rpc:call(Node, mod, fun, [Ref])` returns
    /// `{Ref, NewPid}`.
    Rpc { module: String, function: String, node: String },
}

impl ErlangTarget {
    pub fn parse(s: &str) -> Result<ErlangTarget, BadValue> {
        let usage = "expected `process node@host`, `process:! node@host` or `module:function node@host`";
        let mut words = s.split_whitespace();
        let (Some(what), Some(node), None) = (words.next(), words.next(), words.next()) else {
            return Err(BadValue(format!("`{s}`: {usage}")));
        };
        let Some((name, host)) = node.split_once('@') else {
            return Err(BadValue(format!("`{node}`: a node name is name@host")));
        };
        if name.is_empty() || host.is_empty() {
            return Err(BadValue(format!("`{node}`: a node name is name@host")));
        }
        let node = node.to_string();
        let atom_ok = |a: &str| !a.is_empty() && a.len() <= 255;
        match what.split_once(':') {
            None if atom_ok(what) => Ok(ErlangTarget::Registered { name: what.into(), node }),
            Some((name, "!")) if atom_ok(name) => Ok(ErlangTarget::GetPid { name: name.into(), node }),
            Some((module, function)) if atom_ok(module) && atom_ok(function) => {
                Ok(ErlangTarget::Rpc { module: module.into(), function: function.into(), node })
            }
            _ => Err(BadValue(format!("`{s}`: {usage}"))),
        }
    }

    pub fn node(&self) -> &str {
        match self {
            ErlangTarget::Registered { node, .. }
            | ErlangTarget::GetPid { node, .. }
            | ErlangTarget::Rpc { node, .. } => node,
        }
    }
}

impl std::fmt::Display for ErlangTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErlangTarget::Registered { name, node } => write!(f, "{name} {node}"),
            ErlangTarget::GetPid { name, node } => write!(f, "{name}:! {node}"),
            ErlangTarget::Rpc { module, function, node } => write!(f, "{module}:{function} {node}"),
        }
    }
}

/// The cookie: `cookie`, else `cookie-file`, else `$HOME/.erlang.cookie`.
fn cookie(ck: &Checker, e: &ErlangSection, base: &Path) -> Result<String, ConfigError> {
    if let Some(c) = &e.cookie {
        if c.get_ref().is_empty() || c.get_ref().len() > 255 {
            return Err(ck.at(c, "erlang.cookie", "must be 1 to 255 bytes"));
        }
        return Ok(c.get_ref().clone());
    }
    let (path, at): (PathBuf, Option<&Spanned<String>>) = match &e.cookie_file {
        Some(f) => (base.join(f.get_ref()), Some(f)),
        None => match std::env::var_os("HOME") {
            Some(home) => (Path::new(&home).join(".erlang.cookie"), None),
            None => return Err(ConfigError::Erlang("no `cookie`, no `cookie-file` and no $HOME".into())),
        },
    };
    // A cookie is at most 255 bytes: a larger file is not one.
    let read = std::fs::metadata(&path)
        .and_then(|m| {
            if m.is_file() && m.len() <= 4096 {
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a cookie file (a regular file of at most 4096 bytes)",
                ))
            }
        })
        .and_then(|()| std::fs::read_to_string(&path))
        .map(|s| s.trim().to_string());
    match (read, at) {
        (Ok(c), _) if !c.is_empty() => Ok(c),
        (Ok(_), Some(f)) => Err(ck.at(f, "erlang.cookie-file", format!("{}: the file is empty", path.display()))),
        (Err(e), Some(f)) => Err(ck.at(f, "erlang.cookie-file", format!("{}: {e}", path.display()))),
        (result, None) => Err(ConfigError::Erlang(format!(
            "no `cookie` or `cookie-file` given, and {} {}",
            path.display(),
            match result {
                Ok(_) => "is empty".to_string(),
                Err(e) => format!("cannot be read ({e})"),
            }
        ))),
    }
}

/// The section's settings; `routes` are the Erlang handlers `[[route]]`
/// entries named.
pub(super) fn check(
    ck: &Checker,
    e: &ErlangSection,
    base: &Path,
    routes: Vec<ErlangRoute>,
) -> Result<ErlangSettings, ConfigError> {
    let ip: IpAddr = match &e.listen_ip {
        None => IpAddr::from([0, 0, 0, 0]),
        Some(s) => s.get_ref().parse().map_err(|_| ck.at(s, "erlang.listen-ip", "not an IP address"))?,
    };
    let nodename = match &e.nodename {
        None => "evrhost".to_string(),
        Some(n) => {
            let v = n.get_ref();
            let name = v.split('@').next().unwrap_or("");
            let valid = !name.is_empty()
                && v.len() <= 255
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
                && v.split('@').count() <= 2
                && !v.ends_with('@');
            if !valid {
                return Err(ck.at(n, "erlang.nodename", "expected `name` or `name@host` (letters, digits, `_`, `-`)"));
            }
            v.clone()
        }
    };
    let encoding = match e.encoding.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None | Some((_, "string")) => Encoding::String,
        Some((_, "binary")) => Encoding::Binary,
        Some((s, _)) => return Err(ck.at(s, "erlang.encoding", "`string` or `binary`")),
    };
    let mut acl = Vec::new();
    for entry in &e.apply_inbound_acl {
        acl.push(Cidr::parse(entry.get_ref()).map_err(|m| ck.at(entry, "erlang.apply-inbound-acl", m.0))?);
    }
    let max_frame_kb = ck.range(&e.max_frame_kb, "erlang.max-frame-kb", 1, 1 << 20)?.unwrap_or(16 * 1024);
    Ok(ErlangSettings {
        listen: SocketAddr::new(ip, e.listen_port.unwrap_or(DEFAULT_ERLANG_PORT)),
        nodename,
        shortname: e.shortname,
        cookie: cookie(ck, e, base)?,
        encoding,
        acl,
        max_frame: max_frame_kb.saturating_mul(1024),
        route_timeout: Duration::from_millis(
            ck.millis(&e.route_timeout_ms, "erlang.route-timeout-ms")?.unwrap_or(5000),
        ),
        fetch_timeout: Duration::from_millis(
            ck.millis(&e.fetch_timeout_ms, "erlang.fetch-timeout-ms")?.unwrap_or(5000),
        ),
        write_timeout: Duration::from_millis(
            ck.millis(&e.write_timeout_ms, "erlang.write-timeout-ms")?.unwrap_or(10_000),
        ),
        routes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_networks() {
        let lan = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(lan.contains("10.1.2.3".parse().unwrap()));
        assert!(!lan.contains("11.0.0.1".parse().unwrap()));
        assert!(lan.contains("::ffff:10.0.0.1".parse().unwrap()), "IPv4-mapped addresses count as IPv4");
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("lan").is_err());
    }

    #[test]
    fn targets_parse_as_the_dialplan_writes_them() {
        assert_eq!(
            ErlangTarget::parse("myhandler mynode@host"),
            Ok(ErlangTarget::Registered { name: "myhandler".into(), node: "mynode@host".into() })
        );
        assert!(matches!(ErlangTarget::parse("myhandler:! n@h"), Ok(ErlangTarget::GetPid { .. })));
        assert!(matches!(ErlangTarget::parse("myhandler:launch n@h"), Ok(ErlangTarget::Rpc { .. })));
        assert!(ErlangTarget::parse("myhandler").is_err());
        assert!(ErlangTarget::parse("myhandler nohost").is_err());
        assert_eq!(ErlangTarget::parse("m:f n@h").unwrap().to_string(), "m:f n@h");
    }
}
