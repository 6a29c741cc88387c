//! The soak: the daemon under every kind of traffic at once for ten
//! minutes (issue 13, item 15), reporting whether anything grows or is
//! lost.
//!
//! `cargo bench --bench soak` starts `evrhost run` and, all at once:
//! - UDP datagrams to an `[[exec]]` socket, each counted by the counter
//!   plugin under the key `udp` (2,000/s);
//! - HTTP JSON-RPC `route.run echo` calls, back to back;
//! - UNIX-socket JSON-RPC `route.run count unix`, back to back;
//! - the hostile fixtures looped over HTTP (`loop`, `bomb`, `panic`,
//!   `recurse`, `bigreply`, `logflood`), each trapping or refused;
//! - `plugin.reload echo` every 200 ms, under the echo calls;
//! - event subscribers that subscribe to PLUGIN_RELOAD over UDP, read a
//!   little and die (their socket closed, the subscription left to
//!   expire), four a second.
//!
//! Every `EVRHOST_SOAK_S / 20` it prints the daemon's RSS, open fds and
//! threads with the calls so far; at the end, calls answered against sent
//! per client, and whether the counters are exact: the `udp` count plus
//! the datagrams the daemon counted as dropped (queue and kernel) must be
//! the datagrams sent, and the `unix` count the calls answered. It reports;
//! it never asserts. `EVRHOST_SOAK_S` sets the length (default 600 s).
//! The Erlang and Yate front-ends are not driven here: their peers are
//! driven by `cargo bench --bench erlang|yate`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use evrhost::harness::{plugin, Spawned};

fn config(dir: &Path, rpc: SocketAddr, udp: SocketAddr) -> String {
    let hostile: String =
        HOSTILE.iter().map(|r| format!("[[route]]\nname = \"{r}\"\nplugin = \"hostile\"\n")).collect();
    format!(
        r#"
[runtime]
cache_dir = "{cache}"

[rpc]
listen = "{rpc}"
unix = "{unix}"

[[plugin]]
name = "counter"
path = "{counter}"
max_instances = 2

[[plugin]]
name = "echo"
path = "{echo}"

[[plugin]]
name = "hostile"
path = "{hostile}"
deadline_ms = 100
memory_mb = 32
fuel = 1000000000000
max_instances = 4

[[route]]
name = "count"
plugin = "counter"

[[route]]
name = "echo"
plugin = "echo"

{hostile_routes}
[[exec]]
name = "count"
sockaddr = "udp:{udp}"
workers = 2
reply = false
"#,
        cache = dir.join("cache").display(),
        unix = dir.join("rpc.sock").display(),
        counter = plugin("counter").display(),
        echo = plugin("echo").display(),
        hostile = plugin("hostile").display(),
        hostile_routes = hostile,
    )
}

const HOSTILE: [&str; 6] = ["loop", "bomb", "panic", "recurse", "bigreply", "logflood"];

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    answered: AtomicU64,
    /// Answered with an error where a result was due.
    failed: AtomicU64,
}

impl Counts {
    fn line(&self) -> String {
        format!("{}/{}/{}", self.sent.load(Relaxed), self.answered.load(Relaxed), self.failed.load(Relaxed))
    }
}

/// Runs `step` until `stop`; each returns false to end early.
fn client(stop: &Arc<AtomicBool>, mut step: impl FnMut() -> bool + Send + 'static) -> std::thread::JoinHandle<()> {
    let stop = stop.clone();
    std::thread::spawn(move || while !stop.load(Relaxed) && step() {})
}

/// One HTTP JSON-RPC call per step, the `requests` in turn; an answer
/// that is not a result when `want_result` (or is) counts as failed.
fn http_client(
    rpc: SocketAddr,
    requests: Vec<Vec<u8>>,
    counts: Arc<Counts>,
    want_result: bool,
) -> impl FnMut() -> bool {
    let mut conn: Option<RawClient> = None;
    let mut next = 0;
    move || {
        let request = &requests[next % requests.len()];
        next += 1;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match RawClient::connect(rpc, false) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    return true;
                }
            },
        };
        counts.sent.fetch_add(1, Relaxed);
        match c.round_trip(request) {
            Ok(result) => {
                counts.answered.fetch_add(1, Relaxed);
                if result != want_result {
                    counts.failed.fetch_add(1, Relaxed);
                }
            }
            Err(_) => conn = None,
        }
        true
    }
}

fn unix_client(path: std::path::PathBuf, counts: Arc<Counts>) -> impl FnMut() -> bool {
    let mut conn: Option<(UnixStream, BufReader<UnixStream>)> = None;
    let doc = b"{\"jsonrpc\":\"2.0\",\"method\":\"route.run\",\"params\":[\"count\",\"unix\"],\"id\":1}\n";
    let mut line = String::new();
    move || {
        if conn.is_none() {
            let Ok(s) = UnixStream::connect(&path) else {
                std::thread::sleep(Duration::from_millis(10));
                return true;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let Ok(r) = s.try_clone() else { return true };
            conn = Some((s, BufReader::new(r)));
        }
        let Some((w, r)) = conn.as_mut() else { return true };
        counts.sent.fetch_add(1, Relaxed);
        line.clear();
        match w.write_all(doc).and_then(|()| r.read_line(&mut line)) {
            Ok(n) if n > 0 => {
                counts.answered.fetch_add(1, Relaxed);
                if !line.contains("\"result\"") {
                    counts.failed.fetch_add(1, Relaxed);
                }
            }
            _ => conn = None,
        }
        true
    }
}

/// VmRSS (KiB), open fds and threads of `pid`.
fn footprint(pid: u32) -> (u64, usize, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (field("VmRSS:"), fds, field("Threads:"))
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let length = Duration::from_secs(std::env::var("EVRHOST_SOAK_S").ok().and_then(|v| v.parse().ok()).unwrap_or(600));
    let dir = std::env::temp_dir().join(format!("evrhost-bench-{}-soak", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let udp_addr: SocketAddr = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let path = dir.join("soak.toml");
    std::fs::write(&path, config(&dir, rpc, udp_addr))?;
    let state = dir.display().to_string();
    let bin = Path::new(env!("CARGO_BIN_EXE_evrhost"));
    // Warnings, and the daemon's "ready": the log of ten minutes of traps stays small.
    let env = [("XDG_STATE_HOME", state.as_str()), ("RUST_LOG", "warn,evrhost::daemon=info")];
    let mut daemon = Spawned::start(bin, &path, rpc, &dir.join("evrhost.log"), &env, Duration::from_secs(60))?;
    let pid = daemon.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let names = ["udp", "http echo", "unix count", "hostile", "reloads", "subscribers"];
    let counts: Vec<Arc<Counts>> = names.iter().map(|_| Arc::default()).collect();
    let mut threads = Vec::new();

    // UDP: 2 datagrams a millisecond, paced against the clock.
    let (udp, c) = (UdpSocket::bind("127.0.0.1:0")?, counts[0].clone());
    let started = Instant::now();
    threads.push(client(&stop, move || {
        let due = (started.elapsed().as_micros() / 500) as u64;
        while c.sent.load(Relaxed) < due {
            if udp.send_to(b"udp", udp_addr).is_ok() {
                c.sent.fetch_add(1, Relaxed);
            }
        }
        std::thread::sleep(Duration::from_micros(500));
        true
    }));
    let echo = rpc_request(rpc, "route.run", r#"["echo","soak"]"#);
    threads.push(client(&stop, http_client(rpc, vec![echo], counts[1].clone(), true)));
    threads.push(client(&stop, unix_client(dir.join("rpc.sock"), counts[2].clone())));
    // Every hostile call must come back as an error.
    let hostile = HOSTILE.iter().map(|r| rpc_request(rpc, "route.run", &format!(r#"["{r}",""]"#))).collect();
    threads.push(client(&stop, http_client(rpc, hostile, counts[3].clone(), false)));
    let reload = rpc_request(rpc, "plugin.reload", r#"["echo"]"#);
    let mut reloads = http_client(rpc, vec![reload], counts[4].clone(), true);
    threads.push(client(&stop, move || {
        reloads();
        std::thread::sleep(Duration::from_millis(200));
        true
    }));
    let c = counts[5].clone();
    threads.push(client(&stop, move || {
        let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else { return true };
        let Ok(addr) = sock.local_addr() else { return true };
        let subscribe = rpc_request(rpc, "event.subscribe", &format!(r#"["PLUGIN_RELOAD","udp:{addr}",2]"#));
        c.sent.fetch_add(1, Relaxed);
        if let Ok(mut k) = RawClient::connect(rpc, false) {
            if let Ok(ok) = k.round_trip(&subscribe) {
                c.answered.fetch_add(1, Relaxed);
                c.failed.fetch_add(u64::from(!ok), Relaxed);
            }
        }
        let _ = sock.set_read_timeout(Some(Duration::from_millis(250)));
        let mut buf = [0u8; 2048];
        let _ = sock.recv(&mut buf);
        true // the socket closes: the subscriber is gone
    }));

    println!("soak of {length:?}: sent/answered/failed so far per client ({})", names.join(", "));
    println!("{:>6} {:>9} {:>5} {:>8}  clients", "t", "RSS", "fds", "threads");
    let every = length / 20;
    let mut rows = Vec::new();
    while started.elapsed() < length && daemon.alive() {
        let (rss, fds, threads) = footprint(pid);
        let line: Vec<String> = counts.iter().map(|c| c.line()).collect();
        println!(
            "{:>5}s {:>6} MiB {:>5} {:>8}  {}",
            started.elapsed().as_secs(),
            rss / 1024,
            fds,
            threads,
            line.join("  ")
        );
        rows.push((rss, fds));
        std::thread::sleep(every.min(length.saturating_sub(started.elapsed())));
    }
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // Datagrams still queued are counted before the totals are read.
    std::thread::sleep(Duration::from_secs(2));
    let alive = daemon.alive();
    let (rss, fds, nthreads) = footprint(pid);
    println!("{:>5}s {:>6} MiB {:>5} {:>8}  (clients stopped)", started.elapsed().as_secs(), rss / 1024, fds, nthreads);

    let count = |key: &str| -> Option<u64> {
        let mut k = RawClient::connect(rpc, false).ok()?;
        k.round_trip(&rpc_request(rpc, "api.run", &format!(r#"["counter.get","{key}"]"#))).ok()?;
        let answer: serde_json::Value = serde_json::from_slice(k.body()).ok()?;
        answer["result"].as_str()?.trim().parse().ok()
    };
    let sent_udp = counts[0].sent.load(Relaxed);
    let counted_udp = count("udp");
    let dropped = metric(rpc, "evrhost_udp_dropped_total").unwrap_or(0)
        + metric(rpc, "evrhost_udp_kernel_drops_total").unwrap_or(0)
        + metric(rpc, "evrhost_udp_failed_total").unwrap_or(0);
    let unix_answered = counts[2].answered.load(Relaxed) - counts[2].failed.load(Relaxed);
    let counted_unix = count("unix");
    println!("\nthe daemon {} through the run", if alive { "served" } else { "DIED" });
    println!(
        "udp: sent {sent_udp}, counted {counted_udp:?}, dropped or failed (its metrics) {dropped}: {}",
        verdict(counted_udp.map(|c| c + dropped) == Some(sent_udp))
    );
    println!(
        "unix count: answered with a result {unix_answered}, counted {counted_unix:?}: {}",
        verdict(counted_unix == Some(unix_answered))
    );
    for (name, c) in names.iter().zip(&counts).skip(1) {
        let (sent, answered, failed) = (c.sent.load(Relaxed), c.answered.load(Relaxed), c.failed.load(Relaxed));
        println!("{name}: sent {sent}, answered {answered}, not as wanted {failed}");
    }
    let steady = &rows[rows.len().min(2)..];
    if let (Some(first), Some(max)) = (steady.first(), steady.iter().map(|r| r.0).max()) {
        println!(
            "RSS after warm-up {} MiB, at most {} MiB ({:+.1} %); fds {}..{}",
            first.0 / 1024,
            max / 1024,
            (max as f64 / first.0.max(1) as f64 - 1.0) * 100.0,
            steady.iter().map(|r| r.1).min().unwrap_or(0),
            steady.iter().map(|r| r.1).max().unwrap_or(0),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn verdict(exact: bool) -> &'static str {
    if exact {
        "exact"
    } else {
        "NOT EXACT"
    }
}
