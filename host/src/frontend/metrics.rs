//! Prometheus text exposition at `GET /metrics`: per plugin calls, errors
//! by cause, latency histogram, fuel and instances; per UDP socket datagrams
//! received, dropped, failed and replied.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use super::udp::UdpEndpoint;
use crate::dispatcher::Dispatcher;
use crate::runtime::stats::LATENCY_BUCKETS_US;

/// A UDP metric: name, help text, and how to read it.
type UdpCounter = (&'static str, &'static str, fn(&UdpCounters) -> u64);

#[derive(Clone, Debug, serde::Serialize)]
pub struct UdpCounters {
    pub route: String,
    pub addr: String,
    pub received: u64,
    pub dropped: u64,
    pub failed: u64,
    pub replies: u64,
}

/// What the front-ends add to the metrics.
#[derive(Default)]
pub struct Registry {
    udp: Mutex<Vec<UdpEndpoint>>,
}

impl Registry {
    pub fn add_udp(&self, endpoint: UdpEndpoint) {
        self.udp.lock().unwrap_or_else(|p| p.into_inner()).push(endpoint);
    }

    /// The counters of every UDP socket.
    pub fn udp(&self) -> Vec<UdpCounters> {
        let udp = self.udp.lock().unwrap_or_else(|p| p.into_inner());
        udp.iter()
            .map(|e| UdpCounters {
                route: e.name.clone(),
                addr: e.addr.to_string(),
                received: e.stats.received.load(Relaxed),
                dropped: e.stats.dropped.load(Relaxed),
                failed: e.stats.failed.load(Relaxed),
                replies: e.stats.replies.load(Relaxed),
            })
            .collect()
    }

    pub fn render(&self, d: &Dispatcher) -> String {
        let mut out = String::with_capacity(4096);
        let slots = d.slots();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        header(&mut out, "evrhost_uptime_seconds", "gauge", "Seconds since the daemon started.");
        let _ = writeln!(out, "evrhost_uptime_seconds {}", d.uptime().as_secs());

        header(&mut out, "evrhost_calls_total", "counter", "Calls of a plugin's exports.");
        for slot in &slots {
            let _ = writeln!(out, "evrhost_calls_total{{plugin=\"{}\"}} {}", slot.name, slot.stats().calls());
        }
        header(&mut out, "evrhost_call_errors_total", "counter", "Failed calls by cause.");
        for slot in &slots {
            for (cause, n) in slot.stats().errors() {
                let _ = writeln!(out, "evrhost_call_errors_total{{plugin=\"{}\",cause=\"{cause}\"}} {n}", slot.name);
            }
        }
        header(&mut out, "evrhost_call_duration_seconds", "histogram", "Wall time of calls.");
        for slot in &slots {
            let snapshot = slot.stats().snapshot();
            let mut cumulative = 0;
            for (i, n) in slot.stats().latency_buckets().iter().enumerate() {
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
                snapshot.busy_us as f64 / 1e6
            );
            let _ = writeln!(out, "evrhost_call_duration_seconds_count{{plugin=\"{}\"}} {cumulative}", slot.name);
        }
        header(&mut out, "evrhost_fuel_consumed_total", "counter", "Fuel the plugin's calls used.");
        for slot in &slots {
            let _ = writeln!(
                out,
                "evrhost_fuel_consumed_total{{plugin=\"{}\"}} {}",
                slot.name,
                slot.stats().snapshot().fuel
            );
        }
        header(&mut out, "evrhost_instances_idle", "gauge", "Instances ready in the plugin's pool.");
        for slot in &slots {
            let _ =
                writeln!(out, "evrhost_instances_idle{{plugin=\"{}\"}} {}", slot.name, slot.current().idle_instances());
        }
        header(&mut out, "evrhost_instances_max", "gauge", "The plugin's max_instances.");
        for slot in &slots {
            let _ = writeln!(
                out,
                "evrhost_instances_max{{plugin=\"{}\"}} {}",
                slot.name,
                slot.current().spec.limits.max_instances
            );
        }
        header(&mut out, "evrhost_instances_created_total", "counter", "Instances made.");
        for slot in &slots {
            let _ = writeln!(
                out,
                "evrhost_instances_created_total{{plugin=\"{}\"}} {}",
                slot.name,
                slot.stats().snapshot().instantiated
            );
        }
        header(
            &mut out,
            "evrhost_instances_discarded_total",
            "counter",
            "Instances thrown away after a trap or a limit.",
        );
        for slot in &slots {
            let _ = writeln!(
                out,
                "evrhost_instances_discarded_total{{plugin=\"{}\"}} {}",
                slot.name,
                slot.stats().snapshot().discarded
            );
        }

        let udp = self.udp();
        let counters: [UdpCounter; 4] = [
            ("evrhost_udp_received_total", "Datagrams received.", |c| c.received),
            ("evrhost_udp_dropped_total", "Datagrams dropped because the queue was full.", |c| c.dropped),
            ("evrhost_udp_failed_total", "Datagrams whose call failed.", |c| c.failed),
            ("evrhost_udp_replies_total", "Reply datagrams sent.", |c| c.replies),
        ];
        for (metric, help, value) in counters {
            header(&mut out, metric, "counter", help);
            for c in &udp {
                let _ = writeln!(out, "{metric}{{route=\"{}\",addr=\"{}\"}} {}", c.route, c.addr, value(c));
            }
        }
        out
    }
}
