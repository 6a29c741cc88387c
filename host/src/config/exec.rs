//! `[[exec]]`, as Kamailio's evrexec `exec` parameter defines one: a
//! startup task (a plugin's `task` export, in N workers), or with
//! `sockaddr` a UDP socket whose datagrams run a route — the UDP
//! front-end's settings, written the way Kamailio users write them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::checker::{Checker, MAX_MS};
use super::{BadValue, ConfigError};

/// Workers of one exec entry, tasks or UDP calls in flight.
const MAX_WORKERS: u32 = 1024;
/// Datagrams one UDP socket may hold waiting for a worker.
const MAX_QUEUE: usize = 1 << 20;

/// `[[exec]] coalesce_us` by default: on this 2-core machine 100 µs cut
/// the CPU per datagram by a third under load (cargo bench --bench udp).
pub const DEFAULT_COALESCE_US: u64 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecSection {
    name: Spanned<String>,
    plugin: Option<Spanned<String>>,
    workers: Option<Spanned<u32>>,
    /// Microseconds, as evrexec's `wait`.
    wait: Option<u64>,
    sockaddr: Option<Spanned<String>>,
    queue: Option<Spanned<usize>>,
    recv_buffer: Option<Spanned<usize>>,
    reply: Option<bool>,
    restart_min_ms: Option<Spanned<u64>>,
    restart_max_ms: Option<u64>,
    #[serde(default)]
    profiling: bool,
    coalesce_us: Option<Spanned<u64>>,
}

/// A startup task: after `wait`, `plugin`'s task export runs in each of
/// `workers` workers, with the worker index as a string. A task that
/// fails is restarted after a backoff that doubles from `backoff_min` to
/// `backoff_max`.
#[derive(Clone, Debug)]
pub struct ExecDef {
    pub name: String,
    pub plugin: String,
    pub workers: u32,
    pub wait: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// A UDP socket: each datagram on `addr` is a call of the route `route`.
#[derive(Clone, Debug)]
pub struct UdpDef {
    pub route: String,
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

/// `udp:IP:PORT`, with IPv6 as `udp:[::1]:5060` or, as Kamailio writes
/// it, `udp:::1:5060`.
pub fn parse_sockaddr(text: &str) -> Result<SocketAddr, BadValue> {
    let rest = text.strip_prefix("udp:").ok_or_else(|| BadValue(format!("`{text}`: expected udp:IP:PORT")))?;
    if let Ok(addr) = rest.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (ip, port) = rest.rsplit_once(':').ok_or_else(|| BadValue(format!("`{text}`: expected udp:IP:PORT")))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|e| BadValue(format!("`{text}`: bad IP address `{ip}` ({e})")))?;
    let port: u16 = port.parse().map_err(|e| BadValue(format!("`{text}`: bad port `{port}` ({e})")))?;
    Ok(SocketAddr::new(ip, port))
}

/// Every `[[exec]]`: the startup tasks and the UDP sockets. `routes` are
/// the names some handler serves.
pub(super) fn check(
    ck: &Checker,
    sections: &[ExecSection],
    plugins: &HashSet<String>,
    routes: &HashSet<&str>,
) -> Result<(Vec<ExecDef>, Vec<UdpDef>), ConfigError> {
    let (mut tasks, mut udp) = (Vec::new(), Vec::<UdpDef>::new());
    for e in sections {
        let name = e.name.get_ref().clone();
        if name.is_empty() {
            return Err(ck.at(&e.name, "exec.name", "must not be empty"));
        }
        // evrexec: 0 workers means 1.
        let workers = ck.range(&e.workers, "exec.workers", 0, MAX_WORKERS)?.unwrap_or(1).max(1);
        match &e.sockaddr {
            Some(sockaddr) => {
                let def = check_udp(ck, e, sockaddr, name, workers, routes)?;
                if udp.iter().any(|u| u.addr == def.addr) {
                    return Err(ck.at(sockaddr, "exec.sockaddr", format!("{} is used by two exec entries", def.addr)));
                }
                udp.push(def);
            }
            None => tasks.push(check_task(ck, e, name, workers, plugins)?),
        }
    }
    Ok((tasks, udp))
}

fn check_udp(
    ck: &Checker,
    e: &ExecSection,
    sockaddr: &Spanned<String>,
    name: String,
    workers: u32,
    routes: &HashSet<&str>,
) -> Result<UdpDef, ConfigError> {
    let addr = parse_sockaddr(sockaddr.get_ref()).map_err(|m| ck.at(sockaddr, "exec.sockaddr", m.0))?;
    if !routes.contains(name.as_str()) {
        return Err(ck.at(
            &e.name,
            "exec.name",
            format!("no route named `{name}`: each datagram runs that route; add a [[route]] for it"),
        ));
    }
    if let Some(plugin) = &e.plugin {
        return Err(ck.at(plugin, "exec.plugin", "a UDP exec runs its route; bind the plugin with a [[route]]"));
    }
    let queue = ck.range(&e.queue, "exec.queue", 1, MAX_QUEUE)?.unwrap_or(8192);
    let coalesce_us = match &e.coalesce_us {
        Some(us) if *us.get_ref() > 10_000 => return Err(ck.at(us, "exec.coalesce_us", "at most 10000 (10 ms)")),
        Some(us) => *us.get_ref(),
        None => DEFAULT_COALESCE_US,
    };
    Ok(UdpDef {
        route: name,
        addr,
        workers,
        queue,
        recv_buffer: ck.range(&e.recv_buffer, "exec.recv_buffer", 1, 1 << 30)?,
        reply: e.reply.unwrap_or(true),
        profiling: e.profiling,
        coalesce: Duration::from_micros(coalesce_us),
    })
}

fn check_task(
    ck: &Checker,
    e: &ExecSection,
    name: String,
    workers: u32,
    plugins: &HashSet<String>,
) -> Result<ExecDef, ConfigError> {
    let Some(plugin) = &e.plugin else {
        return Err(ck.at(&e.name, "exec.plugin", "a startup task needs the plugin whose `task` export it runs"));
    };
    if !plugins.contains(plugin.get_ref()) {
        return Err(ck.at(plugin, "exec.plugin", format!("no plugin named `{}` is configured", plugin.get_ref())));
    }
    let min = ck.millis(&e.restart_min_ms, "exec.restart_min_ms")?.unwrap_or(100);
    Ok(ExecDef {
        name,
        plugin: plugin.get_ref().clone(),
        workers,
        wait: Duration::from_micros(e.wait.unwrap_or(0).min(MAX_MS * 1000)),
        backoff_min: Duration::from_millis(min),
        backoff_max: Duration::from_millis(e.restart_max_ms.unwrap_or(30_000).clamp(min, MAX_MS)),
    })
}
