//! Noisy neighbours: how much hostile and slow plugins delay a
//! well-behaved one's calls, over the daemon's JSON-RPC (issue 13, item 12).
//!
//! `cargo bench --bench neighbours` starts `evrhost run` with echo and the
//! `hostile` fixtures on one HTTP RPC listener, then times sequential
//! `route.run echo` round trips from one keep-alive client (one call every
//! `PACE`, so each finds the daemon as the neighbours left it), in phases:
//!
//! 1. idle: nothing else runs (the baseline);
//! 2. two clients looping `grow 32` (each call touches 32 MiB, then frees);
//! 3. every hostile route at once, a client each, looping: `loop` (to its
//!    deadline), `bomb` (to its memory cap), `recurse`, `panic`,
//!    `bigreply`, `logflood`, `spin 20` and `grow 32`.
//!
//! The phases take turns, `ROUNDS` blocks each, so that a noisy stretch of
//! this shared machine hits all of them alike.
//!
//! It prints p50, p99 and max of each phase, p99 against the idle p99 of
//! the same run (target ≤ 2×), and how many neighbour calls were answered
//! and how (a well-behaved `spin` or `grow` must never fail). The bench
//! reports; it never asserts. `EVRHOST_BENCH_CALLS` sets the calls per
//! phase (default 8,000); `EVRHOST_BENCH_BIN` runs another build of
//! evrhost instead, to compare.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use evrhost::harness::{plugin, Spawned};

/// The gap between two timed calls.
const PACE: Duration = Duration::from_micros(500);
const WARMUP: usize = 100;
/// Each phase is measured in this many blocks, the phases taking turns.
const ROUNDS: usize = 4;

fn config(cache: &Path, rpc: SocketAddr) -> String {
    let routes: String = ["loop", "bomb", "recurse", "panic", "bigreply", "logflood", "spin", "grow"]
        .iter()
        .map(|r| format!("[[route]]\nname = \"{r}\"\nplugin = \"hostile\"\n"))
        .collect();
    format!(
        r#"
[runtime]
cache_dir = "{cache}"

[rpc]
listen = "{rpc}"

[[plugin]]
name = "echo"
path = "{echo}"

[[plugin]]
name = "hostile"
path = "{hostile}"
deadline_ms = 300
memory_mb = 64
fuel = 1000000000000
max_instances = 16

[[route]]
name = "echo"
plugin = "echo"

{routes}"#,
        cache = cache.display(),
        echo = plugin("echo").display(),
        hostile = plugin("hostile").display(),
    )
}

/// A client looping one neighbour route until told to stop.
struct Neighbour {
    route: &'static str,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

fn neighbour(rpc: SocketAddr, route: &'static str, data: &'static str, stop: &Arc<AtomicBool>) -> Neighbour {
    let (ok, failed, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), stop.clone());
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let request = rpc_request(rpc, "route.run", &format!(r#"["{route}","{data}"]"#));
    let thread = std::thread::spawn(move || {
        let mut client = None;
        while !stop.load(Relaxed) {
            let c = match client.as_mut() {
                Some(c) => c,
                None => match RawClient::connect(rpc, false) {
                    Ok(c) => client.insert(c),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                },
            };
            match c.round_trip(&request) {
                Ok(true) => ok2.fetch_add(1, Relaxed),
                Ok(false) => failed2.fetch_add(1, Relaxed),
                Err(_) => {
                    client = None;
                    failed2.fetch_add(1, Relaxed)
                }
            };
        }
    });
    Neighbour { route, ok, failed, thread }
}

struct Phase {
    name: &'static str,
    /// ns, sorted.
    times: Vec<f64>,
    errors: usize,
    neighbours: Vec<(&'static str, u64, u64)>,
}

fn measure(rpc: SocketAddr, name: &'static str, calls: usize, load: &[(&'static str, &'static str)]) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let neighbours: Vec<Neighbour> = load.iter().map(|(route, data)| neighbour(rpc, route, data, &stop)).collect();
    // Let the neighbours reach their steady state (pools grown, first traps).
    if !load.is_empty() {
        std::thread::sleep(Duration::from_millis(700));
    }
    let mut client = RawClient::connect(rpc, false).expect("connect to the daemon");
    let request = rpc_request(rpc, "route.run", r#"["echo","hello"]"#);
    let (mut times, mut errors) = (Vec::with_capacity(calls), 0);
    for i in 0..WARMUP + calls {
        let started = Instant::now();
        let ok = client.round_trip(&request).unwrap_or(false);
        let took = started.elapsed();
        if i >= WARMUP {
            times.push(took.as_nanos() as f64);
            errors += usize::from(!ok);
        }
        std::thread::sleep(PACE);
    }
    stop.store(true, Relaxed);
    let neighbours = neighbours
        .into_iter()
        .map(|n| {
            let _ = n.thread.join();
            (n.route, n.ok.load(Relaxed), n.failed.load(Relaxed))
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Phase { name, times, errors, neighbours }
}

/// Each plugin's `slow_lane_calls`, from `plugin.list`.
fn slow_lane_calls(rpc: SocketAddr) -> String {
    let answer = RawClient::connect(rpc, false).and_then(|mut c| {
        c.round_trip(&rpc_request(rpc, "plugin.list", "[]"))?;
        Ok(serde_json::from_slice::<serde_json::Value>(c.body())?)
    });
    let Ok(answer) = answer else { return "?".into() };
    let plugins = answer["result"].as_array().cloned().unwrap_or_default();
    let counts: Vec<String> = plugins
        .iter()
        .map(|p| format!("{} {}", p["name"].as_str().unwrap_or("?"), p["stats"]["slow_lane_calls"]))
        .collect();
    counts.join(", ")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "?".into(), |l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let calls: usize = std::env::var("EVRHOST_BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(8_000);
    let dir = std::env::temp_dir().join(format!("evrhost-bench-{}-neighbours", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let path = dir.join("neighbours.toml");
    std::fs::write(&path, config(&dir.join("cache"), rpc))?;
    let state = dir.display().to_string();
    // Another build of evrhost, to compare: EVRHOST_BENCH_BIN.
    let bin = std::env::var_os("EVRHOST_BENCH_BIN").map_or_else(|| env!("CARGO_BIN_EXE_evrhost").into(), PathBuf::from);
    let env = [("XDG_STATE_HOME", state.as_str()), ("RUST_LOG", "info")];
    let mut daemon = Spawned::start(&bin, &path, rpc, &dir.join("evrhost.log"), &env, Duration::from_secs(60))?;
    println!("load average before: {}", load_average());

    let hostile = [
        ("loop", ""),
        ("bomb", ""),
        ("recurse", ""),
        ("panic", ""),
        ("bigreply", ""),
        ("logflood", ""),
        ("spin", "20"),
        ("grow", "32"),
    ];
    let plan: [(&'static str, &[(&'static str, &'static str)]); 3] =
        [("idle", &[]), ("2 × grow 32 MiB", &[("grow", "32"), ("grow", "32")]), ("every hostile route", &hostile)];
    // In turns, so that a noisy stretch of the machine hits every phase.
    let mut phases: Vec<Phase> =
        plan.iter().map(|(name, _)| Phase { name, times: Vec::new(), errors: 0, neighbours: Vec::new() }).collect();
    for _ in 0..ROUNDS {
        for (phase, (name, load)) in phases.iter_mut().zip(plan) {
            let block = measure(rpc, name, calls / ROUNDS, load);
            phase.times.extend(block.times);
            phase.errors += block.errors;
            for (i, (route, ok, failed)) in block.neighbours.into_iter().enumerate() {
                match phase.neighbours.get_mut(i) {
                    Some(n) => (n.1, n.2) = (n.1 + ok, n.2 + failed),
                    None => phase.neighbours.push((route, ok, failed)),
                }
            }
        }
    }
    for phase in &mut phases {
        phase.times.sort_by(f64::total_cmp);
    }
    let alive = daemon.alive();
    let lane_calls = slow_lane_calls(rpc);

    let idle_p99 = quantile(&phases[0].times, 0.99);
    println!("\nroute.run echo over HTTP RPC, {calls} calls a phase in {ROUNDS} blocks, one every {PACE:?}; load average after: {}", load_average());
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>7} {:>13} {:>7}  {:>6}",
        "phase", "p50", "p99", "max", "errors", "p99 vs idle", "target", ""
    );
    for p in &phases {
        let p99 = quantile(&p.times, 0.99);
        let ratio = p99 / idle_p99;
        let (target, verdict) = if p.name == "idle" {
            ("-", "-")
        } else {
            ("≤2×", if ratio <= 2.0 && p.errors == 0 { "PASS" } else { "MISS" })
        };
        println!(
            "{:<22} {:>10} {:>10} {:>10} {:>7} {:>12.2}× {:>7}  {verdict}",
            p.name,
            fmt_ns(median(&p.times)),
            fmt_ns(p99),
            fmt_ns(p.times.last().copied().unwrap_or(f64::NAN)),
            p.errors,
            ratio,
            target,
        );
    }
    println!("\nneighbour calls during each phase (answered with a result / with an error):");
    for p in phases.iter().filter(|p| !p.neighbours.is_empty()) {
        let line: Vec<String> = p.neighbours.iter().map(|(r, ok, failed)| format!("{r} {ok}/{failed}")).collect();
        println!("  {:<22} {}", p.name, line.join(", "));
    }
    println!("calls run on the slow lane (plugin.list): {lane_calls}");
    println!("the daemon {} through the run", if alive { "served" } else { "DIED" });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
