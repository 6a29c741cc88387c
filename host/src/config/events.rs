//! `[events]`: heartbeat, log events, memory thresholds, the subscriber
//! queue, and external subscribers from the start; and the sockets
//! OpenSIPS writes for event subscribers.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::checker::{Checker, MAX_MS};
use super::exec::parse_sockaddr;
use super::{BadValue, ConfigError};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsSection {
    heartbeat_s: Option<u64>,
    log: Option<Spanned<String>>,
    shm_limit_mb: Option<Spanned<u64>>,
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
    pub subscribe: Vec<(String, EventSocket)>,
}

/// Where an external subscriber gets its events, as OpenSIPS writes it:
/// `udp:IP:PORT` (event_datagram) or `tcp:IP:PORT[/METHOD]`
/// (event_stream, METHOD replacing the event name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventSocket {
    Udp(SocketAddr),
    Tcp { addr: SocketAddr, method: Option<String> },
}

impl EventSocket {
    pub fn parse(socket: &str) -> Result<EventSocket, BadValue> {
        let (proto, rest) = socket
            .split_once(':')
            .ok_or_else(|| BadValue(format!("`{socket}`: expected udp:IP:PORT or tcp:IP:PORT[/METHOD]")))?;
        let (hostport, method) = match (proto, rest.split_once('/')) {
            ("tcp", Some((hp, m))) if !m.is_empty() => (hp, Some(m.to_string())),
            _ => (rest, None),
        };
        let addr = parse_sockaddr(&format!("udp:{hostport}"))
            .map_err(|e| BadValue(e.0.replace("udp:", &format!("{proto}:"))))?;
        match proto {
            "udp" => Ok(EventSocket::Udp(addr)),
            "tcp" => Ok(EventSocket::Tcp { addr, method }),
            other => Err(BadValue(format!("`{socket}`: unknown transport `{other}` (udp or tcp)"))),
        }
    }

    /// The subscriber's id on the bus, the socket as written.
    pub fn id(&self) -> String {
        match self {
            EventSocket::Udp(addr) => format!("udp:{addr}"),
            EventSocket::Tcp { addr, method: None } => format!("tcp:{addr}"),
            EventSocket::Tcp { addr, method: Some(m) } => format!("tcp:{addr}/{m}"),
        }
    }
}

pub(super) fn check(ck: &Checker, e: &EventsSection) -> Result<EventsSettings, ConfigError> {
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
        let socket =
            EventSocket::parse(s.socket.get_ref()).map_err(|m| ck.at(&s.socket, "events.subscribe.socket", m.0))?;
        subscribe.push((s.event.clone(), socket));
    }
    Ok(EventsSettings {
        heartbeat: match e.heartbeat_s {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s.min(MAX_MS / 1000))),
            None => Some(Duration::from_secs(20)),
        },
        log,
        shm_limit_bytes: ck
            .range(&e.shm_limit_mb, "events.shm_limit_mb", 0, 1 << 24)?
            .filter(|mb| *mb > 0)
            .map(|mb| mb << 20),
        shm_threshold: ck.percent(&e.shm_threshold, "events.shm_threshold", 80)?,
        pkg_threshold: ck.percent(&e.pkg_threshold, "events.pkg_threshold", 0)?,
        queue: ck.range(&e.queue, "events.queue", 1, 1_000_000)?.unwrap_or(1024),
        subscribe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_parse_as_opensips_writes_them() {
        assert_eq!(EventSocket::parse("udp:127.0.0.1:8888"), Ok(EventSocket::Udp("127.0.0.1:8888".parse().unwrap())));
        assert_eq!(
            EventSocket::parse("tcp:127.0.0.1:9000/notify"),
            Ok(EventSocket::Tcp { addr: "127.0.0.1:9000".parse().unwrap(), method: Some("notify".into()) })
        );
        assert_eq!(EventSocket::parse("tcp:[::1]:9000").map(|t| t.id()), Ok("tcp:[::1]:9000".to_string()));
        assert!(EventSocket::parse("unix:/tmp/x").is_err());
        assert!(EventSocket::parse("udp:nohost").is_err());
    }
}
