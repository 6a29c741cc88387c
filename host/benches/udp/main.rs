//! evrhost's UDP route beside Kamailio's on the same work, and the
//! JSON-RPC round trip, against baselines measured in the same run.
//!
//! `cargo bench --bench udp` starts three receivers and prints one table,
//! like `calls.rs`: every evrhost figure beside its baseline, the ratio,
//! the target and PASS/MISS. The bench reports; it never asserts.
//! - evrhost (`evrhost run`): the `evcount` plugin behind a `[[exec]]` UDP
//!   socket, doing the anchor's work per datagram (parse `k=v;` pairs,
//!   bump `rx` and `ev::<ev>` in the tenant's kv store, kept in memory as
//!   Kamailio's htable is; the plugin reads a read's datagrams in one call
//!   of its batch export and bumps each counter once per batch);
//! - Kamailio 5.6 (`kamailio.rs`): evrexec + app_lua `lua_run` of the
//!   anchor's `handler.lua` (htable counters in shared memory), from
//!   Debian's `kamailio` and `kamailio-lua-modules`; skipped, with a line
//!   saying how to install them, when they are not installed;
//! - the null receiver, a thread of this process that reads recvmmsg(2)
//!   batches of 32 and only counts.
//!
//! Both daemons run under `chrt -f 10` (as the anchor was measured) when
//! this process may, and get the same receive buffer. Every datagram is
//! one of the anchor's 63-byte payloads. The parts, each taking the
//! receivers in turn so a noisy neighbour hits them alike:
//! 1. Loss-free rate, searched with a paced sendmmsg(2) generator (the
//!    anchor's) and with a UDP GSO generator (one send per 64 datagrams,
//!    cut by the kernel, whose lower CPU per datagram leaves more of the 2
//!    shared cores to the receiver): N = R × 1 s datagrams at R/s; loss =
//!    1 − handled / sent; the highest R with loss < 0.1 % (double from
//!    100k/s, then bisect). A trial counts at the rate its generator
//!    reached; ≥ means nothing was lost at the most it could offer. A
//!    trial during which other processes took over 15% of a core is run
//!    again.
//! 2. CPU per datagram (all the daemon's threads or processes, per
//!    datagram handled) at fixed rates of 50k, 100k and 150k/s, two rounds.
//! 3. Saturation: an unpaced generator for up to 3 s; the rate handled
//!    from the first datagram until the count stopped growing.
//! 4. Overload (`overload.rs`): evrhost alone at twice its saturation
//!    rate for 30 s, RPC latency meanwhile, and every datagram accounted.
//! 5. Idle CPU: both daemons over the same 10 s with nothing sent.
//! 6. RPC round trip (`rpc.rs`): sequential `evrexec.run` calls of echo
//!    against a minimal hyper server in this process.
//!
//! `EVRHOST_BENCH_CASES` (`udp`, `rpc`; both by default) picks the parts;
//! `EVRHOST_BENCH_UDP_WORKERS` overrides the exec's `workers` (default 2).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::anyhow;

#[path = "../common/mod.rs"]
mod common;
mod kamailio;
mod load;
mod overload;
mod rpc;
mod sides;
mod trial;

use common::{fmt_rate, median};
use kamailio::Kamailio;
use load::{anchor_payloads, udp_snmp, Mode, NullReceiver, RECV_BUFFER};
use sides::{Evrhost, Null, Scratch, QUEUE};
use trial::{trial, Search, Side, Trial, GENERATOR_SHARE, MAX_LOSS, NOISE_SHARE, TRIAL};

/// Each loss-free search (all receivers together) stops starting trials
/// after this.
const SEARCH_BUDGET: Duration = Duration::from_secs(75);
const FIXED_RATES: [f64; 3] = [50_000.0, 100_000.0, 150_000.0];
const ROUNDS: usize = 2;
/// An unpaced trial sends at most this many (TRIAL_CAP bounds it too).
const SATURATION_SEND: u64 = 900_000;
const IDLE: Duration = Duration::from_secs(10);

pub struct Row {
    pub case: String,
    pub evrhost: String,
    pub baseline: String,
    pub ratio: f64,
    pub target: &'static str,
    /// None: reported, no target.
    pub pass: Option<bool>,
}

/// `EVRHOST_BENCH_CASES`: `udp`, `rpc` or both (the default).
fn cases() -> String {
    std::env::var("EVRHOST_BENCH_CASES").unwrap_or_else(|_| "udp,rpc".into())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--list` is not supported.
    if std::env::args().any(|a| a == "--list") {
        println!("udp: bench");
        return;
    }
    let started = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let workers = sides::workers();
    eprintln!("udp bench: {cores} cores, load avg {load} at start, exec workers {workers}");
    let mut out = Report::default();
    if let Err(e) = run(workers, &mut out) {
        out.notes.push(format!("ERROR: {e:#}"));
    }

    println!();
    println!(
        "evrhost UDP/RPC benchmark ({cores} cores shared by the receivers, the generator and the client; \
         load avg {load} at start)"
    );
    println!("{:<44} {:>12} {:>12} {:>7}   {:<16} result", "case", "evrhost", "baseline", "ratio", "target");
    for r in &out.rows {
        println!(
            "{:<44} {:>12} {:>12} {:>6.2}x   {:<16} {}",
            r.case,
            r.evrhost,
            r.baseline,
            r.ratio,
            r.target,
            match r.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "-",
            }
        );
    }
    println!();
    println!(
        "UDP trials (loss-free: < {}% lost; {} s of datagrams at the target rate; kernel drops = Udp RcvbufErrors; \
         others = CPU-s of other processes, over {:.0}% of a core: run again):",
        MAX_LOSS * 100.0,
        TRIAL.as_secs_f64(),
        NOISE_SHARE * 100.0
    );
    for t in &out.trials {
        println!("{t}");
    }
    for n in &out.notes {
        println!("{n}");
    }
    println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
}

#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
    trials: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        case: String,
        evrhost: String,
        baseline: String,
        ratio: f64,
        target: &'static str,
        pass: Option<bool>,
    ) {
        self.rows.push(Row { case, evrhost, baseline, ratio, target, pass });
    }
}

/// Puts every thread of `pid` whose name passes `which` under SCHED_FIFO 10.
fn fifo_threads(pid: u32, which: impl Fn(&str) -> bool) -> bool {
    let threads = load::process_threads(pid);
    let mut all = !threads.is_empty();
    for (tid, (name, _)) in threads {
        if which(&name) {
            let ok = std::process::Command::new("chrt")
                .args(["-f", "-p", "10", &tid.to_string()])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            all &= ok;
        }
    }
    all
}

fn run(workers: usize, out: &mut Report) -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    // The client side of the RPC round trips on this thread.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The null HTTP server on its own 2-thread runtime, as the daemon has.
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut evr = Evrhost::start(&scratch.0, workers)?;
    let fifo = kamailio::fifo_allowed();
    if fifo && !fifo_threads(evr.pid(), |_| true) {
        out.notes.push("WARNING: not every evrhost thread could be put under chrt -f 10".into());
    }
    let null = NullReceiver::start()?;
    if fifo {
        fifo_threads(std::process::id(), |name| name == "null-udp");
    }
    let rcvbuf = null.rcvbuf;
    let mut null = Null(null);
    let mut kam = match kamailio::missing() {
        Some(why) => {
            out.notes.push(format!(
                "Kamailio SKIPPED: {why}; install it with `{}` to measure evrhost beside it",
                kamailio::INSTALL
            ));
            None
        }
        None => match Kamailio::start(&scratch.0, fifo, Some(rcvbuf)) {
            Ok((k, how)) => {
                out.notes.push(how);
                Some(k)
            }
            Err(e) => {
                out.notes.push(format!("ERROR: Kamailio did not start: {e:#}"));
                None
            }
        },
    };
    out.notes.push(format!(
        "evrhost: kv in memory, exec workers {workers}, queue {QUEUE}, recv_buffer {RECV_BUFFER} asked, SO_RCVBUF {rcvbuf} granted \
         (net.core.rmem_max {}){}",
        std::fs::read_to_string("/proc/sys/net/core/rmem_max").map_or("?".into(), |s| s.trim().to_string()),
        if fifo { ", under chrt -f 10" } else { "" },
    ));

    if cases().contains("udp") {
        let payloads = anchor_payloads();
        let mut sides: Vec<&mut dyn Side> = vec![&mut evr];
        if let Some(k) = kam.as_mut() {
            sides.push(k);
        }
        sides.push(&mut null);
        // Warm: instances made, code paged in.
        for side in sides.iter_mut() {
            trial(&mut **side, &payloads, Mode::Sendmmsg, 50_000.0, 20_000)?;
        }
        for mode in [Mode::Sendmmsg, Mode::Gso] {
            loss_free(&mut sides, &payloads, mode, out)?;
        }
        fixed_rates(&mut sides, &payloads, out)?;
        let mut capacity: f64 = 0.0;
        for mode in [Mode::Sendmmsg, Mode::Gso] {
            capacity = capacity.max(saturation(&mut sides, &payloads, mode, out)?.unwrap_or(0.0));
        }
        drop(sides);
        overload::overload(&mut evr, &payloads, capacity, out)?;
        idle(&evr, kam.as_ref(), out);
        daemon_counters(&evr, out);
    }

    if cases().contains("rpc") {
        if !Side::alive(&mut evr) {
            return Err(anyhow!("evrhost exited before the RPC case"));
        }
        rpc::round_trips(&rt, &server_rt, evr.rpc, &mut out.rows, &mut out.notes)?;
    }
    let warnings = std::fs::read_to_string(&evr.log)
        .map(|l| l.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count())
        .unwrap_or(0);
    out.notes.push(format!("evrhost log: {warnings} warning/error line(s)"));
    drop(kam);
    drop(evr);
    server_rt.shutdown_background();
    Ok(())
}

fn run_trial(side: &mut dyn Side, payloads: &[Vec<u8>], mode: Mode, rate: f64, n: u64) -> anyhow::Result<Trial> {
    let t = trial(side, payloads, mode, rate, n)?;
    eprintln!("{}", t.line());
    Ok(t)
}

/// The loss-free searches of every side, trial by trial in turn.
fn loss_free(sides: &mut [&mut dyn Side], payloads: &[Vec<u8>], mode: Mode, out: &mut Report) -> anyhow::Result<()> {
    let mut searches: Vec<Search> = sides.iter().map(|_| Search::new()).collect();
    let start = Instant::now();
    let mut round = 0usize;
    while start.elapsed() < SEARCH_BUDGET && searches.iter().any(|s| s.next.is_some()) {
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            let Some(rate) = searches[i].next else { continue };
            let n = (rate * TRIAL.as_secs_f64()).round() as u64;
            let t = run_trial(&mut *sides[i], payloads, mode, rate, n)?;
            searches[i].record(t);
        }
        round += 1;
    }
    let by = |name: &str| sides.iter().position(|s| s.name() == name).map(|i| &searches[i]);
    let m = mode.name();
    if let (Some(e), Some(k)) = (by("evrhost"), by("kamailio")) {
        let ratio = e.best() / k.best().max(1.0);
        out.row(format!("UDP loss-free, {m}, vs lua_run"), e.shown(), k.shown(), ratio, "≥2×", Some(ratio >= 2.0));
    }
    if let (Some(e), Some(n)) = (by("evrhost"), by("null")) {
        let ratio = e.best() / n.best().max(1.0);
        let (target, pass) = match mode {
            Mode::Sendmmsg => ("≥75% of null", ratio >= 0.75),
            Mode::Gso => ("≥400k/s", e.best() >= 400_000.0),
        };
        out.row(format!("UDP loss-free, {m}, vs null"), e.shown(), n.shown(), ratio, target, Some(pass));
    }
    if searches.iter().any(|s| s.generator_bound) {
        out.notes.push(format!(
            "UDP loss-free ({m}): ≥ = the generator could not send faster (< {:.0}% of the target rate reached) \
             without loss: the receiver's limit is higher",
            GENERATOR_SHARE * 100.0
        ));
    }
    for (side, search) in sides.iter().zip(&searches) {
        if let Some(t) =
            search.trials.iter().filter(|t| t.ok() && !t.retried).max_by(|a, b| a.achieved().total_cmp(&b.achieved()))
        {
            out.notes.push(format!(
                "UDP loss-free ({m}) {}: {} at best, receiver {:.2} µs/dgram, generator {:.2} µs/dgram, softirq {:.2} µs/dgram",
                side.name(),
                fmt_rate(t.achieved()),
                t.cpu_per_datagram(),
                t.sent.cpu / t.sent.count.max(1) as f64 * 1e6,
                t.softirq / t.sent.count.max(1) as f64 * 1e6,
            ));
        }
    }
    out.trials.extend(searches.iter().flat_map(|s| s.trials.iter().map(Trial::line)));
    Ok(())
}

/// CPU per datagram at each fixed rate, ROUNDS times, sides in turn.
fn fixed_rates(sides: &mut [&mut dyn Side], payloads: &[Vec<u8>], out: &mut Report) -> anyhow::Result<()> {
    let mut per: BTreeMap<(&'static str, u64), Vec<f64>> = BTreeMap::new();
    let mut lossy: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        for rate in FIXED_RATES {
            for k in 0..sides.len() {
                let side = &mut *sides[(round + k) % sides.len()];
                let n = (rate * TRIAL.as_secs_f64()).round() as u64;
                let t = run_trial(side, payloads, Mode::Sendmmsg, rate, n)?;
                if !t.ok() {
                    lossy.push(format!("{} at {}: {:.2}% lost", t.who, fmt_rate(rate), t.loss() * 100.0));
                }
                per.entry((t.who, rate as u64)).or_default().push(t.cpu_per_datagram());
                out.trials.push(t.line());
            }
        }
    }
    let figure = |who: &'static str, rate: f64| {
        per.get(&(who, rate as u64)).map(|v| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            median(&v)
        })
    };
    for rate in FIXED_RATES {
        if let (Some(e), Some(k)) = (figure("evrhost", rate), figure("kamailio", rate)) {
            let ratio = e / k;
            out.row(
                format!("daemon CPU/dgram at {}, vs lua_run", fmt_rate(rate)),
                format!("{e:.2} µs"),
                format!("{k:.2} µs"),
                ratio,
                "≤0.5×",
                Some(ratio <= 0.5),
            );
        }
        if let (Some(e), Some(n)) = (figure("evrhost", rate), figure("null", rate)) {
            out.row(
                format!("daemon CPU/dgram at {}, vs null", fmt_rate(rate)),
                format!("{e:.2} µs"),
                format!("{n:.2} µs"),
                e / n,
                "(reported)",
                None,
            );
        }
    }
    out.notes.push(format!(
        "CPU/dgram: the sendmmsg generator, {ROUNDS} rounds, median (for 2 rounds, the upper one); lossy fixed-rate \
         trials: {}",
        if lossy.is_empty() { "none".to_string() } else { lossy.join(", ") }
    ));
    Ok(())
}

/// What each side handles from an unpaced generator, ROUNDS times.
/// Evrhost's saturation rate (the best round), when it was measured.
fn saturation(
    sides: &mut [&mut dyn Side],
    payloads: &[Vec<u8>],
    mode: Mode,
    out: &mut Report,
) -> anyhow::Result<Option<f64>> {
    let mut rates: BTreeMap<&'static str, Vec<(f64, f64)>> = BTreeMap::new();
    for round in 0..ROUNDS {
        for k in 0..sides.len() {
            let side = &mut *sides[(round + k) % sides.len()];
            let t = run_trial(side, payloads, mode, f64::INFINITY, SATURATION_SEND)?;
            rates.entry(t.who).or_default().push((t.handled_rate(), t.cpu_per_datagram()));
            out.trials.push(t.line());
        }
    }
    let best = |who: &str| rates.get(who).and_then(|v| v.iter().copied().max_by(|a, b| a.0.total_cmp(&b.0)));
    let m = mode.name();
    if let (Some(e), Some(k)) = (best("evrhost"), best("kamailio")) {
        let ratio = e.0 / k.0;
        out.row(
            format!("UDP saturation, {m}, vs lua_run"),
            fmt_rate(e.0),
            fmt_rate(k.0),
            ratio,
            "≥2.5×",
            Some(ratio >= 2.5),
        );
        out.row(
            format!("daemon CPU/dgram at saturation, {m}"),
            format!("{:.2} µs", e.1),
            format!("{:.2} µs", k.1),
            e.1 / k.1,
            "(reported)",
            None,
        );
    }
    if let (Some(e), Some(n)) = (best("evrhost"), best("null")) {
        out.row(format!("UDP saturation, {m}, vs null"), fmt_rate(e.0), fmt_rate(n.0), e.0 / n.0, "(reported)", None);
    }
    Ok(best("evrhost").map(|e| e.0))
}

/// Both daemons' CPU over the same IDLE seconds with nothing sent.
fn idle(evr: &Evrhost, kam: Option<&Kamailio>, out: &mut Report) {
    // Let the last trial's work end.
    std::thread::sleep(Duration::from_secs(2));
    let before = (evr.outside_cpu(), kam.map(Side::outside_cpu));
    let start = Instant::now();
    std::thread::sleep(IDLE);
    let secs = start.elapsed().as_secs_f64();
    let e = (evr.outside_cpu() - before.0) / secs * 100.0;
    let Some(k) = kam.zip(before.1).map(|(k, was)| (k.outside_cpu() - was) / secs * 100.0) else {
        out.notes.push(format!("idle CPU: evrhost {e:.3}% of a core over {secs:.0} s"));
        return;
    };
    out.row(
        "idle CPU (% of a core, the same 10 s)".into(),
        format!("{e:.3}%"),
        format!("{k:.3}%"),
        e / k.max(1e-6),
        "≤1× Kamailio",
        Some(e <= k),
    );
}

/// The daemon's own accounting over the whole run: what its receiver read
/// plus what the kernel dropped on its socket is what it was sent.
fn daemon_counters(evr: &Evrhost, out: &mut Report) {
    let snmp = udp_snmp();
    let m = |name| common::metric(evr.rpc, name);
    out.notes.push(format!(
        "evrhost counters over the run: received {:?}, queue drops {:?}, kernel drops on its socket {:?}; \
         machine Udp RcvbufErrors {:?}",
        m("evrhost_udp_received_total"),
        m("evrhost_udp_dropped_total"),
        m("evrhost_udp_kernel_drops_total"),
        snmp.get("RcvbufErrors"),
    ));
}
