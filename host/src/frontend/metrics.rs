//! Prometheus text exposition at `GET /metrics`: per plugin calls, errors
//! by cause, latency histogram, fuel and instances; then what each
//! front-end adds (its [`Metrics`]).

use std::fmt::Write;
use std::sync::{Arc, Mutex};

use crate::dispatcher::Dispatcher;
use crate::runtime::stats::LATENCY_BUCKETS_US;
use crate::sync::lock;

/// A front-end's share of `/metrics`.
pub trait Metrics: Send + Sync + 'static {
    /// Appends its families (`# HELP`, `# TYPE` and samples) to `out`.
    fn render(&self, out: &mut String);
}

/// `# HELP` and `# TYPE` of a family.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Every front-end's metrics.
#[derive(Default)]
pub struct Registry {
    sources: Mutex<Vec<Arc<dyn Metrics>>>,
}

impl Registry {
    pub fn add(&self, source: Arc<dyn Metrics>) {
        lock(&self.sources).push(source);
    }

    pub fn render(&self, d: &Dispatcher) -> String {
        let mut out = String::with_capacity(4096);
        header(&mut out, "evrhost_uptime_seconds", "gauge", "Seconds since the daemon started.");
        let _ = writeln!(out, "evrhost_uptime_seconds {}", d.uptime().as_secs());

        // One snapshot per plugin, read once for every family.
        let plugins: Vec<_> = d
            .slots()
            .into_iter()
            .map(|slot| {
                let version = slot.current();
                let snapshot = slot.stats().snapshot();
                let buckets = slot.stats().latency_buckets();
                let errors: Vec<_> = slot.stats().errors().collect();
                (slot, version, snapshot, buckets, errors)
            })
            .collect();
        header(&mut out, "evrhost_calls_total", "counter", "Calls of a plugin's exports.");
        for (slot, _, s, _, _) in &plugins {
            let _ = writeln!(out, "evrhost_calls_total{{plugin=\"{}\"}} {}", slot.name, s.calls);
        }
        header(&mut out, "evrhost_call_errors_total", "counter", "Failed calls by cause.");
        for (slot, _, _, _, errors) in &plugins {
            for (cause, n) in errors {
                let _ = writeln!(out, "evrhost_call_errors_total{{plugin=\"{}\",cause=\"{cause}\"}} {n}", slot.name);
            }
        }
        header(&mut out, "evrhost_call_duration_seconds", "histogram", "Wall time of calls.");
        for (slot, _, s, buckets, _) in &plugins {
            let mut cumulative = 0;
            for (i, n) in buckets.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS_US.get(i).map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
                let _ = writeln!(
                    out,
                    "evrhost_call_duration_seconds_bucket{{plugin=\"{}\",le=\"{le}\"}} {cumulative}",
                    slot.name
                );
            }
            let _ = writeln!(
                out,
                "evrhost_call_duration_seconds_sum{{plugin=\"{}\"}} {}",
                slot.name,
                s.busy_us as f64 / 1e6
            );
            let _ = writeln!(out, "evrhost_call_duration_seconds_count{{plugin=\"{}\"}} {cumulative}", slot.name);
        }
        type Gauge =
            (&'static str, &'static str, &'static str, fn(&crate::runtime::StatsSnapshot, usize, usize) -> u64);
        let families: [Gauge; 6] = [
            ("evrhost_fuel_consumed_total", "counter", "Fuel the plugin's calls used.", |s, _, _| s.fuel),
            ("evrhost_instances_idle", "gauge", "Instances ready in the plugin's pool.", |_, idle, _| idle as u64),
            ("evrhost_instances_max", "gauge", "The plugin's max_instances.", |_, _, max| max as u64),
            ("evrhost_instances_created_total", "counter", "Instances made.", |s, _, _| s.instantiated),
            (
                "evrhost_instances_discarded_total",
                "counter",
                "Instances thrown away after a trap or a limit.",
                |s, _, _| s.discarded,
            ),
            (
                "evrhost_slow_lane_calls_total",
                "counter",
                "Calls run on the slow lane: their route, command or event ran long lately.",
                |s, _, _| s.slow_lane_calls,
            ),
        ];
        for (name, kind, help, value) in families {
            header(&mut out, name, kind, help);
            for (slot, version, s, _, _) in &plugins {
                let v = value(s, version.idle_instances(), version.spec.limits.max_instances);
                let _ = writeln!(out, "{name}{{plugin=\"{}\"}} {v}", slot.name);
            }
        }
        let kv = d.kv().metrics();
        let backend = d.kv().backend_name();
        for (name, help, v) in [
            ("evrhost_kv_commits_total", "Commits of the embedded kv store.", kv.commits),
            ("evrhost_kv_committed_writes_total", "Keys written by those commits.", kv.committed_writes),
            ("evrhost_kv_errors_total", "Failed kv commits or Redis commands.", kv.errors),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name}{{backend=\"{backend}\"}} {v}");
        }
        for source in lock(&self.sources).iter() {
            source.render(&mut out);
        }
        out
    }
}
