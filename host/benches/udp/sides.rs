//! The receivers measured beside Kamailio: evrhost running the anchor's
//! work in a plugin, and the null receiver in this process.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::anyhow;
use evrhost::harness::Spawned;

use crate::common::{free_port, metric, rpc_request, RawClient};
use crate::load::{cpu_by_name, process_threads, NullReceiver, RECV_BUFFER};
use crate::trial::Side;

/// Exec workers and plugin instances: one per core of this 2-core
/// machine (4 measured 0.51–0.56× of null, 2 measured 0.64–0.69×: more
/// tasks than cores only add wake-ups).
pub const WORKERS: usize = 2;
pub const QUEUE: usize = 65_536;

/// A temporary directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("evrhost-bench-udp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn plugin(name: &str) -> String {
    format!("{}/{name}.wasm", env!("EVRHOST_PLUGINS_DIR"))
}

/// `EVRHOST_BENCH_UDP_WORKERS` overrides the exec's `workers`.
pub fn workers() -> usize {
    std::env::var("EVRHOST_BENCH_UDP_WORKERS").ok().and_then(|w| w.parse().ok()).filter(|w| *w > 0).unwrap_or(WORKERS)
}

fn daemon_config(cache: &Path, rpc: SocketAddr, udp: SocketAddr, workers: usize) -> String {
    format!(
        r#"
[runtime]
cache_dir = "{cache}"

[rpc]
listen = "{rpc}"

# Counters in memory, as Kamailio's htable keeps them (the default,
# `embedded`, also makes each write durable).
[kv]
backend = "memory"

[[plugin]]
name = "evcount"
path = "{evcount}"
max_instances = {WORKERS}

[[plugin]]
name = "echo"
path = "{echo}"

[[route]]
name = "count"
plugin = "evcount"

[[route]]
name = "evrexec:test"
plugin = "echo"

[[exec]]
name = "count"
sockaddr = "udp:{udp}"
workers = {workers}
queue = {QUEUE}
recv_buffer = {RECV_BUFFER}
reply = false
"#,
        cache = cache.display(),
        evcount = plugin("evcount"),
        echo = plugin("echo"),
    )
}

/// `evrhost run` with the evcount plugin behind a UDP exec (and echo
/// behind `evrexec:test`, for the RPC round trips), killed on drop.
pub struct Evrhost {
    process: Spawned,
    pub rpc: SocketAddr,
    pub udp: SocketAddr,
    pub log: PathBuf,
    client: Option<RawClient>,
    count_request: Vec<u8>,
}

impl Evrhost {
    pub fn start(dir: &Path, workers: usize) -> anyhow::Result<Evrhost> {
        let rpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let udp: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
        let config = dir.join("udp-bench.toml");
        std::fs::write(&config, daemon_config(&dir.join("cache"), rpc, udp, workers))?;
        let log = dir.join("evrhost.log");
        let bin = Path::new(env!("CARGO_BIN_EXE_evrhost"));
        let state = dir.display().to_string();
        let env = [("XDG_STATE_HOME", state.as_str())];
        let process = Spawned::start(bin, &config, rpc, &log, &env, Duration::from_secs(30))?;
        let count_request = rpc_request(rpc, "api.run", r#"["evcount.get","rx"]"#);
        Ok(Evrhost { process, rpc, udp, log, client: None, count_request })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn count_once(&mut self) -> anyhow::Result<u64> {
        let client = match &mut self.client {
            Some(c) => c,
            None => self.client.insert(RawClient::connect(self.rpc, false)?),
        };
        if !client.round_trip(&self.count_request)? {
            return Err(anyhow!("evcount.get rx: {}", String::from_utf8_lossy(client.body())));
        }
        let doc: serde_json::Value = serde_json::from_slice(client.body())?;
        doc["result"]
            .as_str()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| anyhow!("evcount.get rx answered {doc}"))
    }
}

impl Side for Evrhost {
    fn name(&self) -> &'static str {
        "evrhost"
    }

    fn addr(&self) -> SocketAddr {
        self.udp
    }

    fn handled(&mut self) -> anyhow::Result<u64> {
        // Once more on a new connection when the kept one was closed.
        self.count_once().or_else(|_| {
            self.client = None;
            self.count_once()
        })
    }

    fn cpu(&self) -> BTreeMap<String, f64> {
        cpu_by_name(&BTreeMap::new(), &process_threads(self.pid()))
    }

    fn outside_cpu(&self) -> f64 {
        self.cpu().values().sum()
    }

    fn counters(&self) -> Option<(u64, u64)> {
        Some((metric(self.rpc, "evrhost_udp_received_total")?, metric(self.rpc, "evrhost_udp_dropped_total")?))
    }

    fn alive(&mut self) -> bool {
        self.process.alive()
    }
}

/// The null receiver as a side: counts, no work.
pub struct Null(pub NullReceiver);

impl Side for Null {
    fn name(&self) -> &'static str {
        "null"
    }

    fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    fn handled(&mut self) -> anyhow::Result<u64> {
        Ok(self.0.count.load(Relaxed))
    }

    fn cpu(&self) -> BTreeMap<String, f64> {
        let mut parts = cpu_by_name(&BTreeMap::new(), &process_threads(std::process::id()));
        parts.retain(|name, _| name == "null-udp");
        parts
    }

    fn outside_cpu(&self) -> f64 {
        0.0
    }
}
