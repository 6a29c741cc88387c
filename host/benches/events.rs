//! Event bus benchmark: events/s fanned out to 1, 10 and 100 plugin
//! subscribers and to an external UDP subscriber, and the cost per call of
//! profiling on vs off. Each figure stands beside a baseline measured in the
//! same run:
//! - plugin fan-out: the same plugin's `subscriber.on-event` called
//!   directly, once per event, without the bus (deliveries/s), with the
//!   fired event as it is and with the eleven headers the bus adds to
//!   every event (the bus's own, `Bus::stamp`). The bus hands a subscriber the events that queued up in
//!   one call of `subscriber-batch` (the Rust SDK exports it), and the
//!   listener bumps each count once per batch;
//! - UDP: a bare socket sending, one sendto(2) each, the notification the
//!   bus sends (datagrams/s): the event with its standard headers;
//! - profiling: the same route with profiling off.
//!
//! `cargo bench --bench events`. Prints a table; never fails on a miss.

use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use evrhost::bus::Caller;
use evrhost::config::Config;
use evrhost::config::EventSocket;
use evrhost::dispatcher::Dispatcher;
use evrhost::frontend::event_sinks::{notification, EventSinks};
use evrhost::runtime::{Event, Origin, Request, Runtime};

mod common;
use common::*;

const PLUGINS: &str = env!("EVRHOST_PLUGINS_DIR");

fn config(subscribers: usize, cache: &Path) -> anyhow::Result<Config> {
    let mut text = format!(
        "[runtime]\ncache_dir = \"{}\"\n[rpc]\nlisten = \"\"\n[events]\nheartbeat_s = 0\nqueue = 200000\n\
         [[plugin]]\nname = \"echo\"\npath = \"{PLUGINS}/echo.wasm\"\n\
         [[plugin]]\nname = \"echo_p\"\npath = \"{PLUGINS}/echo.wasm\"\nprofiling = true\n\
         [[route]]\nname = \"echo\"\nplugin = \"echo\"\n[[route]]\nname = \"echo_p\"\nplugin = \"echo_p\"\n",
        cache.display()
    );
    for i in 0..subscribers {
        text.push_str(&format!(
            "[[plugin]]\nname = \"l{i}\"\npath = \"{PLUGINS}/listener.wasm\"\nmin_instances = 1\nmax_instances = 1\n\
             [plugin.config]\nid = \"l{i}\"\n[[route]]\nname = \"l{i}.subscribe\"\nplugin = \"l{i}\"\n"
        ));
    }
    Ok(Config::parse(&text, "bench.toml", Path::new("."))?)
}

fn event(i: u64) -> Event {
    Event {
        name: "CUSTOM".into(),
        subclass: Some("bench".into()),
        headers: vec![("N".into(), i.to_string()), ("User".into(), "alice".into())],
        body: None,
    }
}

/// Fires `events` CUSTOM events, letting the delivery tasks run now and then.
async fn fire(d: &Dispatcher, events: u64) {
    for i in 0..events {
        d.bus().fire(event(i), Caller::host("bench"));
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

fn delivered(d: &Dispatcher) -> u64 {
    d.bus().list().iter().filter(|s| s.target.starts_with("plugin:")).map(|s| s.delivered + s.failed).sum()
}

fn rate(n: u64, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let cache = std::env::temp_dir().join(format!("evrhost-bench-events-{}", std::process::id()));
    let mut rows: Vec<(String, String, String, String)> = Vec::new();

    // 1. Fan-out to plugin subscribers.
    let (mut direct_rate, mut dressed_rate) = (0.0, 0.0);
    for subscribers in [1usize, 10, 100] {
        let config = config(subscribers, &cache)?;
        let d = rt.block_on(async {
            let runtime = Runtime::new(config.engine.clone(), config.cache_dir.clone())?;
            anyhow::Ok(Dispatcher::start(runtime, &config).await?)
        })?;
        for i in 0..subscribers {
            let route = format!("l{i}.subscribe");
            let request = Request { route, data: b"CUSTOM bench".to_vec(), params: vec![], origin: Origin::Cli };
            rt.block_on(d.run_route(&request)).context("subscribe")?;
        }
        if subscribers == 1 {
            // Baseline: the subscriber export called directly, no bus.
            let v = d.plugin("l0").context("l0")?;
            let n = 20_000u64;
            let ev = event(0);
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..n {
                    let _ = v.on_event(&ev).await;
                }
            });
            direct_rate = rate(n, started.elapsed());
            // The same with the headers the bus adds to every event (as
            // FreeSWITCH's do), to tell what delivery costs from what a
            // bigger event costs to pass into the guest.
            let dressed = d.bus().stamp(event(0), Caller::host("bench")).event().clone();
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..n {
                    let _ = v.on_event(&dressed).await;
                }
            });
            dressed_rate = rate(n, started.elapsed());
        }
        let events: u64 = match subscribers {
            1 => 20_000,
            10 => 4_000,
            _ => 400,
        };
        let before = delivered(&d);
        let started = Instant::now();
        rt.block_on(async {
            fire(&d, events).await;
            let want = before + events * subscribers as u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while delivered(&d) < want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let took = started.elapsed();
        let got = delivered(&d) - before;
        let deliveries = rate(got, took);
        rows.push((
            format!("fan-out to {subscribers} plugin(s)"),
            format!("{} events, {} deliveries", fmt_rate(rate(events, took)), fmt_rate(deliveries)),
            format!("{} direct calls", fmt_rate(direct_rate)),
            format!("{:.2}x", deliveries / direct_rate),
        ));
        if subscribers == 1 {
            rows.push((
                "fan-out to 1, vs its headers direct".into(),
                format!("{} deliveries", fmt_rate(deliveries)),
                format!("{} direct, bus headers", fmt_rate(dressed_rate)),
                format!("{:.2}x", deliveries / dressed_rate),
            ));
        }
        if got < events * subscribers as u64 {
            println!(
                "note: {subscribers} subscribers: {got} of {} deliveries within 60 s",
                events * subscribers as u64
            );
        }
    }

    // 2. An external UDP subscriber (event_datagram).
    {
        let config = config(0, &cache)?;
        let d = rt.block_on(async {
            let runtime = Runtime::new(config.engine.clone(), config.cache_dir.clone())?;
            anyhow::Ok(Dispatcher::start(runtime, &config).await?)
        })?;
        let receiver = UdpSocket::bind("127.0.0.1:0")?;
        receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
        let _ = socket2::SockRef::from(&receiver).set_recv_buffer_size(32 << 20);
        let addr = receiver.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (received.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !halt.load(Ordering::Relaxed) {
                if receiver.recv(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let events = 50_000u64;
        // Baseline: the same bytes, sent by a bare socket.
        let sender = UdpSocket::bind("127.0.0.1:0")?;
        // The bytes the bus sends: the event with its standard headers.
        let payload = notification(&d.bus().stamp(event(0), Caller::host("bench")), None);
        let started = Instant::now();
        for _ in 0..events {
            let _ = sender.send_to(&payload, addr);
        }
        let bare = rate(events, started.elapsed());
        std::thread::sleep(Duration::from_millis(300));
        received.store(0, Ordering::Relaxed);

        rt.block_on(async {
            std::sync::Arc::new(EventSinks::default()).subscribe(
                d.bus(),
                &EventSocket::Udp(addr),
                "CUSTOM",
                Some("bench"),
                None,
            )
        })?;
        let started = Instant::now();
        rt.block_on(async {
            fire(&d, events).await;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let sub = d.bus().list().into_iter().find(|s| s.target.starts_with("udp:"));
                let done = sub.map_or(0, |s| s.delivered + s.failed + s.overflow);
                if done >= events || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let took = started.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let _ = reader.join();
        let got = received.load(Ordering::Relaxed);
        rows.push((
            "fan-out to a UDP subscriber".into(),
            format!("{} ({got} of {events} received)", fmt_rate(rate(events, took))),
            format!("{} bare sends", fmt_rate(bare)),
            format!("{:.2}x", rate(events, took) / bare),
        ));

        // 3. Profiling: the same route with and without it.
        let plain = Request { route: "echo".into(), data: vec![0x5a; 64], params: vec![], origin: Origin::Cli };
        let profiled = Request { route: "echo_p".into(), ..plain.clone() };
        let (mut off, mut on_idle, mut on) = (Vec::new(), Vec::new(), Vec::new());
        let sample = |req: &Request| -> f64 {
            let n = 1000;
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..n {
                    let _ = d.run_route(req).await;
                }
            });
            started.elapsed().as_secs_f64() * 1e9 / n as f64
        };
        for _ in 0..50 {
            off.push(sample(&plain));
            on_idle.push(sample(&profiled));
        }
        // With somebody listening, the records are built and delivered.
        let sink = UdpSocket::bind("127.0.0.1:0")?;
        rt.block_on(async {
            let socket = EventSocket::Udp(sink.local_addr().unwrap_or(addr));
            std::sync::Arc::new(EventSinks::default()).subscribe(d.bus(), &socket, "E_PROFILING_SCRIPT", None, None)
        })?;
        for _ in 0..50 {
            on.push(sample(&profiled));
        }
        for v in [&mut off, &mut on_idle, &mut on] {
            v.sort_by(f64::total_cmp);
        }
        let (off, on_idle, on) = (median(&off), median(&on_idle), median(&on));
        rows.push((
            "call, profiling on, no listener".into(),
            format!("{:.2} µs", on_idle / 1e3),
            format!("{:.2} µs off", off / 1e3),
            format!("{:.2}x", on_idle / off),
        ));
        rows.push((
            "call, profiling on, a UDP listener".into(),
            format!("{:.2} µs (4 records)", on / 1e3),
            format!("{:.2} µs off", off / 1e3),
            format!("{:.2}x", on / off),
        ));
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "evrhost event bus benchmark (2 tokio workers; load avg {})",
        load.split_whitespace().next().unwrap_or("?")
    );
    println!("{:<36} {:<40} {:<22} ratio", "case", "evrhost", "baseline");
    for (case, value, base, ratio) in rows {
        println!("{case:<36} {value:<40} {base:<22} {ratio}");
    }
    println!("fan-out: events fired until every subscriber's delivery task handled them. Events that queued up");
    println!("while the last ones were delivered go together (at most 64): to a plugin in one subscriber-batch");
    println!("call, where the listener bumps its count once (kv incr + kv set + a log line per batch and name;");
    println!("direct calls: one on-event call, with that work, per event); to a UDP subscriber in one sendmmsg.");
    let _ = std::fs::remove_dir_all(&cache);
    Ok(())
}
