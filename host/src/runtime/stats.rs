//! Per-plugin counters. They belong to the plugin, not to one version, so
//! they survive reloads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::error::Cause;

/// Upper bounds of the latency histogram's buckets, in microseconds; one
/// more bucket counts everything slower.
pub const LATENCY_BUCKETS_US: [u64; 16] =
    [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 10_000_000];

#[derive(Default)]
pub struct Stats {
    /// Calls per latency bucket; their sum is the number of calls.
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    errors: [AtomicU64; Cause::KINDS.len()],
    busy_ns: AtomicU64,
    fuel: AtomicU64,
    instantiated: AtomicU64,
    discarded: AtomicU64,
    log_dropped: AtomicU64,
    slow_lane: AtomicU64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct StatsSnapshot {
    pub calls: u64,
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub busy_us: u64,
    /// Upper bounds (µs) of the buckets holding the 50th, 90th and 99th
    /// percentile call; `null` past the last bucket.
    pub latency_us: Percentiles,
    pub fuel: u64,
    pub instantiated: u64,
    pub discarded: u64,
    pub log_lines_dropped: u64,
    /// Calls run on the slow lane, their target having run long lately.
    pub slow_lane_calls: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Percentiles {
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p99: Option<u64>,
}

impl Stats {
    /// Counts one call of `requests` requests (more than one: a batch) as
    /// that many calls of its average length, each failed with `cause`.
    pub(crate) fn record(&self, requests: u64, elapsed: Duration, fuel: u64, cause: Option<&Cause>) {
        let us = elapsed.as_micros() / u128::from(requests.max(1));
        let bucket = LATENCY_BUCKETS_US.iter().position(|b| us <= u128::from(*b)).unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(requests, Relaxed);
        self.busy_ns.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.fuel.fetch_add(fuel, Relaxed);
        if let Some(cause) = cause {
            self.errors_of(cause, requests);
        }
    }

    pub(crate) fn error(&self, cause: &Cause) {
        self.errors_of(cause, 1);
    }

    pub(crate) fn errors_of(&self, cause: &Cause, n: u64) {
        if let Some(i) = Cause::KINDS.iter().position(|k| *k == cause.kind()) {
            self.errors[i].fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn instantiated(&self) {
        self.instantiated.fetch_add(1, Relaxed);
    }

    pub(crate) fn discarded(&self) {
        self.discarded.fetch_add(1, Relaxed);
    }

    pub(crate) fn slow_lane(&self) {
        self.slow_lane.fetch_add(1, Relaxed);
    }

    pub(crate) fn log_dropped(&self, n: usize) {
        self.log_dropped.fetch_add(n as u64, Relaxed);
    }

    /// Calls per latency bucket (see `LATENCY_BUCKETS_US`), not cumulative.
    pub fn latency_buckets(&self) -> [u64; LATENCY_BUCKETS_US.len() + 1] {
        std::array::from_fn(|i| self.latency[i].load(Relaxed))
    }

    /// Errors by cause kind, every kind listed.
    pub fn errors(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Cause::KINDS.iter().zip(&self.errors).map(|(k, n)| (*k, n.load(Relaxed)))
    }

    fn percentiles(&self) -> Percentiles {
        let buckets = self.latency_buckets();
        let total: u64 = buckets.iter().sum();
        let at = |q: f64| -> Option<u64> {
            if total == 0 {
                return None;
            }
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in buckets.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return LATENCY_BUCKETS_US.get(i).copied();
                }
            }
            None
        };
        Percentiles { p50: at(0.5), p90: at(0.9), p99: at(0.99) }
    }

    pub fn calls(&self) -> u64 {
        self.latency.iter().map(|n| n.load(Relaxed)).sum()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            latency_us: self.percentiles(),
            calls: self.calls(),
            errors: self.errors().filter(|(_, n)| *n > 0).collect(),
            busy_us: self.busy_ns.load(Relaxed) / 1000,
            fuel: self.fuel.load(Relaxed),
            instantiated: self.instantiated.load(Relaxed),
            discarded: self.discarded.load(Relaxed),
            log_lines_dropped: self.log_dropped.load(Relaxed),
            slow_lane_calls: self.slow_lane.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_buckets() {
        let stats = Stats::default();
        for _ in 0..90 {
            stats.record(1, Duration::from_micros(8), 1, None);
        }
        for _ in 0..9 {
            stats.record(1, Duration::from_micros(400), 1, None);
        }
        stats.record(1, Duration::from_secs(20), 1, Some(&Cause::StackOverflow));
        let s = stats.snapshot();
        assert_eq!((s.latency_us.p50, s.latency_us.p90, s.latency_us.p99), (Some(10), Some(10), Some(500)));
        assert_eq!(s.calls, 100);
        assert_eq!(s.errors.get("stack"), Some(&1));
        assert_eq!(stats.latency_buckets()[LATENCY_BUCKETS_US.len()], 1);
    }

    #[test]
    fn a_batch_counts_as_its_requests_of_its_average_length() {
        let stats = Stats::default();
        // 32 requests in 320 µs: 32 calls of 10 µs, all failed by one trap.
        stats.record(32, Duration::from_micros(320), 64, Some(&Cause::StackOverflow));
        let s = stats.snapshot();
        assert_eq!((s.calls, s.latency_us.p99, s.fuel), (32, Some(10), 64));
        assert_eq!(s.errors.get("stack"), Some(&32));
    }
}
