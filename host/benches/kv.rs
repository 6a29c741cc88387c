//! The kv backends side by side, in one run: `memory`, `embedded` (sync:
//! each acknowledged write on disk), `embedded` relaxed (committed every
//! 100 ms) and `redis` (a redis-server of the bench's own, when installed).
//!
//! 1. `incr` from a plugin's route (in process, through the dispatcher,
//!    durability included) beside the same backend used from Rust without
//!    wasm; one caller (latency) and 32 (group commit).
//! 2. A bare 64-byte write + fdatasync on the same disk: the floor of a
//!    durable write.
//! 3. The real daemon on each backend: the UDP kvcount route's loss-free
//!    rate, and the RPC round trip of a counting call, one client and 16.
//!
//! `cargo bench --bench kv`; `EVRHOST_BENCH_KV=memory,embedded` runs a
//! subset.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use common::{daemon, fmt_ns, fmt_rate, free_port, median, Kill};
use evrhost::config::Config;
use evrhost::dispatcher::Dispatcher;
use evrhost::frontend::client::RpcClient;
use evrhost::kv::{Durability, KvBackend, KvLimits, KvStore, RedisSettings};
use evrhost::runtime::{Origin, Request, Runtime};
use serde_json::json;

const RELAXED_MS: u64 = 100;
const CONCURRENT: usize = 32;
const RPC_CLIENTS: usize = 16;
/// Loss-free: at most this share of datagrams not handled.
const MAX_LOSS: f64 = 0.001;
const TRIAL: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Backend {
    name: &'static str,
    /// The `[kv]` section for a daemon whose directory is the argument.
    section: String,
    backend: KvBackend,
}

fn backends(dir: &Path, redis: Option<&str>) -> Vec<Backend> {
    let store = |sub: &str| dir.join(sub);
    let mut all = vec![
        Backend { name: "memory", section: "[kv]\nbackend = \"memory\"\n".into(), backend: KvBackend::Memory },
        Backend {
            name: "embedded",
            section: "[kv]\nbackend = \"embedded\"\n".into(),
            backend: KvBackend::Embedded { dir: store("inproc-sync"), durability: Durability::Sync },
        },
        Backend {
            name: "embedded relaxed",
            section: format!("[kv]\ndurability = \"relaxed\"\nflush_ms = {RELAXED_MS}\n"),
            backend: KvBackend::Embedded {
                dir: store("inproc-relaxed"),
                durability: Durability::Relaxed(Duration::from_millis(RELAXED_MS)),
            },
        },
    ];
    if let Some(url) = redis {
        all.push(Backend {
            name: "redis",
            section: format!("[kv]\nbackend = \"redis\"\nurl = \"{url}\"\n"),
            backend: KvBackend::Redis(RedisSettings {
                url: url.to_string(),
                pool: 2,
                timeout: Duration::from_millis(1000),
                prefix: "evrhost".into(),
            }),
        });
    }
    let only = std::env::var("EVRHOST_BENCH_KV").ok();
    all.retain(|b| only.as_ref().is_none_or(|o| o.split(',').any(|n| n.trim() == b.name)));
    all
}

fn plugin(name: &str) -> String {
    format!("{}/{name}.wasm", env!("EVRHOST_PLUGINS_DIR"))
}

fn in_process_config(cache: &Path) -> String {
    format!(
        "[runtime]\ncache_dir = \"{}\"\n\n[[plugin]]\nname = \"counter\"\npath = \"{}\"\nmax_instances = {CONCURRENT}\n\n[[route]]\nname = \"count\"\nplugin = \"counter\"\n",
        cache.display(),
        plugin("counter")
    )
}

fn daemon_config(cache: &Path, rpc: u16, udp: u16, kv: &str) -> String {
    format!(
        r#"[runtime]
cache_dir = "{cache}"

[rpc]
listen = "127.0.0.1:{rpc}"

[[plugin]]
name = "kvcount"
path = "{kvcount}"
max_instances = {RPC_CLIENTS}

[[route]]
name = "count"
plugin = "kvcount"

[[exec]]
name = "count"
sockaddr = "udp:127.0.0.1:{udp}"
workers = 2
queue = 65536
recv_buffer = 33554432
reply = false

{kv}"#,
        cache = cache.display(),
        kvcount = plugin("kvcount"),
    )
}

struct Row {
    case: String,
    value: String,
    baseline: String,
    ratio: f64,
    target: &'static str,
    pass: Option<bool>,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Medians of one caller's `n` calls of `op`, in ns.
async fn latency(n: usize, mut op: impl AsyncFnMut()) -> f64 {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        op().await;
        samples.push(t.elapsed().as_nanos() as f64);
    }
    median(&sorted(samples))
}

/// Calls per second of `callers` tasks running `op` for `within`.
async fn throughput<F, Fut>(callers: usize, within: Duration, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < within {
                    op().await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// 1. A plugin's incr beside the backend's own, in process.
fn in_process(b: &Backend, scratch: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let config = Config::parse(&in_process_config(&scratch.join("cache")), "kv-bench.toml", Path::new("."))?;
    let (d, direct) = rt.block_on(async {
        let store = KvStore::open(&b.backend)?;
        let runtime = Runtime::new(config.engine.clone(), config.cache_dir.clone())?;
        let d = Dispatcher::start_with(runtime, &config, store).await?;
        let direct = d.kv().space("bench-direct", KvLimits::default());
        anyhow::Ok((d, direct))
    })?;
    let n = if b.name == "embedded" { 300 } else { 3000 };
    let request = Request { route: "count".into(), data: b"k".to_vec(), params: vec![], origin: Origin::Cli };
    let (plugin_p50, direct_p50) = rt.block_on(async {
        let plugin = latency(n, async || {
            d.run_route(&request).await.expect("count");
        })
        .await;
        let direct = latency(n, async || {
            let (r, ticket) = direct.incr("k", 1).await;
            r.expect("incr");
            direct.durable(ticket).await.expect("durable");
        })
        .await;
        (plugin, direct)
    });
    rows.push(Row {
        case: format!("incr p50, 1 caller: {}", b.name),
        value: fmt_ns(plugin_p50),
        baseline: fmt_ns(direct_p50),
        ratio: plugin_p50 / direct_p50,
        target: "plugin vs Rust",
        pass: None,
    });
    let (plugin_rate, direct_rate) = rt.block_on(async {
        let (d2, req) = (d.clone(), Arc::new(request.clone()));
        let plugin = throughput(CONCURRENT, TRIAL, move || {
            let (d, req) = (d2.clone(), req.clone());
            async move {
                d.run_route(&req).await.expect("count");
            }
        })
        .await;
        let space = direct.clone();
        let direct = throughput(CONCURRENT, TRIAL, move || {
            let space = space.clone();
            async move {
                let (r, ticket) = space.incr("k", 1).await;
                r.expect("incr");
                space.durable(ticket).await.expect("durable");
            }
        })
        .await;
        (plugin, direct)
    });
    rows.push(Row {
        case: format!("incr rate, {CONCURRENT} callers: {}", b.name),
        value: fmt_rate(plugin_rate),
        baseline: fmt_rate(direct_rate),
        ratio: plugin_rate / direct_rate,
        target: "plugin vs Rust",
        pass: None,
    });
    d.kv().close(Duration::from_secs(5));
    Ok(())
}

/// 2. The disk's own price of a durable write.
fn bare_fsync(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("fsync-probe"))?;
    let mut samples = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        f.write_all(&[0x5a; 64])?;
        f.sync_data()?;
        samples.push(t.elapsed().as_nanos() as f64);
    }
    Ok(median(&sorted(samples)))
}

struct Daemon {
    _process: Kill,
    rpc: SocketAddr,
    udp: SocketAddr,
}

fn start(dir: &Path, cache: &Path, kv: &str) -> anyhow::Result<Daemon> {
    std::fs::create_dir_all(dir)?;
    let (rpc, udp) = (free_port(), free_port());
    let process = daemon(dir, &daemon_config(cache, rpc, udp, kv));
    let rpc: SocketAddr = format!("127.0.0.1:{rpc}").parse()?;
    let started = Instant::now();
    while std::net::TcpStream::connect(rpc).is_err() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "the daemon did not listen on {rpc}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Daemon { _process: process, rpc, udp: format!("127.0.0.1:{udp}").parse()? })
}

async fn handled(c: &mut RpcClient) -> anyhow::Result<u64> {
    let r = c.call("plugin.stats", json!(["kvcount"])).await?;
    r["result"]["kvcount"]["calls"].as_u64().context("plugin.stats calls")
}

/// One trial: `rate` datagrams a second for `TRIAL`; the rate the
/// generator reached, and the share handled.
async fn trial(d: &Daemon, c: &mut RpcClient, rate: f64) -> anyhow::Result<(f64, f64)> {
    let before = handled(c).await?;
    let target = d.udp;
    let total = (rate * TRIAL.as_secs_f64()) as u64;
    let (sent, secs) = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, f64)> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(target)?;
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            // Pace in slices of 1 ms.
            let due = ((started.elapsed().as_secs_f64() + 0.001) * rate) as u64;
            while sent < due.min(total) {
                if socket.send(b"k").is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok((sent, started.elapsed().as_secs_f64()))
    })
    .await??;
    // Settled: the count stops moving.
    let mut last = handled(c).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = handled(c).await?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok((sent as f64 / secs, (last - before) as f64 / sent.max(1) as f64))
}

/// One daemon's loss-free search: doubling from 25k/s until a trial loses
/// more than `MAX_LOSS`, then 3 bisections. The figure is the highest rate
/// the generator reached in a passing trial.
struct Search {
    good: f64,
    /// The highest target that passed (the generator may fall short of it).
    passed: f64,
    bad: Option<f64>,
    next: f64,
    bisections: usize,
}

impl Search {
    fn new() -> Search {
        Search { good: 0.0, passed: 0.0, bad: None, next: 25_000.0, bisections: 3 }
    }

    fn active(&self) -> bool {
        self.bisections > 0 && self.next <= 3_200_000.0
    }

    fn record(&mut self, reached: f64, share: f64) {
        if share >= 1.0 - MAX_LOSS {
            self.good = self.good.max(reached);
            self.passed = self.passed.max(self.next);
        } else {
            self.bad = Some(self.next);
        }
        match self.bad {
            None => self.next *= 2.0,
            Some(bad) => {
                self.bisections -= 1;
                self.next = (self.passed + bad) / 2.0;
            }
        }
    }

    /// The figure, and whether the generator fell short of the rate asked.
    fn result(&self) -> (f64, bool) {
        (self.good, self.good < 0.9 * self.passed)
    }
}

/// Every daemon's search, trials taken in turn so that drift in the
/// machine's load falls on all alike.
async fn loss_free(daemons: &[Daemon], clients: &mut [RpcClient]) -> anyhow::Result<Vec<(f64, bool)>> {
    let mut searches: Vec<Search> = daemons.iter().map(|_| Search::new()).collect();
    while searches.iter().any(Search::active) {
        for ((d, c), s) in daemons.iter().zip(clients.iter_mut()).zip(&mut searches) {
            if s.active() {
                let (reached, share) = trial(d, c, s.next).await?;
                s.record(reached, share);
            }
        }
    }
    Ok(searches.iter().map(Search::result).collect())
}

struct DaemonFigures {
    udp_loss_free: f64,
    generator_bound: bool,
    rpc_p50: f64,
    rpc_rate: f64,
}

/// Part 3, the real daemon on each backend: UDP trials and single RPC
/// calls taken in turn across the daemons, 16 RPC clients one at a time.
fn through_daemons(all: &[Backend], scratch: &Path) -> anyhow::Result<Vec<DaemonFigures>> {
    let daemons: Vec<Daemon> = all
        .iter()
        .map(|b| {
            start(&scratch.join(format!("daemon-{}", b.name.replace(' ', "-"))), &scratch.join("cache"), &b.section)
        })
        .collect::<anyhow::Result<_>>()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut clients = Vec::new();
        for d in &daemons {
            let mut c = RpcClient::connect(d.rpc, None).await?;
            // Warm the instances.
            for _ in 0..200 {
                c.call("route.run", json!(["count", "w"])).await?;
            }
            clients.push(c);
        }
        let udp = loss_free(&daemons, &mut clients).await?;
        let mut samples = vec![Vec::new(); daemons.len()];
        for _ in 0..1000 {
            for (c, s) in clients.iter_mut().zip(&mut samples) {
                let t = Instant::now();
                let r = c.call("route.run", json!(["count", "rpc"])).await?;
                anyhow::ensure!(r.get("result").is_some(), "route.run failed: {r}");
                s.push(t.elapsed().as_nanos() as f64);
            }
        }
        let mut figures = Vec::new();
        for ((d, (udp_loss_free, generator_bound)), s) in daemons.iter().zip(udp).zip(samples) {
            let addr = d.rpc;
            let started = Instant::now();
            let many: Vec<_> = (0..RPC_CLIENTS)
                .map(|_| {
                    tokio::spawn(async move {
                        let mut c = RpcClient::connect(addr, None).await.ok()?;
                        let mut n = 0u64;
                        while started.elapsed() < TRIAL {
                            c.call("route.run", json!(["count", "many"])).await.ok()?;
                            n += 1;
                        }
                        Some(n)
                    })
                })
                .collect();
            let mut total = 0;
            for t in many {
                total += t.await.ok().flatten().unwrap_or(0);
            }
            let rpc_rate = total as f64 / started.elapsed().as_secs_f64();
            figures.push(DaemonFigures { udp_loss_free, generator_bound, rpc_p50: median(&sorted(s)), rpc_rate });
        }
        anyhow::Ok(figures)
    })
}

/// A redis-server of the bench's own, without persistence, if installed.
fn redis_server() -> Option<(Kill, String)> {
    let port = free_port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((Kill(child), format!("redis://127.0.0.1:{port}")))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("kv: bench");
        return;
    }
    let started = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    if let Err(e) = run(&mut rows, &mut notes) {
        notes.push(format!("ERROR: {e:#}"));
    }
    println!();
    println!("evrhost kv benchmark ({cores} cores, load avg {load} at start)");
    println!("{:<42} {:>12} {:>12} {:>8}   {:<30} result", "case", "value", "baseline", "ratio", "target");
    for r in &rows {
        let result = match r.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "-",
        };
        println!("{:<42} {:>12} {:>12} {:>7.2}x   {:<30} {result}", r.case, r.value, r.baseline, r.ratio, r.target);
    }
    for n in &notes {
        println!("{n}");
    }
    println!("≥: the generator (one thread, one send per datagram) reached no more without loss");
    println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
}

fn run(rows: &mut Vec<Row>, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let scratch: PathBuf = scratch.path().to_path_buf();
    let redis = redis_server();
    if redis.is_none() {
        notes.push("redis: skipped (no redis-server; apt-get install redis-server)".into());
    }
    let all = backends(&scratch, redis.as_ref().map(|(_, url)| url.as_str()));
    for b in &all {
        in_process(b, &scratch, rows).with_context(|| format!("in process, {}", b.name))?;
    }
    let fsync = bare_fsync(&scratch)?;
    notes.push(format!("bare 64-byte write + fdatasync on the bench's disk: p50 {}", fmt_ns(fsync)));

    let figures: Vec<(&str, DaemonFigures)> =
        all.iter().map(|b| b.name).zip(through_daemons(&all, &scratch).context("through the daemons")?).collect();
    let Some((_, memory)) = figures.iter().find(|(n, _)| *n == "memory") else {
        return Ok(());
    };
    for (name, f) in &figures {
        let udp_target = if *name == "embedded" { "≥ 0.80x memory" } else { "" };
        let mark = |f: &DaemonFigures| if f.generator_bound { "≥" } else { "" };
        rows.push(Row {
            case: format!("UDP kvcount loss-free: {name}"),
            value: format!("{}{}", mark(f), fmt_rate(f.udp_loss_free)),
            baseline: format!("{}{}", mark(memory), fmt_rate(memory.udp_loss_free)),
            ratio: f.udp_loss_free / memory.udp_loss_free,
            target: udp_target,
            pass: (*name == "embedded").then_some(f.udp_loss_free >= 0.8 * memory.udp_loss_free),
        });
    }
    for (name, f) in &figures {
        let extra = f.rpc_p50 - memory.rpc_p50;
        let durable = *name == "embedded";
        rows.push(Row {
            case: format!("RPC counting call p50: {name}"),
            value: fmt_ns(f.rpc_p50),
            baseline: fmt_ns(memory.rpc_p50),
            ratio: f.rpc_p50 / memory.rpc_p50,
            target: if durable { "extra ≤ ~1 fsync p50 (1.5x)" } else { "" },
            pass: durable.then_some(extra <= 1.5 * fsync),
        });
        if durable {
            notes.push(format!(
                "durable RPC call: {} over memory, bare fsync p50 {} ({:.2} fsyncs)",
                fmt_ns(extra),
                fmt_ns(fsync),
                extra / fsync
            ));
        }
    }
    for (name, f) in &figures {
        rows.push(Row {
            case: format!("RPC counting calls, {RPC_CLIENTS} clients: {name}"),
            value: fmt_rate(f.rpc_rate),
            baseline: fmt_rate(memory.rpc_rate),
            ratio: f.rpc_rate / memory.rpc_rate,
            target: "",
            pass: None,
        });
    }
    Ok(())
}
