//! The daemon's periodic work: pools scale down and expired subscriptions
//! are removed (every second), HEARTBEAT (every `heartbeat_s`), and
//! E_CORE_SHM_THRESHOLD when the daemon's resident memory passes its
//! threshold (checked every second; raised once per crossing).
//!
//! Once a second, not more often: each tick wakes a worker twice (tokio's
//! timer wheel moves a timer that far off to a finer slot first), at tens
//! of µs of CPU a wake-up on a VM, and an idle daemon should sleep. A
//! subscription stops matching (and listing) the moment it expires, and
//! an idle instance outlives its `idle_ms` by a second at most.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::bus::Caller;
use crate::config::EventsSettings;
use crate::dispatcher::Dispatcher;

pub fn spawn(d: Arc<Dispatcher>, events: EventsSettings) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next_heartbeat = events.heartbeat.and_then(|every| Instant::now().checked_add(every));
        let mut above = false;
        let mut cpu = CpuTimes::read();
        loop {
            tick.tick().await;
            d.housekeeping();
            let now = Instant::now();
            if let (Some(at), Some(every)) = (next_heartbeat, events.heartbeat) {
                if now >= at {
                    let idle = CpuTimes::read().zip(cpu).map(|(new, old)| new.idle_percent_since(&old));
                    cpu = CpuTimes::read();
                    heartbeat(&d, idle);
                    // Kept to its schedule: from `now` it would slip by
                    // up to a tick each time.
                    next_heartbeat =
                        at.checked_add(every).filter(|next| *next > now).or_else(|| now.checked_add(every));
                }
            }
            if let Some(limit) = events.shm_limit_bytes {
                let used = resident_bytes().unwrap_or(0);
                let threshold = limit / 100 * u64::from(events.shm_threshold);
                if used > threshold && !above {
                    d.bus().raise(
                        "E_CORE_SHM_THRESHOLD",
                        vec![
                            ("usage", (used * 100 / limit.max(1)).to_string()),
                            ("threshold", events.shm_threshold.to_string()),
                            ("used", used.to_string()),
                            ("size", limit.to_string()),
                        ],
                        Caller::host("memory check"),
                    );
                }
                above = used > threshold;
            }
        }
    })
}

fn heartbeat(d: &Dispatcher, idle_cpu: Option<f64>) {
    let up = d.uptime();
    let secs = up.as_secs();
    let plugins = d.plugins();
    let calls: u64 = plugins.iter().map(|p| p.stats.calls).sum();
    let up_time = format!(
        "{} year(s), {} day(s), {} hour(s), {} minute(s), {} second(s), {} millisecond(s), {} microsecond(s)",
        secs / 31_536_000,
        secs % 31_536_000 / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
        up.subsec_millis(),
        up.subsec_micros() % 1000
    );
    d.bus().raise(
        "HEARTBEAT",
        vec![
            ("Event-Info", "System Ready".to_string()),
            ("Up-Time", up_time),
            ("Uptime-msec", up.as_millis().to_string()),
            ("Evrhost-Version", env!("CARGO_PKG_VERSION").to_string()),
            ("Plugin-Count", plugins.len().to_string()),
            ("Route-Count", d.routes().len().to_string()),
            ("Call-Count", calls.to_string()),
            ("Idle-CPU", format!("{:.6}", idle_cpu.unwrap_or(100.0))),
        ],
        Caller::host("heartbeat"),
    );
}

/// Resident memory of this process, from /proc/self/statm.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The machine's CPU times from /proc/stat, for Idle-CPU.
#[derive(Clone, Copy)]
struct CpuTimes {
    idle: u64,
    total: u64,
}

impl CpuTimes {
    fn read() -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let idle = values.get(3).copied()? + values.get(4).copied().unwrap_or(0);
        Some(CpuTimes { idle, total: values.iter().sum() })
    }

    fn idle_percent_since(&self, old: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(old.total);
        if total == 0 {
            return 100.0;
        }
        self.idle.saturating_sub(old.idle) as f64 * 100.0 / total as f64
    }
}
