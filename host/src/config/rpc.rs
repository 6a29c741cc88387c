//! `[rpc]`: the JSON-RPC front-end's listeners.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::checker::Checker;
use super::{BadValue, ConfigError};

pub const DEFAULT_RPC_LISTEN: &str = "127.0.0.1:7080";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RpcSection {
    /// "IP:PORT", or "" to disable.
    listen: Option<Spanned<String>>,
    token: Option<String>,
    unix: Option<String>,
    /// Off loopback without a token: only when this says so.
    #[serde(default)]
    allow_unauthenticated: bool,
    /// Where `plugin.load` and `plugin.reload PATH` may read plugins from.
    plugin_dirs: Option<Vec<Spanned<String>>>,
}

#[derive(Clone, Debug)]
pub struct RpcSettings {
    /// None disables the listener.
    pub listen: Option<SocketAddr>,
    /// A UNIX stream socket serving JSON-RPC documents back to back.
    pub unix: Option<PathBuf>,
    /// Required as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
    /// A listener off loopback may serve without a token.
    pub allow_unauthenticated: bool,
    /// Directories (canonical) `plugin.load` and `plugin.reload PATH` may
    /// read from; by default those of the configured plugins.
    pub plugin_dirs: Vec<PathBuf>,
}

impl RpcSettings {
    /// No listener at all.
    pub fn none() -> RpcSettings {
        RpcSettings { listen: None, unix: None, token: None, allow_unauthenticated: false, plugin_dirs: Vec::new() }
    }

    /// Refuses a listener anyone on the network can reach without a token:
    /// JSON-RPC loads plugins and runs every command.
    pub fn check_exposure(&self) -> Result<(), BadValue> {
        match self.listen {
            Some(addr) if !addr.ip().is_loopback() && self.token.is_none() && !self.allow_unauthenticated => {
                Err(BadValue(format!(
                    "{addr} is reachable off this machine, and without a token anyone who reaches it can load \
                     plugins and run every command: set `token`, listen on loopback, or set \
                     `allow_unauthenticated = true` to accept that"
                )))
            }
            _ => Ok(()),
        }
    }

    /// `path` if it lies in one of `plugin_dirs` (symbolic links followed;
    /// the file itself need not exist yet, its directory must).
    pub fn confine(&self, path: &Path) -> Result<PathBuf, BadValue> {
        let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) => dir.to_path_buf(),
            None => PathBuf::from("."),
        };
        let outside = || {
            let dirs: Vec<String> = self.plugin_dirs.iter().map(|d| d.display().to_string()).collect();
            BadValue(format!(
                "{} is outside the plugin directories ([rpc] plugin_dirs: {})",
                path.display(),
                if dirs.is_empty() { "none".to_string() } else { dirs.join(", ") }
            ))
        };
        let dir = dir.canonicalize().map_err(|_| outside())?;
        let file = path.file_name().ok_or_else(outside)?;
        if self.plugin_dirs.iter().any(|d| dir.starts_with(d)) {
            Ok(dir.join(file))
        } else {
            Err(outside())
        }
    }
}

/// `plugin_paths`: where the configured plugins live, the default of
/// `plugin_dirs`.
pub(super) fn check(
    ck: &Checker,
    rpc: &RpcSection,
    base: &Path,
    plugin_paths: &[&Path],
) -> Result<RpcSettings, ConfigError> {
    let listen = match &rpc.listen {
        None => DEFAULT_RPC_LISTEN.parse().ok(),
        Some(s) if s.get_ref().is_empty() => None,
        Some(s) => {
            Some(s.get_ref().parse::<SocketAddr>().map_err(|e| ck.at(s, "rpc.listen", format!("not IP:PORT ({e})")))?)
        }
    };
    let plugin_dirs = match &rpc.plugin_dirs {
        Some(dirs) => {
            let mut canonical = Vec::new();
            for d in dirs {
                let path = base.join(d.get_ref());
                let dir = path
                    .canonicalize()
                    .ok()
                    .filter(|p| p.is_dir())
                    .ok_or_else(|| ck.at(d, "rpc.plugin_dirs", format!("{} is not a directory", path.display())))?;
                canonical.push(dir);
            }
            canonical
        }
        None => {
            let mut dirs: Vec<PathBuf> = plugin_paths.iter().filter_map(|p| p.parent()?.canonicalize().ok()).collect();
            dirs.sort();
            dirs.dedup();
            dirs
        }
    };
    let settings = RpcSettings {
        listen,
        unix: rpc.unix.as_ref().filter(|p| !p.is_empty()).map(|p| base.join(p)),
        token: rpc.token.clone().filter(|t| !t.is_empty()),
        allow_unauthenticated: rpc.allow_unauthenticated,
        plugin_dirs,
    };
    if let (Some(listen), Err(e)) = (&rpc.listen, settings.check_exposure()) {
        return Err(ck.at(listen, "rpc.listen", e.0));
    }
    Ok(settings)
}
