//! `cargo bench --bench erlang`: the Erlang front-end against the issue's
//! targets, beside an Erlang-to-Erlang echo measured in the same run.
//!
//! One client node (tests/erlang/bench.escript) sends `{api, status, ""}`
//! to evrhost (the real daemon, as mod_erlang_event's peers do) and the
//! same term to a registered echo process on a second Erlang node, which
//! answers `{ok, Text}` as evrhost does. Rounds alternate between the two,
//! so both see the same machine load; the table gives medians over rounds.
//! Needs `erl`/`escript` (Debian's erlang-nox).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{daemon, fmt_ns, fmt_rate, free_port, median, Kill};

const COOKIE: &str = "EvrBench";
const N: usize = 10_000;
const ROUNDS: usize = 5;

fn short_host() -> String {
    let host = nix::unistd::gethostname().expect("hostname").into_string().expect("UTF-8 hostname");
    host.split('.').next().unwrap_or(&host).to_string()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (rpc, erl_port) = (free_port(), free_port());
    let config = format!(
        "[rpc]\nlisten = \"127.0.0.1:{rpc}\"\n[erlang]\nlisten-port = {erl_port}\nnodename = \"evrbench{erl_port}\"\ncookie = \"{COOKIE}\"\n"
    );
    let _evrhost = daemon(dir.path(), &config);
    // The RPC listener opens after the Erlang node is registered.
    wait_port(rpc);

    // The baseline: a registered process answering {Pid, {api, _, _}} with
    // {ok, Text} (the same text evrhost's `status` gives), one message at
    // a time, as evrhost's session does.
    let echo = format!("echo{erl_port}");
    let text = "UP 0 s, 0 plugins, 0 routes, 5 commands";
    let _echo = Kill(
        Command::new("erl")
            .args(["-noshell", "-sname", &echo, "-setcookie", COOKIE, "-eval"])
            .arg(format!(
                "register(echo, spawn(fun() -> (fun L() -> receive {{Pid, M}} when is_pid(Pid) -> Pid ! {{ok, \"{text}\"}}, L(); \
                 M -> io:format(standard_error, \"echo: ~p~n\", [M]), L() end end)() end))"
            ))
            .stdout(Stdio::null())
            .spawn()
            .expect("start an Erlang echo node (Debian's erlang-nox)"),
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/erlang/bench.escript");
    let host = short_host();
    let out = Command::new("escript")
        .arg(&script)
        .args([
            format!("bench{erl_port}"),
            format!("evrbench{erl_port}@{host}"),
            format!("{echo}@{host}"),
            COOKIE.to_string(),
            N.to_string(),
            ROUNDS.to_string(),
        ])
        .output()
        .expect("run bench.escript");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench.escript failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));

    let mut samples: BTreeMap<(String, String, usize), Vec<f64>> = BTreeMap::new();
    for line in stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["seq", target, _, p50, p99] => {
                for (i, v) in [p50, p99].iter().enumerate() {
                    samples
                        .entry(("seq".into(), target.to_string(), i))
                        .or_default()
                        .push(v.parse().unwrap_or(f64::NAN));
                }
            }
            ["conc", target, _, rate] => {
                samples
                    .entry(("conc".into(), target.to_string(), 0))
                    .or_default()
                    .push(rate.parse().unwrap_or(f64::NAN));
            }
            _ => {}
        }
    }
    let med = |kind: &str, target: &str, i: usize| {
        let mut v = samples.get(&(kind.to_string(), target.to_string(), i)).cloned().unwrap_or_default();
        v.sort_by(f64::total_cmp);
        median(&v)
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "evrhost Erlang C-node benchmark ({N} round trips per round, {ROUNDS} rounds, medians; 2 cores shared by evrhost and two Erlang nodes; load avg {})",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("{:<44} {:>12} {:>12} {:>7}   {:<28} result", "case", "evrhost", "Erlang echo", "ratio", "target");
    let (e50, b50) = (med("seq", "evrhost", 0), med("seq", "echo", 0));
    let (e99, b99) = (med("seq", "evrhost", 1), med("seq", "echo", 1));
    let (ec, bc) = (med("conc", "evrhost", 0), med("conc", "echo", 0));
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!(
        "{:<44} {:>12} {:>12} {:>6.2}x   {:<28} {}",
        "{api, status, \"\"} sequential p50",
        fmt_ns(e50),
        fmt_ns(b50),
        e50 / b50,
        "p50 ≤ the echo's",
        verdict(e50 <= b50)
    );
    println!(
        "{:<44} {:>12} {:>12} {:>6.2}x   {:<28} -",
        "{api, status, \"\"} sequential p99",
        fmt_ns(e99),
        fmt_ns(b99),
        e99 / b99,
        "(reported)"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>6.2}x   {:<28} {}",
        "4 concurrent processes, throughput",
        fmt_rate(ec),
        fmt_rate(bc),
        ec / bc,
        "≥ 1.2x the echo's",
        verdict(ec >= 1.2 * bc)
    );
}
