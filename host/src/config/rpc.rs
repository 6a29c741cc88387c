//! `[rpc]`: the JSON-RPC front-end's listeners.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::checker::Checker;
use super::ConfigError;

pub const DEFAULT_RPC_LISTEN: &str = "127.0.0.1:7080";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RpcSection {
    /// "IP:PORT", or "" to disable.
    listen: Option<Spanned<String>>,
    token: Option<String>,
    unix: Option<String>,
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

impl RpcSettings {
    /// No listener at all.
    pub fn none() -> RpcSettings {
        RpcSettings { listen: None, unix: None, token: None }
    }
}

pub(super) fn check(ck: &Checker, rpc: &RpcSection, base: &Path) -> Result<RpcSettings, ConfigError> {
    let listen = match &rpc.listen {
        None => DEFAULT_RPC_LISTEN.parse().ok(),
        Some(s) if s.get_ref().is_empty() => None,
        Some(s) => {
            Some(s.get_ref().parse::<SocketAddr>().map_err(|e| ck.at(s, "rpc.listen", format!("not IP:PORT ({e})")))?)
        }
    };
    Ok(RpcSettings {
        listen,
        unix: rpc.unix.as_ref().filter(|p| !p.is_empty()).map(|p| base.join(p)),
        token: rpc.token.clone().filter(|t| !t.is_empty()),
    })
}
