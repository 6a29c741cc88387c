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

/// A child process killed (and reaped) when dropped: the daemon or a peer
/// a bench started.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `evrhost run -c` on `config`, written into `dir`; warnings only on
/// stderr. Killed when the returned value drops.
pub fn daemon(dir: &std::path::Path, config: &str) -> Kill {
    let path = dir.join("evrhost.toml");
    std::fs::write(&path, config).expect("write config");
    Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_evrhost"))
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .env("XDG_STATE_HOME", dir)
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start evrhost"),
    )
}

/// A loopback TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

mod raw_rpc;
#[allow(unused_imports)] // the benches that time RPC use them
pub use raw_rpc::{http_get, metric, rpc_request, RawClient};
