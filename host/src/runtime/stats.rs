//! Per-plugin counters. They belong to the plugin, not to one version, so
//! they survive reloads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::error::Cause;

#[derive(Default)]
pub struct Stats {
    calls: AtomicU64,
    errors: [AtomicU64; Cause::KINDS.len()],
    busy_ns: AtomicU64,
    fuel: AtomicU64,
    instantiated: AtomicU64,
    discarded: AtomicU64,
    log_dropped: AtomicU64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct StatsSnapshot {
    pub calls: u64,
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub busy_us: u64,
    pub fuel: u64,
    pub instantiated: u64,
    pub discarded: u64,
    pub log_lines_dropped: u64,
}

impl Stats {
    pub(crate) fn record(&self, elapsed: Duration, fuel: u64, cause: Option<&Cause>) {
        self.calls.fetch_add(1, Relaxed);
        self.busy_ns.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.fuel.fetch_add(fuel, Relaxed);
        if let Some(cause) = cause {
            self.error(cause);
        }
    }

    pub(crate) fn error(&self, cause: &Cause) {
        if let Some(i) = Cause::KINDS.iter().position(|k| *k == cause.kind()) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn instantiated(&self) {
        self.instantiated.fetch_add(1, Relaxed);
    }

    pub(crate) fn discarded(&self) {
        self.discarded.fetch_add(1, Relaxed);
    }

    pub(crate) fn log_dropped(&self, n: usize) {
        self.log_dropped.fetch_add(n as u64, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            calls: self.calls.load(Relaxed),
            errors: Cause::KINDS
                .iter()
                .zip(&self.errors)
                .map(|(k, n)| (*k, n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            busy_us: self.busy_ns.load(Relaxed) / 1000,
            fuel: self.fuel.load(Relaxed),
            instantiated: self.instantiated.load(Relaxed),
            discarded: self.discarded.load(Relaxed),
            log_lines_dropped: self.log_dropped.load(Relaxed),
        }
    }
}
