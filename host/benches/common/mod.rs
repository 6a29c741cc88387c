//! What the benchmarks share: quantiles of sorted samples and the units
//! of the printed tables.

#![allow(dead_code)] // each bench uses its own subset

pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

pub fn median(sorted: &[f64]) -> f64 {
    quantile(sorted, 0.5)
}

pub fn fmt_ns(ns: f64) -> String {
    if !ns.is_finite() {
        "n/a".into()
    } else if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

pub fn fmt_rate(rate: f64) -> String {
    if !rate.is_finite() {
        "n/a".into()
    } else if rate >= 1e6 {
        format!("{:.2}M/s", rate / 1e6)
    } else {
        format!("{:.0}k/s", rate / 1e3)
    }
}
