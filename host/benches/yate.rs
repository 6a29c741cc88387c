//! `cargo bench --bench yate`: `call.route` messages through evrhost (the
//! real daemon, the `yateroute` plugin setting the return value from kv)
//! beside a minimal native module that answers the same messages without
//! wasm (`native_module` of the fake engine), both over TCP from the same
//! fake Yate engine (tests/yate/engine.rs) on listeners with a role.
//!
//! Rounds alternate between the two so that both see the same machine
//! load; the table gives medians over rounds: messages/s with 32 in flight
//! (pipelined), and p50/p99 per message with one in flight.

mod common;

#[path = "../../tests/yate/engine.rs"]
mod engine;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{daemon, fmt_ns, fmt_rate, free_port, median, quantile};
use engine::{Engine, Listener};

const PIPELINED: usize = 20_000;
const WINDOW: usize = 32;
const SINGLE: usize = 3_000;
const ROUNDS: usize = 5;

fn params(_: usize) -> Vec<(String, String)> {
    vec![
        ("id".into(), "sip/1".into()),
        ("caller".into(), "alice".into()),
        ("called".into(), "1000".into()),
        ("billid".into(), "1700000000-1".into()),
    ]
}

/// One round on one module: (messages/s pipelined, latencies one at a time).
async fn round(engine: &Engine) -> (f64, Vec<f64>) {
    let started = Instant::now();
    let answered = engine.pipeline("call.route", PIPELINED, WINDOW, params).await;
    let rate = answered.len() as f64 / started.elapsed().as_secs_f64();
    assert_eq!(answered.len(), PIPELINED, "every pipelined message answered");
    let single = engine.pipeline("call.route", SINGLE, 1, params).await;
    assert_eq!(single.len(), SINGLE, "every message answered");
    (rate, single.iter().map(|d| d.as_nanos() as f64).collect())
}

/// The native module, in a thread and a runtime of its own as a separate
/// process would be, connected to `listener`.
async fn native(listener: &Listener, addr: std::net::SocketAddr) -> Engine {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (r, w) = stream.into_split();
            let _ = engine::native_module(r, w).await;
        });
    });
    let engine = listener.accept_timeout(Duration::from_secs(10)).await.expect("the native module connects");
    assert!(engine.wait_installed("call.route", Duration::from_secs(10)).await);
    engine
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (evr_addr, evr_listener) = Engine::listen_tcp(Some("global")).expect("listen");
    let (nat_addr, nat_listener) = Engine::listen_tcp(Some("global")).expect("listen");
    let rpc = free_port();
    let plugin = evrhost::harness::plugin("yateroute");
    let config = format!(
        "[rpc]\nlisten = \"127.0.0.1:{rpc}\"\n\
         [[plugin]]\nname = \"yateroute\"\npath = \"{}\"\nmin_instances = 2\n\
         [[route]]\nname = \"call.route\"\nplugin = \"yateroute\"\n\
         [yate]\nconnect = \"tcp:{evr_addr}\"\nrole = \"\"\n\
         [[yate.install]]\nmessage = \"call.route\"\n",
        plugin.display()
    );
    let _evrhost = daemon(dir.path(), &config);
    let evrhost = evr_listener.accept_timeout(Duration::from_secs(60)).await.expect("evrhost connects");
    assert!(evrhost.wait_installed("call.route", Duration::from_secs(10)).await, "{:?}", evrhost.sent_lines());
    let set = Command::new(env!("CARGO_BIN_EXE_evrhost"))
        .args(["rpc", "-a", &format!("127.0.0.1:{rpc}"), "api.run", "yateroute.set", "1000", "sip/1000@example.com"])
        .output()
        .expect("evrhost rpc");
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let native = native(&nat_listener, nat_addr).await;

    // Warm both (instances, caches, the TCP windows).
    let check = evrhost
        .dispatch("call.route", "", &params(0).iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>())
        .await;
    assert!(check.processed && check.msg.retvalue_str() == "sip/1000@example.com", "{check:?}");
    round(&evrhost).await;
    round(&native).await;

    let (mut rates, mut p50s, mut p99s) =
        ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for _ in 0..ROUNDS {
        for (i, engine) in [&evrhost, &native].into_iter().enumerate() {
            let (rate, mut lat) = round(engine).await;
            lat.sort_by(f64::total_cmp);
            rates[i].push(rate);
            p50s[i].push(median(&lat));
            p99s[i].push(quantile(&lat, 0.99));
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        median(v)
    };
    let (evr_rate, nat_rate) = (med(&mut rates[0]), med(&mut rates[1]));
    let (evr_p50, nat_p50) = (med(&mut p50s[0]), med(&mut p50s[1]));
    let (evr_p99, nat_p99) = (med(&mut p99s[0]), med(&mut p99s[1]));
    println!();
    println!("Yate call.route through evrhost (yateroute plugin) vs a native module, same fake engine, TCP");
    println!("{ROUNDS} alternating rounds; medians. Pipelined: {PIPELINED} messages, {WINDOW} in flight; single: {SINGLE}, 1 in flight.");
    println!();
    println!("{:<34} {:>12} {:>12} {:>7}   {:<26} result", "case", "evrhost", "native", "ratio", "target");
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let ratio = evr_rate / nat_rate;
    println!(
        "{:<34} {:>12} {:>12} {:>6.2}×   {:<26} {}",
        "messages/s, window 32",
        fmt_rate(evr_rate),
        fmt_rate(nat_rate),
        ratio,
        "≥ 50k/s and ≥ 0.5× native",
        verdict(evr_rate >= 50_000.0 && ratio >= 0.5)
    );
    println!(
        "{:<34} {:>12} {:>12} {:>6.2}×   {:<26}",
        "p50 per message, window 1",
        fmt_ns(evr_p50),
        fmt_ns(nat_p50),
        evr_p50 / nat_p50,
        "(reported)"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>6.2}×   {:<26}",
        "p99 per message, window 1",
        fmt_ns(evr_p99),
        fmt_ns(nat_p99),
        evr_p99 / nat_p99,
        "(reported)"
    );
    println!("rounds (msgs/s): evrhost {:?}", rates[0].iter().map(|r| fmt_rate(*r)).collect::<Vec<_>>());
    println!("rounds (msgs/s): native  {:?}", rates[1].iter().map(|r| fmt_rate(*r)).collect::<Vec<_>>());
}
