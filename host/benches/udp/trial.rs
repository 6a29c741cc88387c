//! One trial (a second of datagrams at a rate, against one receiver) and
//! the search for a receiver's highest loss-free rate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::anyhow;

use crate::common::fmt_rate;
use crate::load::{generate, machine_cpu, process_cpu, snmp_delta, udp_snmp, Mode, Sent};

/// A trial sends rate × TRIAL datagrams and gives up sending after TRIAL_CAP.
pub const TRIAL: Duration = Duration::from_secs(1);
const TRIAL_CAP: Duration = Duration::from_secs(3);
/// After sending: poll the count this often, at most SETTLE_MAX.
const SETTLE_POLL: Duration = Duration::from_millis(50);
const SETTLE_MAX: Duration = Duration::from_secs(3);
/// Loss-free means less than this fraction lost.
pub const MAX_LOSS: f64 = 0.001;
const START_RATE: f64 = 100_000.0;
const MAX_RATE: f64 = 3_200_000.0;
const MIN_RATE: f64 = 10_000.0;
const BISECTIONS: usize = 4;
/// A trial whose generator reached less than this share of the target
/// rate is generator-bound: the rate was not really offered.
pub const GENERATOR_SHARE: f64 = 0.95;
/// A trial during which other processes used more than this share of a
/// core is noisy: it is run again, at most NOISY_RETRIES times a search.
pub const NOISE_SHARE: f64 = 0.15;
const NOISY_RETRIES: usize = 3;

/// A receiver under test.
pub trait Side {
    fn name(&self) -> &'static str;
    fn addr(&self) -> SocketAddr;
    /// Datagrams it handled so far, a running total.
    fn handled(&mut self) -> anyhow::Result<u64>;
    /// Its CPU seconds so far, by part (thread or process name).
    fn cpu(&self) -> BTreeMap<String, f64>;
    /// The CPU seconds of its processes other than this one (the bench's
    /// own are counted apart).
    fn outside_cpu(&self) -> f64;
    /// What its own counters say so far: (received, dropped in its queue).
    fn counters(&self) -> Option<(u64, u64)> {
        None
    }
    /// Still running.
    fn alive(&mut self) -> bool {
        true
    }
}

/// What the daemon's own counters say about a trial.
pub struct Probe {
    pub received: u64,
    pub queue_drops: u64,
}

pub struct Trial {
    pub who: &'static str,
    pub rate: f64,
    pub sent: Sent,
    pub counted: u64,
    /// From the end of sending until the count stopped growing.
    pub settle: Duration,
    /// Udp RcvbufErrors in /proc/net/snmp (the whole host).
    pub kernel_drops: u64,
    pub in_errors: u64,
    pub probe: Option<Probe>,
    /// The receiver's CPU seconds by part.
    pub cpu: BTreeMap<String, f64>,
    /// CPU seconds used by everything on the machine but the receiver and
    /// this bench (other work skews the figures).
    pub others: f64,
    /// CPU seconds in interrupts and softirqs, machine-wide: mostly the
    /// loopback delivery of the datagrams.
    pub softirq: f64,
    /// From the first datagram until the count was read for the last time.
    pub wall: Duration,
    /// Noisy, and run again.
    pub retried: bool,
}

impl Trial {
    pub fn loss(&self) -> f64 {
        if self.sent.count == 0 {
            return 1.0;
        }
        1.0 - self.counted as f64 / self.sent.count as f64
    }

    /// The rate the generator reached.
    pub fn achieved(&self) -> f64 {
        self.sent.count as f64 / self.sent.elapsed.as_secs_f64().max(1e-9)
    }

    /// The rate the receiver handled, from the first datagram until the
    /// count stopped growing.
    pub fn handled_rate(&self) -> f64 {
        self.counted as f64 / (self.sent.elapsed + self.settle).as_secs_f64().max(1e-9)
    }

    pub fn ok(&self) -> bool {
        self.loss() < MAX_LOSS
    }

    pub fn noisy(&self) -> bool {
        self.others > NOISE_SHARE * self.wall.as_secs_f64()
    }

    /// Receiver CPU per datagram counted, in µs.
    pub fn cpu_per_datagram(&self) -> f64 {
        self.cpu.values().sum::<f64>() / self.counted.max(1) as f64 * 1e6
    }

    pub fn line(&self) -> String {
        let mut line = format!(
            "  {:<8} target {:>9} sent {:>8} at {:>9} counted {:>8} loss {:>6.2}% {} settle {:>4} ms kernel drops {:>6}",
            self.who,
            fmt_rate(self.rate),
            self.sent.count,
            fmt_rate(self.achieved()),
            self.counted,
            self.loss() * 100.0,
            if self.ok() { "ok  " } else { "LOSS" },
            self.settle.as_millis(),
            self.kernel_drops,
        );
        if self.in_errors != self.kernel_drops {
            line.push_str(&format!(" (InErrors {})", self.in_errors));
        }
        if let Some(p) = &self.probe {
            line.push_str(&format!(" recv'd {} queue drops {}", p.received, p.queue_drops));
        }
        let cpu: Vec<String> = self.cpu.iter().map(|(n, s)| format!("{n} {s:.3}")).collect();
        line.push_str(&format!(
            " | cpu s: {} ({:.2} µs/dgram), gen {:.2} ({:.2} µs/dgram), softirq {:.2} ({:.2} µs/dgram), others {:.2}",
            cpu.join(" "),
            self.cpu_per_datagram(),
            self.sent.cpu,
            self.sent.cpu / self.sent.count.max(1) as f64 * 1e6,
            self.softirq,
            self.softirq / self.sent.count.max(1) as f64 * 1e6,
            self.others,
        ));
        if self.sent.stalls > 0 {
            line.push_str(&format!(" ({} send stalls)", self.sent.stalls));
        }
        if self.retried {
            line.push_str(" [noisy: run again]");
        }
        line
    }
}

/// CPU seconds of this process, of the receiver outside it, of all tasks,
/// and of interrupts and softirqs.
fn cpu_snapshot(side: &dyn Side) -> [f64; 4] {
    let [tasks, irq] = machine_cpu();
    [process_cpu(std::process::id()), side.outside_cpu(), tasks, irq]
}

/// Sends `n` datagrams at `rate` (unpaced when infinite) to `side` and
/// waits until its count stops growing.
pub fn trial(side: &mut dyn Side, payloads: &[Vec<u8>], mode: Mode, rate: f64, n: u64) -> anyhow::Result<Trial> {
    if !side.alive() {
        return Err(anyhow!("{} is not running", side.name()));
    }
    let snmp = udp_snmp();
    let counters = side.counters();
    let base = side.handled()?;
    let cpu_parts = side.cpu();
    let cpu = cpu_snapshot(side);
    let target = side.addr();
    let start = Instant::now();
    let sent = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("udp-generator".into())
            .spawn_scoped(s, || generate(target, payloads, rate, n, TRIAL_CAP, mode, false))
            .map_err(anyhow::Error::from)
            .and_then(|t| t.join().map_err(|_| anyhow!("the generator panicked")))
    })??;
    let end = Instant::now();
    let mut counted = side.handled()?.saturating_sub(base);
    let (mut settled, mut still) = (end, 0);
    while counted < sent.count && end.elapsed() < SETTLE_MAX && still < 2 {
        std::thread::sleep(SETTLE_POLL);
        let now = side.handled()?.saturating_sub(base);
        if now == counted {
            still += 1;
        } else {
            (counted, settled, still) = (now, Instant::now(), 0);
        }
    }
    let cpu_after = cpu_snapshot(side);
    let parts_after = side.cpu();
    let by_part: BTreeMap<String, f64> = parts_after
        .iter()
        .map(|(name, s)| (name.clone(), s - cpu_parts.get(name).copied().unwrap_or(0.0)))
        .filter(|(_, s)| *s > 0.0)
        .collect();
    let after = udp_snmp();
    let probe = counters
        .zip(side.counters())
        .map(|((r0, d0), (r1, d1))| Probe { received: r1.saturating_sub(r0), queue_drops: d1.saturating_sub(d0) });
    let d: Vec<f64> = cpu_after.iter().zip(cpu).map(|(a, b)| a - b).collect();
    Ok(Trial {
        who: side.name(),
        rate,
        sent,
        counted,
        settle: settled.duration_since(end),
        kernel_drops: snmp_delta(&snmp, &after, "RcvbufErrors"),
        in_errors: snmp_delta(&snmp, &after, "InErrors"),
        probe,
        cpu: by_part,
        others: (d[2] - d[0] - d[1]).max(0.0),
        softirq: d[3],
        wall: start.elapsed(),
        retried: false,
    })
}

/// Doubles the offered rate from START_RATE while loss-free, then bisects.
/// A trial counts at the rate its generator reached (it shares the cores
/// with the receiver, and may fall short of the target); doubling stops
/// when that rate no longer rises.
pub struct Search {
    pub next: Option<f64>,
    /// Highest loss-free rate reached, lowest lossy one.
    lo: Option<f64>,
    hi: Option<f64>,
    /// The highest loss-free trial fell short of its target: the receiver
    /// lost nothing at the most the generator could offer.
    pub generator_bound: bool,
    bisections: usize,
    retries: usize,
    pub trials: Vec<Trial>,
}

impl Search {
    pub fn new() -> Search {
        Search {
            next: Some(START_RATE),
            lo: None,
            hi: None,
            generator_bound: false,
            bisections: 0,
            retries: 0,
            trials: Vec::new(),
        }
    }

    /// The highest loss-free rate reached.
    pub fn best(&self) -> f64 {
        self.lo.unwrap_or(0.0)
    }

    /// The figure as printed: ≥ when the generator could offer no more.
    pub fn shown(&self) -> String {
        format!("{}{}", if self.generator_bound { "≥" } else { "" }, fmt_rate(self.best()))
    }

    pub fn record(&mut self, mut t: Trial) {
        if t.noisy() && self.retries < NOISY_RETRIES {
            // Kept for the record; `next` stays: the same rate again.
            self.retries += 1;
            t.retried = true;
            self.trials.push(t);
            return;
        }
        let reached = t.achieved().min(t.rate);
        let short = reached < GENERATOR_SHARE * t.rate;
        let mut saturated = false;
        if t.ok() {
            let lo = self.lo.unwrap_or(0.0);
            // A doubled target that brought less than 10% more.
            saturated = short && reached < 1.1 * lo;
            if reached > lo {
                self.lo = Some(reached);
                self.generator_bound = short;
            }
        } else {
            self.hi = Some(self.hi.map_or(reached, |hi| hi.min(reached)));
        }
        self.trials.push(t);
        self.next = match (self.lo, self.hi) {
            (Some(lo), None) => (!saturated && lo * 2.0 <= MAX_RATE).then_some(lo * 2.0),
            (None, Some(hi)) => (hi / 2.0 >= MIN_RATE).then_some(hi / 2.0),
            (Some(lo), Some(hi)) if self.bisections < BISECTIONS && hi - lo > 0.05 * lo => {
                self.bisections += 1;
                Some(((lo + hi) / 2.0 / 1e3).round() * 1e3)
            }
            _ => None,
        };
    }
}
